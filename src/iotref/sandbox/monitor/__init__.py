"""The sandbox's debug monitor: the component (:mod:`~iotref.sandbox.monitor.component`),
its page and static files, JSON API, shadow actions and live stream, and its OpenAPI
fragment."""
