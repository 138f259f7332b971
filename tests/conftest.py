"""Test-wide settings: float64 on (the references are float64); 8 host CPU devices."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# With the tpu extra, libtpu is installed to compile for TPU topologies (test_tpu.py);
# the tests run on the CPU, and xdist workers may load libtpu side by side.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_collection_modifyitems(config, items):
    """A libtpu compile (the ``tpu`` marker) runs in CI's slow stage too."""
    import pytest

    for item in items:
        if item.get_closest_marker("tpu") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
