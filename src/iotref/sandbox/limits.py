"""The AWS IoT Core limits a sandbox applies to devices, with AWS's values as defaults
(:mod:`iotref.protocol.limits`); ``iotref sandbox up`` options change them.

Mosquitto cannot throttle a connection, so the per-connection publish rate and throughput
are measured (:mod:`iotref.sandbox.quota_meter`): what AWS IoT Core would have throttled is
counted and shown, not refused. The shadow service enforces its own limits with AWS's error
codes (:mod:`iotref.sandbox.shadow.request_limits`, :mod:`iotref.protocol.shadow_document`).
docs/configuration.md lists each limit, its source and how it is modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from iotref.protocol import limits
from iotref.protocol.shadow_document import ShadowLimits


@dataclass(frozen=True)
class SandboxLimits:
    """Per-device limits; a rate of 0 switches that limit off."""

    publish_rate: int = limits.PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION
    """Publish requests a second per connection (measured)."""
    throughput: int = limits.THROUGHPUT_BYTES_PER_SECOND_PER_CONNECTION
    """Bytes a second per connection (measured)."""
    shadow_rate: int = limits.SHADOW_REQUESTS_PER_SECOND_PER_THING
    """Shadow requests a second per thing (enforced: 429)."""
    shadow_in_flight: int = limits.SHADOW_IN_FLIGHT_REQUESTS_PER_THING
    """Shadow requests per thing started and not yet answered (enforced: 429)."""
    shadow_state_bytes: int = limits.SHADOW_STATE_MAX_BYTES
    """Desired and reported state of one shadow together (enforced: 413)."""
    shadow_depth: int = limits.SHADOW_MAX_DEPTH
    """Levels of nesting in desired or reported (enforced: 400)."""

    def __post_init__(self) -> None:
        for name in ("publish_rate", "throughput", "shadow_rate", "shadow_in_flight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off) or more")
        if self.shadow_state_bytes < 1 or self.shadow_depth < 1:
            raise ValueError("the shadow's size and depth limits must be at least 1")

    @property
    def shadow_document(self) -> ShadowLimits:
        """The document rules' share of these limits."""
        return ShadowLimits(state_max_bytes=self.shadow_state_bytes, max_depth=self.shadow_depth)
