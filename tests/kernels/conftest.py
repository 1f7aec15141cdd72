"""Fixtures for the kernel tests: proving that the Triton path (and which kernel) ran."""

from __future__ import annotations

import importlib

import pytest
import torch

from offload_kernels import kernels

HAS_CUDA = torch.cuda.is_available()

#: Activation dtypes every test runs: the interpreter cannot compute in bfloat16, GPUs can.
X_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float32, torch.float16)


@pytest.fixture(autouse=True)
def heuristic_configs_by_default(monkeypatch):
    """Kernel tests launch the heuristic configs: autotuning every shape the tests use would cost many
    minutes of compiles and benchmarks on a GPU (and never happens under the interpreter anyway). Tests of
    the tuning path turn it back on with monkeypatch.setattr(runtime, "AUTOTUNE", True)."""
    monkeypatch.setattr(importlib.import_module("offload_kernels.kernels.runtime"), "AUTOTUNE", False)


class LaunchCheck:
    """Asserts which Triton kernel variants ran since the fixture started."""

    def __init__(self) -> None:
        kernels.reset_launch_counts()

    def expect(self, **counts: int) -> None:
        got = kernels.launch_counts()
        want = {k: counts.get(k, 0) for k in got}
        assert got == want, f"Triton launches {got}, expected {want}"
        kernels.reset_launch_counts()


@pytest.fixture
def triton_only(monkeypatch) -> LaunchCheck:
    """The torch reference path patched to fail, and launch counters reset: a test using this fixture
    passes only if the Triton kernels computed its results."""
    module = importlib.import_module("offload_kernels.kernels.qmatmul")

    def refuse(*args, **kwargs):
        raise AssertionError("the torch reference path ran instead of the Triton kernels")

    monkeypatch.setattr(module, "torch_qmatmul", refuse)
    monkeypatch.setattr(module, "dequantize", refuse)
    return LaunchCheck()


@pytest.fixture
def poisoned():
    """Buffers the kernels must fully write start as NaN (an element left unwritten fails the check)."""
    with kernels.poison_outputs():
        yield


@pytest.fixture
def gemv_layouts_ran(monkeypatch) -> list:
    """The LAYOUT of every GEMV heuristic config launched while the test runs, in order (the heuristic
    falls back from a layout that cannot run)."""
    configs = importlib.import_module("offload_kernels.kernels.configs")
    layouts = []
    heuristic = configs.gemv_heuristic_config

    def recording(*args, **kwargs):
        config = heuristic(*args, **kwargs)
        layouts.append(config.kwargs["LAYOUT"])
        return config

    monkeypatch.setattr(configs, "gemv_heuristic_config", recording)
    return layouts
