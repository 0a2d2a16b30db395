"""Telemetry of one machine: typed messages, the durable outbox and the publisher that
drains it over the MQTT connection (:mod:`.publisher`), joined by the Protocols in
:mod:`.seams`."""
