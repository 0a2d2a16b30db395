"""Keep a test's shadow requests for one thing within the shadow service's per-thing
quota (AWS IoT: 20 requests a second), as a well-behaved device would: a token bucket a
little below the quota, waited on before each request."""

from __future__ import annotations

import time

from iotref.protocol.limits import SHADOW_REQUESTS_PER_SECOND_PER_THING
from iotref.protocol.token_bucket import TokenBucket

SHADOW_PACE = SHADOW_REQUESTS_PER_SECOND_PER_THING - 2  # requests a second, with room


class Pacer:
    """``wait()`` returns when one more request fits in ``rate`` a second."""

    def __init__(self, rate: float = SHADOW_PACE) -> None:
        self.bucket = TokenBucket(rate, now=time.monotonic())

    def wait(self) -> None:
        while self.bucket.take(1, time.monotonic()) == 0:
            missing = 1 - self.bucket.tokens
            time.sleep(max(missing / self.bucket.rate, 0.001))
