"""Shared test setup: the repo root on sys.path, a fixed seed, one CPU thread, GPU tests skipped.

One thread: the toy MLP and the tiny SD models are too small to gain from more, and train_sd flushes
denormals to zero per thread (tiny random models produce denormals that slow a thread pool 10-100x)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
