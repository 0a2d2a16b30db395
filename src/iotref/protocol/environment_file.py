"""The environment file format (contract section 1): a small dotenv file of fixed keys."""

from __future__ import annotations

BASE_URL = "base_url"
DIRECTORY_HOST = "DIRECTORY_HOST"
DIRECTORY_OAUTH_CLIENT_ID = "DIRECTORY_OAUTH_CLIENT_ID"
SCOPE = "SCOPE"
REQUIRED_KEYS = (BASE_URL, DIRECTORY_HOST, DIRECTORY_OAUTH_CLIENT_ID, SCOPE)
#: iotref's own optional key: the id of the sandbox that wrote the file. A sandbox's data
#: dir gets a new one, so a new sandbox at the same address is not taken for an old one.
SANDBOX_ID = "SANDBOX_ID"
#: iotref's own optional keys: the platform's per-connection quotas the device paces its
#: publishes to, in publishes a second and bytes a second (0: not paced). Absent: the
#: device's defaults (AWS IoT Core's quotas). A sandbox writes the quotas it measures.
PUBLISH_RATE_LIMIT = "PUBLISH_RATE_LIMIT"
THROUGHPUT_LIMIT = "THROUGHPUT_LIMIT"

DEFAULT_SCOPE = "Org.prinect.onprem.rw,Org.directory.machines.rw,Org.directory.organization.r"


class EnvironmentFileError(ValueError):
    """An environment file that cannot be read."""


def parse_env_file(text: str) -> dict[str, str]:
    """Parse ``KEY=value`` lines; ``#`` comments, blank lines, ``export`` and quotes allowed."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            raise EnvironmentFileError(f"line {number}: expected KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def format_env_file(values: dict[str, str], comment: str | None = None) -> str:
    """Write ``values`` in the format :func:`parse_env_file` reads."""
    lines = [f"# {line}" for line in (comment or "").splitlines()]
    lines += [f"{key}={value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"
