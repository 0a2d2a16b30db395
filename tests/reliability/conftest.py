"""Fixtures of the reliability scenarios: one sandbox of their own (its broker is killed
and it is restarted here), and a fresh device per scenario."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.harness import Platform
from tests.support.device_keys import DeviceFiles
from tests.support.tokens import provision_device


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A sandbox that the scenarios may kill and restart."""
    p = Platform(tmp_path_factory.mktemp("reliability-sandbox"))
    yield p
    p.stop()


@pytest.fixture
def device(platform: Platform, tmp_path: Path) -> DeviceFiles:
    """A freshly provisioned device of :func:`platform`."""
    return provision_device(platform.process, directory=tmp_path / "device")
