"""Shared test setup: the repo root on sys.path, a fixed seed, one CPU thread, GPU tests skipped.

One thread: the toy MLP and the tiny SD models are too small to gain from more, and train_sd flushes
denormals to zero per thread (tiny random models produce denormals that slow a thread pool 10-100x)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minisd_lock(tmp_path_factory):
    """A lock on the reduced miniature SD build, shared by every test process of this run (pytest-xdist's workers
    share the parent of their base temp folders)."""
    import filelock

    return filelock.FileLock(str(_shared_tmp(tmp_path_factory) / "minisd.lock"))


@pytest.fixture(scope="session")
def minisd_build(tmp_path_factory, minisd_lock):
    """The reduced miniature SD build (minisd.py --preset test), once for the whole run: (args, report). Under
    pytest-xdist the first worker builds it, the others wait for the lock and reuse every stage."""
    import minisd

    args = minisd.Args(preset="test", out=str(_shared_tmp(tmp_path_factory) / "minisd" / "test"))
    with minisd_lock:
        return minisd.apply_preset(args), minisd.main(args)


def _shared_tmp(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


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
