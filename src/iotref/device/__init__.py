"""The device library: onboarding, connection, shadow, telemetry."""
