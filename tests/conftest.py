import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _native_kernels():
    """Build morph's native kernels once, before any test: a first build prints one line on stderr,
    which would otherwise land in the first CLI test's output (the tests check that stderr is empty)."""
    from morph import native

    native.available()
