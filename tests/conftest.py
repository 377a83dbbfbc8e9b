import os

import pytest
from hypothesis import settings

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core (pytest-xdist): one torch thread each, so the
    # two workers do not oversubscribe the two cores (subprocesses a test starts keep the default).
    import torch

    torch.set_num_threads(1)

# CI runs a fixed sequence of examples (a landing must not hang on a lucky draw); local runs
# keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same global RNG state, whichever tests ran before it in its
    process (two pytest workers run different sequences): a test's draws are its own."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module (tiny layers: one thread is faster, far faster on a
    loaded machine; numerics that must not depend on the thread count). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST from the cache (``make test`` fetches it first)."""
    from lipgan import data

    return data.load("mnist")


@pytest.fixture(scope="session")
def artifacts_dir():
    path = os.environ.get("LIPGAN_TEST_ARTIFACTS", "test-artifacts")
    os.makedirs(path, exist_ok=True)
    return path
