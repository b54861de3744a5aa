"""XLA_FLAGS for the test processes and the subprocesses the tests start."""


def xla_flags(devices: int) -> str:
    """`devices` virtual CPU devices, LLVM optimisation level 0: the tests' tiny models
    compile about twice as fast and run fast enough unoptimised (docs/getting-started.md,
    "Two commands")."""
    return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
