"""Which sandbox ``--env local`` means.

The built-in ``local`` environment is "the sandbox on its default port", and several
sandboxes can serve that address one after the other (a new data dir, a second checkout).
So the command asks the sandbox answering there who it is: ``GET /healthz`` carries its
``sandbox_id``, the same id its ``env.local`` carries. Tokens and certificate stores of an
earlier sandbox at that address are then not taken for this one's. When nothing answers,
the id stays unknown and is not compared.
"""

from __future__ import annotations

import http.client
import json
import logging
from pathlib import Path
from urllib.parse import urlsplit

from iotref.device.onboarding.environment import Environment, resolve_environment, with_sandbox_id

log = logging.getLogger(__name__)

#: Seconds to wait for the sandbox's answer (a loopback call: it answers in milliseconds).
PROBE_TIMEOUT = 1.0
_MAX_ANSWER = 4096


def sandbox_id_at(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """The id of the sandbox answering at ``url`` (``http://host:port``), or None when
    nothing answers there or it is not a sandbox."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return None
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        connection.request("GET", f"{parts.path.rstrip('/')}/healthz")
        response = connection.getresponse()
        body = response.read(_MAX_ANSWER)
        if response.status != 200:
            return None
        answer = json.loads(body)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        log.debug("no sandbox identity from %s: %s", url, exc)
        return None
    finally:
        connection.close()
    sandbox_id = answer.get("sandbox_id") if isinstance(answer, dict) else None
    return sandbox_id if isinstance(sandbox_id, str) else None


def resolve_cli_environment(env_name: str | None, env_file: Path | None) -> Environment:
    """The environment a command was given (``--env``, ``--env-file`` or their variables);
    the built-in ``local`` tied to the sandbox that answers on its port."""
    env = resolve_environment(env_name, env_file)
    if env.source == "built-in" and env.name == "local" and env.sandbox_id is None:
        env = with_sandbox_id(env, sandbox_id_at(env.directory_host))
    return env
