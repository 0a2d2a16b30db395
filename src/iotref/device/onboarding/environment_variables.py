"""The process environment variables that choose the platform environment, as the command
line's ``--env`` and ``--env-file`` do: a built-in environment's name, or an environment
file. Read by :mod:`iotref.device.onboarding.environment` and named in next steps
(:mod:`iotref.device.onboarding.next_steps`)."""

from __future__ import annotations

ENV_VAR = "IOTREF_ENV"
ENV_FILE_VAR = "IOTREF_ENV_FILE"
