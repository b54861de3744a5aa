"""Benchmarks of ctl_jax (each prints JSON); see common.py for how to run them."""
