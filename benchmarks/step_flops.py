"""FLOPs of a config's training step, from XLA's cost analysis, without running it.

    python -m benchmarks.step_flops configs/market1501.py configs/vit_market1501.py \
        configs/vit_market1501.py:model.vit_stride=16 configs/osnet_market1501.py

Each argument is a config file, optionally followed by `:key=value` overrides of its model
group (`model.arch=vit_s16`, `model.vit_stride=16`; values parsed as Python literals, else
kept as text). The
step is the float32 training step with the reference layers (`cpu_fast_path='off'`: plain
convolutions), 751 classes (Market-1501), the config's P x M batch and image size, lowered
from abstract values (nothing is allocated or run). Prints one JSON line per argument:
`step_gflop_xla` (`Lowered.cost_analysis()["flops"]`) and `step_gflop_conv_matmul` (the
multiply-adds of the convolutions and matrix products in the step's jaxpr, as
`benchmarks/roofline.py` counts them).
"""

from __future__ import annotations

import ast
import json
import sys

NUM_CLASSES = 751


def _literal(text: str):
    """A Python literal (16, None, 'x'), or the text itself (vit_s16)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def step_flops(spec: str) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.roofline import jaxpr_matmul_flops
    from ctl_jax.build import build_model
    from ctl_jax.configs import load_config
    from ctl_jax.models.reid import feature_dim, init_variables
    from ctl_jax.training.optimizer import make_optimizer
    from ctl_jax.training.state import create_train_state
    from ctl_jax.training.step import make_train_step

    path, *overrides = spec.split(":")
    config = load_config(path)
    for item in overrides:
        key, value = item.split("=", 1)
        config.model[key.removeprefix("model.")] = _literal(value)
    model = build_model(config, NUM_CLASSES, cpu_fast_path="off")
    tx = make_optimizer(config.solver)
    shape = (config.data.height, config.data.width, 3)
    dim = feature_dim(config.model.arch)
    state = jax.eval_shape(
        lambda: create_train_state(
            init_variables(model, jax.random.key(0), shape), tx, NUM_CLASSES, dim,
            jax.random.key(1),
        )
    )  # fmt: skip
    n = config.data.num_identities * config.data.num_instances
    batch = {
        "images": jax.ShapeDtypeStruct((n, *shape), jnp.float32),
        "labels": jax.ShapeDtypeStruct((n,), jnp.int32),
        "valid": jax.ShapeDtypeStruct((n,), jnp.bool_),
    }
    step = jax.jit(make_train_step(model, tx, config))
    xla = step.lower(state, batch).cost_analysis()["flops"]
    count = jaxpr_matmul_flops(jax.make_jaxpr(step)(state, batch))
    return {
        "config": spec,
        "arch": config.model.arch,
        "batch": n,
        "image_size": list(shape[:2]),
        "step_gflop_xla": round(xla / 1e9, 1),
        "step_gflop_conv_matmul": round(count / 1e9, 1),
    }


def main(argv=None) -> None:
    specs = (argv if argv is not None else sys.argv[1:]) or ["configs/market1501.py"]
    for spec in specs:
        print(json.dumps(step_flops(spec)), flush=True)


if __name__ == "__main__":
    main()
