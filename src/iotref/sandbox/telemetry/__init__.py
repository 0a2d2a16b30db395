"""Telemetry as the platform receives it: the ingestion component
(:mod:`~iotref.sandbox.telemetry.ingestion`), its receiving process and thread, the checks,
the store (``telemetry.db``) and the live feed the monitor shows."""
