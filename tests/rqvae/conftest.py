"""Fixtures of the pure torch/numpy tests: one intra-op thread while they run.

On a small shared machine two OpenMP threads that spin against other jobs make the tiny training
runs 5-8x slower than one thread, and one thread also keeps float reductions in a fixed order.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
