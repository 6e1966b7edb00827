"""Shared test setup.

* One intra-op thread per process: the CI machine has 2 cores and multi-process tests run
  several ranks at once (oversubscription is ~5x slower).
* Marker ``gpu``: needs CUDA; skipped cleanly without it.
* Every test has a timeout (pytest-timeout, see setup.cfg); multi-process helpers in
  tests/_dist.py add their own per-process timeouts so a hung peer fails fast.
"""
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# Without a GPU the Triton kernels run in Triton's interpreter. It must be chosen before any
# module defining a @triton.jit kernel is imported, hence here, first thing in the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def single_group():
    """A world-size-1 gloo group in this process (repeatable), for single-process DiLoCo tests."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
