"""The onboarding API for one environment and one certificate store: log in with the device
flow, provision a machine (:mod:`iotref.device.onboarding.provisioning`) and check the store.
:class:`Onboarding` is the asyncio API; :class:`iotref.device.blocking.BlockingOnboarding`
wraps it for scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

from iotref.device.errors import StoreError
from iotref.device.onboarding.auth import Authenticator
from iotref.device.onboarding.certificate_store import (
    STAGING_DIR,
    CertificateStore,
    default_store_path,
)
from iotref.device.onboarding.device_flow import (
    Bearer,
    Clock,
    DeviceAuthorization,
    DeviceFlowClient,
    PollEvent,
    Sleep,
)
from iotref.device.onboarding.directory_client import DirectoryClient
from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.http_client import create_http_client
from iotref.device.onboarding.next_steps import Selection
from iotref.device.onboarding.provisioning import (
    Provisioner,
    ProvisionOptions,
    ProvisionResult,
    StepCallback,
)
from iotref.device.onboarding.provisioning_client import ProvisioningClient
from iotref.device.onboarding.store_checks import (
    DEFAULT_EXPIRY_THRESHOLD_DAYS,
    StoreReport,
    check_store,
)
from iotref.device.onboarding.token_store import TokenStore

log = logging.getLogger(__name__)

AuthorizationCallback = Callable[[DeviceAuthorization], Awaitable[None] | None]


@dataclass(frozen=True)
class LoginResult:
    """A finished login, without secrets."""

    environment: Environment
    bearer: Bearer | None
    scope: str
    expires_at: float
    token_path: Path


@dataclass(frozen=True)
class LoginStatus:
    """What the token store says, without the network and without secrets."""

    logged_in: bool
    token_path: Path
    bearer: Bearer | None = None
    access_token_expires_at: float | None = None
    problem: str | None = None


class Onboarding:
    """Login, provisioning and checks for one environment and one certificate store.

    Use as ``async with Onboarding(env) as onboarding: ...``; pass ``http`` to share a
    client (it is then not closed here)."""

    def __init__(
        self,
        env: Environment,
        *,
        store_path: Path | None = None,
        token_store: TokenStore | None = None,
        http: httpx.AsyncClient | None = None,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        on_step: StepCallback | None = None,
    ) -> None:
        self.env = env
        #: ``store_path`` as given (None: the default), and with the environment the
        #: selection that next steps carry, so that they run as printed.
        self.store_option = store_path
        self.selection = Selection.of(env, store_path)
        self.store = CertificateStore(
            store_path or default_store_path(env.name), selection=self.selection
        )
        self.token_store = token_store or TokenStore()
        self._owns_http = http is None
        self.http = http or create_http_client()
        self.clock = clock
        self.on_step = on_step
        self.flow = DeviceFlowClient(env, self.http, clock=clock, sleep=sleep)
        self.auth = Authenticator(env, self.token_store, self.flow, clock=clock)
        self.directory = DirectoryClient(env, self.http, self.auth)
        self.provisioning = ProvisioningClient(env, self.http, self.auth)

    async def __aenter__(self) -> Onboarding:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self.http.aclose()

    # -- login --------------------------------------------------------------------------------

    async def login(
        self,
        on_authorization: AuthorizationCallback | None = None,
        on_poll: Callable[[PollEvent], None] | None = None,
    ) -> LoginResult:
        """Run the device flow; ``on_authorization`` shows the person what to open. The
        tokens are saved for this environment (replacing earlier ones)."""
        authorization = await self.flow.authorize()
        if on_authorization is not None:
            shown = on_authorization(authorization)
            if inspect.isawaitable(shown):
                await shown
        tokens = await self.flow.poll(authorization, on_poll)
        path = self.token_store.save(self.env, tokens)
        self.auth.use(tokens)
        log.info("logged in to %s", self.env)
        return LoginResult(self.env, tokens.bearer, tokens.scope, tokens.expires_at, path)

    def logout(self) -> bool:
        """Delete this environment's tokens; False if there were none."""
        self.auth.use(None)
        return self.token_store.delete(self.env)

    def login_status(self) -> LoginStatus:
        path = self.token_store.path_for(self.env)
        try:
            tokens = self.token_store.load(self.env)
        except StoreError as exc:
            return LoginStatus(False, path, problem=exc.reason)
        if tokens is None:
            return LoginStatus(False, path)
        return LoginStatus(True, path, tokens.bearer, tokens.expires_at)

    async def access_token(self) -> str:
        """A valid access token (refreshed if needed) for this environment's services."""
        return await self.auth.access_token()

    # -- checks -------------------------------------------------------------------------------

    def check(self, threshold_days: float = DEFAULT_EXPIRY_THRESHOLD_DAYS) -> StoreReport:
        """Check the certificate store locally (see :mod:`iotref.device.onboarding.store_checks`).

        An interrupted store update is finished first, unless a provisioning run holds
        the store (then its update is in progress, not interrupted)."""
        if self.store.file(STAGING_DIR).exists():
            with contextlib.suppress(StoreError), self.store.lock():
                self.store.recover()
        return check_store(
            self.store,
            expected=self.env.identity,
            threshold_days=threshold_days,
        )

    # -- provisioning -------------------------------------------------------------------------

    async def provision(self, options: ProvisionOptions | None = None) -> ProvisionResult:
        """Provision this device into the store, continue an interrupted run, reuse a
        complete store, or (``renew``) replace its key and certificate."""
        provisioner = Provisioner(
            self.env,
            self.store,
            self.selection,
            self.auth,
            self.directory,
            self.provisioning,
            self.on_step,
        )
        return await provisioner.provision(options or ProvisionOptions())
