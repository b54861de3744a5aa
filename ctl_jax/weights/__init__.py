"""Importing PyTorch weights: a safe torch-file reader (`torch_pickle`), state-dict layouts and
architecture inference (`mapping`), and writing ctl_jax checkpoints (`conversion`)."""
