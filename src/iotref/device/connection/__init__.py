"""The device's MQTT connection to the platform (contract section 6), on awscrt's MQTT 5
client: its settings, errors, state and events, the awscrt options and TLS context, the
reconnect schedule, the publish pacing, the diagnosis of failed connections, and the
:class:`~iotref.device.connection.connection.Connection` itself.

Import from the submodules; this package re-exports nothing.
"""
