"""What tests share, written once; a test module defines only what is its own.

- The sandbox: ``sandbox_process`` (start, stop, its Mosquitto), ``tokens`` (device flow,
  provisioned devices), ``onboarding`` (login, stores through the library), ``shadow_rest``,
  ``cli_process`` (the ``iotref`` command in a subprocess), ``directory_harness`` (the
  directory in-process).
- MQTT: ``mqtt_probe`` (paho probes as a device or the operator, ``mosquitto_sub``),
  ``telemetry_watcher`` (the independent subscriber that counts deliveries),
  ``device_connection`` (the library's connection settings), ``counted_messages`` (and a
  backlog queued offline), ``arrivals`` (publishes stamped as the platform receives them,
  counted per second), ``pacing``.
- In-process sandbox parts: ``ingestion_inputs`` (a known device and its messages).
- Keys and TLS: ``device_keys`` (keys, CSRs, self-signed certificates), ``tls_servers``,
  ``alpn_front``.
- Faults and waiting: ``fault_proxy``, ``ports``, ``waiting``.
- Figures: ``figures`` (for ``make reliability``), ``fuzz_report``; ``browser`` (Chromium).

Fixtures built from these live in ``tests/conftest.py``."""
