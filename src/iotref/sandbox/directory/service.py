"""The sandbox's Directory component: the local stand-in for the Zaikio directory.

It puts together the directory's records (:mod:`~iotref.sandbox.directory.records`), the
OAuth device flow (:mod:`~iotref.sandbox.directory.device_authorization`), the
verification page (:mod:`~iotref.sandbox.directory.verification_page`) and the ``/api/v1``
API (:mod:`~iotref.sandbox.directory.api`). Other components use
:meth:`Directory.authenticate`, :meth:`Directory.site` and
:meth:`Directory.pending_authorizations`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.routing import BaseRoute

from iotref.sandbox.context import SandboxContext
from iotref.sandbox.directory.api import DirectoryApi
from iotref.sandbox.directory.device_authorization import AccessGrant, OAuthServer
from iotref.sandbox.directory.openapi import directory_fragment
from iotref.sandbox.directory.records import DirectoryRecords, Site
from iotref.sandbox.directory.verification_page import VerificationPage

RETENTION_SECONDS = 24 * 3600
"""Ended device requests and tokens are kept this long (for inspection), then purged."""


class Directory:
    """People, organizations, sites, machines and OAuth; see the module docstring."""

    def __init__(self, ctx: SandboxContext, clock: Callable[[], float] = time.time) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.clock = clock
        self.records = DirectoryRecords(ctx.db, clock)
        self.oauth = OAuthServer(ctx, clock)
        self.page = VerificationPage(self.records, self.oauth)
        self.api = DirectoryApi(self.records, self.oauth)

    # -- Component --------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [*self.oauth.routes(), *self.page.routes(), *self.api.routes()]

    async def start(self) -> None:
        self.oauth.purge(self.clock() - RETENTION_SECONDS)
        self.page.purge_sessions()

    async def stop(self) -> None:
        return None

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI fragments of the device flow, the verification page and the API."""
        return directory_fragment()

    # -- what other components use ----------------------------------------------------------

    def authenticate(self, authorization: str | None) -> AccessGrant | None:
        """The grant behind ``Authorization: Bearer <token>``; None if missing, unknown,
        revoked or expired."""
        return self.oauth.authenticate(authorization)

    def site(self, site_id: str) -> Site | None:
        return self.records.site(site_id)

    def pending_authorizations(self) -> list[dict[str, Any]]:
        """Undecided, unexpired device requests: user_code, created_at, expires_at (ISO-8601)
        and verification_uri_complete, oldest first."""
        return self.oauth.pending()
