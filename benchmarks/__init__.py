"""Benchmarks of slkd_jax (run as scripts: ``python benchmarks/<name>.py``).

A package so the scripts and tests can share :mod:`benchmarks.common` and
:mod:`benchmarks.torch_models`.
"""
