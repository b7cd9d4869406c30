"""Test set-up: 8 simulated CPU devices, and the location of the shared real data."""

import os
import pathlib

import jax
import pytest

# Must happen before the first backend use: every test sees 8 CPU devices.
jax.config.update("jax_num_cpu_devices", 8)

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
