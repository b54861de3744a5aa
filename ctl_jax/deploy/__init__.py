"""Deployment: the model exported for other runtimes (ONNX, serialised StableHLO) and the
HTTP search service. The entry points are `ctl_jax.export` and `ctl_jax.serve`."""
