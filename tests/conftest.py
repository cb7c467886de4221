"""Shared test helpers: deterministic threads and seeds, and the closeness rule used against PML."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative agreement: each entry within ``rtol`` of its reference value, with an absolute
    floor of ``rtol`` times the reference's largest magnitude (near-zero gradient entries are
    judged on the tensor's own scale) and of 8 machine epsilons of the compared dtype (where a
    value is analytically zero, both sides hold rounding noise)."""
    expected = expected.detach().to(actual.dtype)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    noise = 8 * torch.finfo(actual.dtype).eps
    torch.testing.assert_close(actual.detach(), expected, rtol=rtol, atol=max(rtol * scale, noise))


@pytest.fixture
def closed_figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The figures the plotting functions close, kept open for inspection, then closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real_close = plt.close
    captured: list[Any] = []
    monkeypatch.setattr(plt, "close", captured.append)
    yield captured
    for figure in captured:
        real_close(figure)
