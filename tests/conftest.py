import os

import pytest


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
