"""awscrt's native publish entry point, used while awscrt's own publish wrapper is exactly
the one this was written against.

``mqtt5.Client.publish`` wraps the native call in a concurrent future, a packet object and
a closure per message; :func:`raw_publish_function` gives the native function itself, so
that :class:`~iotref.device.connection.publishes.PublishOperations` can call it with its
own completion callback. It is not a public API of awscrt: it is used only while the
wrapper's source hashes to :data:`KNOWN_CRT_PUBLISH_SHA256`, which pins the function's
arguments and its callback's; any other awscrt goes through the public wrapper.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
from collections.abc import Callable

from awscrt import mqtt5

log = logging.getLogger("iotref.connection")

KNOWN_CRT_PUBLISH_SHA256 = "70269f0e2ead0e172c1a13879ea56505fbcac6ed51559d31eb15a90e1db12382"
"""SHA-256 of the source of ``awscrt.mqtt5.Client.publish`` as of awscrt 0.38.1."""


@functools.cache
def raw_publish_function() -> Callable[..., None] | None:
    """awscrt's native publish function, or ``None`` when awscrt's wrapper is not the known
    one (or its source cannot be read)."""
    try:
        source = inspect.getsource(mqtt5.Client.publish)
        native = importlib.import_module("_awscrt")
    except (ImportError, OSError, TypeError):
        return None
    if hashlib.sha256(source.encode()).hexdigest() != KNOWN_CRT_PUBLISH_SHA256:
        log.debug("connection: unknown awscrt publish wrapper; using it as it is")
        return None
    publish = getattr(native, "mqtt5_client_publish", None)
    return publish if callable(publish) else None
