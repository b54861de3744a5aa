"""The training step compiled ahead of time (`ctl_jax.training.ahead`): the same results as
`jax.jit` on first call, the state still donated, arguments of another shape refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctl_jax import parallel
from ctl_jax.training import ahead


def _step(state, batch):
    """A stand-in for the training step: state {w, step} updated from a batch {x}."""
    loss = jnp.mean((batch["x"] @ state["w"]) ** 2)
    grad = jax.grad(lambda w: jnp.mean((batch["x"] @ w) ** 2))(state["w"])
    return {"w": state["w"] - 0.1 * grad, "step": state["step"] + 1}, {"loss": loss}


def _jitted(mesh):
    rep, rows = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return (
        jax.jit(_step, in_shardings=(rep, rows), out_shardings=(rep, rep), donate_argnums=0),
        rep,
        rows,
    )


def _state(mesh):
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    return parallel.replicate({"w": w, "step": np.int32(0)}, mesh)


@pytest.mark.parametrize("devices", [1, 2])
def test_compiled_ahead_matches_jit_and_donates(devices):
    # tests/conftest.py gives the tests four virtual CPU devices.
    assert len(jax.devices()) >= devices, "run with XLA_FLAGS from tests/xla_flags.py"
    mesh = parallel.make_mesh(devices)
    jitted, rep, rows = _jitted(mesh)
    batch = parallel.put_batch({"x": np.arange(32, dtype=np.float32).reshape(8, 4) / 10}, mesh)
    spec_state = ahead.abstract_like(jax.eval_shape(lambda: _state(mesh)), rep)
    spec_batch = ahead.abstract_like(batch, rows)
    compiled = ahead.compile_ahead(jitted, spec_state, spec_batch)

    expected, reference = _state(mesh), _state(mesh)
    for _ in range(3):  # against the same step compiled by jit on first call
        reference, ref_metrics = jitted(reference, batch)
        previous = expected
        expected, metrics = compiled(expected, batch)
        assert previous["w"].is_deleted(), "the state must stay donated"
        np.testing.assert_array_equal(np.asarray(metrics["loss"]), np.asarray(ref_metrics["loss"]))
    np.testing.assert_array_equal(np.asarray(expected["w"]), np.asarray(reference["w"]))
    assert int(expected["step"]) == 3

    other = parallel.put_batch({"x": np.zeros((4, 4), np.float32)}, mesh)
    with pytest.raises(TypeError):
        compiled(expected, other)


def test_reload_only_for_single_process_cpu():
    assert ahead._reloadable() == all(d.platform == "cpu" for d in jax.devices())


def test_step_read_from_the_persistent_cache_runs(tmp_path):
    """A program read back from the persistent compilation cache is kept as it is (serialising
    it again would lose kernels): compiled twice through a fresh cache, both runs compute."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_compilation_cache_dir", {str(tmp_path / "cache")!r})
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        from ctl_jax import parallel
        from ctl_jax.training import ahead
        mesh = parallel.make_mesh(1)
        rep, rows = parallel.replicated(mesh), parallel.batch_sharded(mesh)
        step = jax.jit(lambda s, b: (s + jnp.cos(b["x"]).sum(), jnp.sin(b["x"])),
                       in_shardings=(rep, rows), out_shardings=(rep, rows), donate_argnums=0)
        spec = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
        batch = {{"x": jax.device_put(np.arange(8, dtype=np.float32), rows)}}
        compiled = ahead.compile_ahead(step, spec, ahead.abstract_like(batch, rows))
        state, out = compiled(jax.device_put(np.float32(1), rep), batch)
        print(float(state), float(out.sum()))
        """
    )
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        for _ in range(2)
    ]
    expected = f"{1 + np.cos(np.arange(8)).sum():.4f} {np.sin(np.arange(8)).sum():.4f}"
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
        got = " ".join(f"{float(v):.4f}" for v in run.stdout.split())
        assert got == expected
