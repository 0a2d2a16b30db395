"""A valid access token on demand: load the environment's saved tokens, refresh them when
they expire (saving the rotated refresh token before the new access token is used), and
share one refresh between processes through the token store's lock."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Protocol

from iotref.device.errors import LoginRequired, StoreError
from iotref.device.files import LockBusy
from iotref.device.onboarding.device_flow import Clock, DeviceFlowClient, TokenSet
from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.next_steps import NextStep, Selection, run
from iotref.device.onboarding.token_store import TokenStore

#: Refresh this long before the access token's stated expiry.
EXPIRY_LEEWAY = 60.0
LOCK_TIMEOUT = 60.0


class TokenProvider(Protocol):
    """What the API clients need: a bearer token, fresh if asked."""

    async def access_token(self, *, force_refresh: bool = False) -> str: ...


class Authenticator:
    """Hands out access tokens for one environment from its token store."""

    def __init__(
        self,
        env: Environment,
        store: TokenStore,
        flow: DeviceFlowClient,
        *,
        clock: Clock = time.time,
        leeway: float = EXPIRY_LEEWAY,
    ) -> None:
        self.env = env
        self.store = store
        self.flow = flow
        self.clock = clock
        self.leeway = leeway
        self._tokens: TokenSet | None = None

    def use(self, tokens: TokenSet | None) -> None:
        """Forget the cached tokens and use ``tokens`` (just saved by a login), or reload
        them from the store on next use (``None``)."""
        self._tokens = tokens

    def tokens(self) -> TokenSet:
        """The saved tokens (possibly expired), or :class:`LoginRequired`."""
        if self._tokens is None:
            self._tokens = self.store.load(self.env)
        if self._tokens is None:
            raise LoginRequired(f"not logged in to {self.env}", _login_step(self.env))
        return self._tokens

    async def access_token(self, *, force_refresh: bool = False) -> str:
        tokens = self.tokens()
        if not force_refresh and not tokens.is_expired(self.clock(), self.leeway):
            return tokens.access_token
        return (await self.refresh(stale=tokens)).access_token

    async def refresh(self, stale: TokenSet | None = None) -> TokenSet:
        """Refresh under the store's lock. If another process refreshed meanwhile (the file
        no longer holds ``stale``), use its tokens instead of spending ours twice."""
        stale = stale or self.tokens()
        async with self._refresh_lock():
            current = self.store.load(self.env)
            if current is None:
                self._tokens = None
                raise LoginRequired(f"logged out of {self.env}", _login_step(self.env))
            if current.refresh_token != stale.refresh_token and not current.is_expired(
                self.clock(), self.leeway
            ):
                self._tokens = current
                return current
            fresh = await self.flow.refresh(current.refresh_token)
            # The old refresh token is spent now: save the new one before anything else.
            self.store.save(self.env, fresh)
            self._tokens = fresh
            return fresh

    @contextlib.asynccontextmanager
    async def _refresh_lock(self) -> AsyncIterator[None]:
        """The store's lock, taken without blocking the event loop (another coroutine of
        this process may hold it while it waits for the network)."""
        deadline = time.monotonic() + LOCK_TIMEOUT
        with contextlib.ExitStack() as stack:
            while True:
                try:
                    stack.enter_context(self.store.lock(self.env, blocking=False))
                    break
                except LockBusy:
                    if time.monotonic() > deadline:
                        raise StoreError(
                            f"another process has held the token lock of {self.env} for "
                            f"{LOCK_TIMEOUT:.0f} s",
                            "try again; if it persists, look for a hung iotref process",
                        ) from None
                    await asyncio.sleep(0.05)
            yield


def _login_step(env: Environment) -> NextStep:
    return run("login").within(Selection.of(env))
