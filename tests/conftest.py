import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def native_kernels():
    """morph's native kernels, built here if they are not built yet (a C++ compiler and ninja are
    needed: CI has them); the tests that use this fixture skip, with the reason, where they cannot be
    built (e.g. ``CXX=/bin/false``). Nothing else in the suite builds them: morph never compiles on its own."""
    from morph import native

    try:
        native.build(announce=None)
    except native.NativeBuildError as e:
        pytest.skip(f"native kernels not available: {e}")
    return torch.ops.morph


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The long tier: every test over the model zoo, and every test that builds or runs the native kernels,
    is also ``slow`` (run by ``pytest -m slow``; the README's ``pytest -q`` leaves them out)."""
    for item in items:
        if item.get_closest_marker("zoo") is not None or "native_kernels" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
