"""Fixtures for the transfer-engine tests."""

from __future__ import annotations

import pytest

from offload_kernels.engine import TransferEngine


@pytest.fixture
def make_engine():
    """Factory for engines that are closed at the end of the test, whatever happens."""
    engines: list[TransferEngine] = []

    def make(*args, **kwargs) -> TransferEngine:
        eng = TransferEngine(*args, **kwargs)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.close()

