"""Benchmarks of jax_roialign against torchvision (CPU) and a naive JAX port.

Run ``python -m benchmarks --help``; import :mod:`benchmarks.harness` for the
measurement functions (``time_fn``, ``workloads``, ``run_workload``,
``run_benchmarks``, ``run_sweep``).
"""
