"""The fleet's TLS contexts, built ahead of the connect ramp on one worker thread and
without loading the system's CA bundle that a device's own CA file replaces anyway
(docs/fleet.md, "TLS contexts built ahead")."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Final, Protocol

from awscrt import io

from iotref.device.connection.awscrt_options import build_tls_context
from iotref.device.connection.errors import ConnectionFailed
from iotref.device.connection.settings import ConnectionSettings


class TlsDevice(Protocol):
    """What :func:`build_tls_contexts` needs of a device: its settings, and a place for
    the context it built."""

    tls_context: io.ClientTlsContext | None

    def settings(self) -> ConnectionSettings: ...


# s2n makes every new TLS configuration load the system's CA bundle (aws-lc's default
# paths), and aws-c-io throws it away again at once because a device trusts only its own CA
# file. While the fleet builds its contexts these variables
# point aws-lc's default paths at nothing.
_DEFAULT_TRUST_VARIABLES: Final = ("SSL_CERT_FILE", "SSL_CERT_DIR")


@contextlib.contextmanager
def without_system_trust_store() -> Iterator[None]:
    """Within: new awscrt TLS contexts do not load the system's CA bundle first.

    Only for contexts that replace the trust store anyway (as
    :func:`~iotref.device.connection.awscrt_options.build_tls_context` does with
    ``ca_path``): a context that relies on the system's CAs built here would trust nothing.
    It changes this process's environment, so use it where nothing else is opening TLS
    connections.
    """
    saved = {name: os.environ.get(name) for name in _DEFAULT_TRUST_VARIABLES}
    for name in _DEFAULT_TRUST_VARIABLES:
        os.environ[name] = os.devnull
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_tls_contexts(devices: Sequence[TlsDevice], stop: threading.Event | None = None) -> int:
    """Build each device's TLS context (on a worker thread, before connecting), so the
    connect ramp only creates clients. A device whose files are unusable gets none, and
    :meth:`Connection.start` reports why as usual. Returns how many were built.

    awscrt keeps the GIL while it builds a context, so more than one worker thread would
    not build faster; what makes it cheap is skipping the system CA bundle."""
    built = 0
    with without_system_trust_store():
        for device in devices:
            if stop is not None and stop.is_set():
                break
            with contextlib.suppress(ConnectionFailed):
                device.tls_context = build_tls_context(device.settings())
                built += 1
    return built
