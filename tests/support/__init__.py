"""What tests share, written once; a test module defines only what is its own.

- The sandbox: ``sandbox_process`` (start, stop, its Mosquitto), ``tokens`` (device flow,
  provisioned devices), ``onboarding`` (login, stores through the library), ``shadow_rest``,
  ``cli_process`` (the ``iotref`` command in a subprocess), ``directory_harness`` (the
  directory in-process).
- MQTT: ``mqtt_probe`` (paho probes as a device or the operator, ``mosquitto_sub``),
  ``telemetry_watcher`` (the independent subscriber that counts deliveries),
  ``device_settings`` (the library's connection settings), ``counted_messages``,
  ``pacing``.
- Keys and TLS: ``device_keys`` (keys, CSRs, self-signed certificates), ``tls_servers``,
  ``alpn_front``.
- Faults and waiting: ``fault_proxy``, ``ports``, ``waiting``.
- Figures: ``figures`` (for ``make reliability``), ``fuzz_report``; ``browser`` (Chromium).

Fixtures built from these live in ``tests/conftest.py``."""
