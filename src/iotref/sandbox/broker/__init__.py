"""The platform's MQTT side: Mosquitto run and supervised by the sandbox
(:mod:`~iotref.sandbox.broker.supervisor`), the configuration and ACL it is given
(:mod:`~iotref.sandbox.broker.config`) and its dynamic-security identities
(:mod:`~iotref.sandbox.broker.dynamic_security`)."""
