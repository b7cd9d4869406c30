"""Test set-up: 8 simulated CPU devices, a per-process compilation cache, and the location of the shared real
data."""

import atexit
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

# Must happen before the first backend use: every test sees 8 CPU devices.
jax.config.update("jax_num_cpu_devices", 8)

# The suite is compile-bound and many tests compile the same programs again (every `train()` call, models
# rebuilt per test): XLA's persistent cache, private to this process (an xdist worker) and removed at exit,
# hands back the identical executable for an identical program. Subprocesses that tests start do not use it.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="repjax-test-xla-")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _need(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing; under CI the shared data must be present")
        pytest.skip(f"{path} not found (the shared data sits beside the checkout)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """`<repo>/../shared/data`; skips when absent, fails under CI=true."""
    return _need(SHARED / "data")


@pytest.fixture(scope="session")
def shared_weights() -> pathlib.Path:
    """`<repo>/../shared/weights`; skips when absent, fails under CI=true."""
    return _need(SHARED / "weights")
