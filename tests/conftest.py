"""Tests run with 8 simulated CPU devices so every sharded path is exercised; the flag must be
set before jax is first imported."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


def single_device_mesh():
    from hellochat_jax.core import sharding as shd

    return shd.make_mesh(devices=jax.devices()[:1])


def full_mesh(data=2, fsdp=2, tensor=2):
    from hellochat_jax.core import sharding as shd

    return shd.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})
