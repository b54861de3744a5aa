"""The training step and loop: sharding invariance, optimiser semantics, the center SGD,
compile-once, non-finite losses, and resume-equals-uninterrupted on a tiny synthetic set."""

import copy
import json
import math
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_data import make_tiny_reid

from ctl_jax import parallel
from ctl_jax.build import build_model
from ctl_jax.checkpoints import CheckpointStore, restore_model
from ctl_jax.configs import ADDED_DEFAULTS, config_to_json, load_config
from ctl_jax.cpu import CPU_LAYERS
from ctl_jax.models.layers import REFERENCE_LAYERS
from ctl_jax.models.reid import feature_dim, init_variables
from ctl_jax.training import loop
from ctl_jax.training.optimizer import learning_rate, make_optimizer
from ctl_jax.training.position import DataPosition
from ctl_jax.training.state import create_train_state
from ctl_jax.training.step import make_train_step

P, M, H, W, K = 4, 4, 32, 16, 10


def _config(**data):
    config = load_config("configs/default.py")
    config.data.height, config.data.width = H, W
    config.data.num_identities, config.data.num_instances = P, M
    config.data.pad = 2
    config.solver.warmup_epochs = 2
    config.solver.milestones = (3,)
    config.train.log_every_steps = 1
    config.eval.modes = ()
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def _batch(seed=0, num_padded=3):
    """A fixed P x M batch; the last `num_padded` slots of the last group are padding."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.choice(K, P, replace=False), M).astype(np.int32)
    valid = np.ones(P * M, bool)
    valid[P * M - num_padded :] = False
    images = rng.normal(size=(P * M, H, W, 3)).astype(np.float32)
    images[~valid] = 0.0
    return {"images": images, "labels": labels, "valid": valid}


def _setup(config, mesh):
    model = build_model(config, K)
    tx = make_optimizer(config.solver)
    variables = init_variables(model, jax.random.key(0), (H, W, 3))
    state = create_train_state(variables, tx, K, feature_dim(config.model.arch), jax.random.key(1))
    step = jax.jit(
        make_train_step(model, tx, config),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
    )
    return model, tx, parallel.replicate(state, mesh), step


def _run_steps(num_devices, num_steps=3):
    config = _config()
    # Adam's first update is g / (|g| + eps): with the default eps, a parameter whose gradient
    # is at float-noise level moves by +-lr either way, so two correct reduction orders
    # disagree there. A larger eps keeps the update proportional to such tiny gradients.
    config.solver.eps = 1e-3
    mesh = parallel.make_mesh(num_devices)
    _, _, state, step = _setup(config, mesh)
    states, history = [], []
    for i in range(num_steps):
        state, metrics = step(state, parallel.put_batch(_batch(i), mesh))
        states.append(jax.device_get(state))
        history.append(jax.device_get(metrics))
    return states, history


def test_step_same_on_one_and_four_devices():
    assert jax.device_count() >= 4, "conftest should provide 4 virtual CPU devices"
    states1, hist1 = _run_steps(1)
    states4, hist4 = _run_steps(4)
    for m1, m4 in zip(hist1, hist4):
        for key in m1:
            # Later steps start from parameters that differ by float rounding, which can flip
            # a near-tie in batch-hard mining: the losses stay close, individual parameters
            # need not, hence the parameters are compared after the first step.
            np.testing.assert_allclose(m1[key], m4[key], rtol=5e-3, atol=1e-5, err_msg=key)
    for key in hist1[0]:
        np.testing.assert_allclose(hist1[0][key], hist4[0][key], rtol=1e-5, err_msg=key)
    for name in ("params", "batch_stats", "centers"):
        a, b = getattr(states1[0], name), getattr(states4[0], name)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5, err_msg=name)


def test_metrics_are_reported_and_loss_decreases_on_a_fixed_batch():
    config = _config()
    config.solver.warmup_epochs = 0
    config.solver.base_lr = 1e-3
    mesh = parallel.make_mesh(1)
    _, _, state, step = _setup(config, mesh)
    batch = parallel.put_batch(_batch(0), mesh)
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["total_loss"]))
    expected = {
        "triplet_loss",
        "centroid_loss",
        "ce_loss",
        "center_loss",
        "total_loss",
        "dist_ap",
        "dist_an",
        "centroid_norm",
        "grad_norm",
        "learning_rate",
        "accuracy",
    }
    assert expected <= set(metrics)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert int(state.step) == 6


def test_total_is_the_weighted_sum_of_the_four_losses():
    config = _config()
    mesh = parallel.make_mesh(1)
    _, _, state, step = _setup(config, mesh)
    _, m = step(state, parallel.put_batch(_batch(0), mesh))
    m = jax.device_get(m)
    expected = m["triplet_loss"] + m["ce_loss"] + 5e-4 * m["center_loss"] + m["centroid_loss"]
    np.testing.assert_allclose(m["total_loss"], expected, rtol=1e-5)


def test_centers_take_an_sgd_step_on_the_unweighted_center_loss():
    config = _config()
    mesh = parallel.make_mesh(1)
    model, _, state, step = _setup(config, mesh)
    batch = _batch(0)
    # Features as the step sees them (train mode, batch statistics over valid rows).
    out, _ = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["images"],
        train=True,
        valid=batch["valid"],
        mutable=["batch_stats"],
    )
    feats = np.asarray(out["features"], np.float64)
    centers = np.asarray(state.centers, np.float64)
    # d/dc_k of sum_i ||f_i - c_{y_i}||^2 / n_valid, written as a loop.
    grad = np.zeros_like(centers)
    n_valid = batch["valid"].sum()
    for i in range(P * M):
        if batch["valid"][i]:
            grad[batch["labels"][i]] += 2.0 * (centers[batch["labels"][i]] - feats[i]) / n_valid
    expected = centers - config.loss.center_lr * grad
    new_state, _ = step(state, parallel.put_batch(batch, mesh))
    np.testing.assert_allclose(np.asarray(new_state.centers), expected, rtol=1e-4, atol=1e-4)
    untouched = np.setdiff1d(np.arange(K), batch["labels"])
    np.testing.assert_array_equal(np.asarray(new_state.centers)[untouched], centers[untouched])


def test_learning_rate_schedule_of_the_paper_recipe():
    solver = load_config("configs/market1501.py").solver
    base = solver.base_lr
    expected = {0: base / 10, 4: base / 2, 9: base, 39: base, 40: base * 0.1, 69: base * 0.1}
    expected[70] = base * 0.01
    expected[119] = base * 0.01
    for epoch, lr in expected.items():
        np.testing.assert_allclose(float(learning_rate(epoch, solver)), lr, rtol=1e-6)


def test_adam_with_l2_decay_matches_torch():
    torch = pytest.importorskip("torch")
    solver = load_config("configs/default.py").solver
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5,)).astype(np.float32)
    grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(4)]
    lr = 0.01
    tx = make_optimizer(solver)
    w, opt_state = jnp.asarray(w0), None
    opt_state = tx.init(w)
    for g in grads:
        direction, opt_state = tx.update(jnp.asarray(g), opt_state, w)
        w = w - lr * direction
    tw = torch.tensor(w0.copy(), requires_grad=True)
    opt = torch.optim.Adam([tw], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=5e-4)
    for g in grads:
        tw.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(np.asarray(w), tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_step_compiles_once():
    config = _config()
    mesh = parallel.make_mesh(1)
    _, _, state, step = _setup(config, mesh)
    for i in range(3):
        state = state.replace(epoch=parallel.replicate(jnp.int32(i), mesh))
        state, _ = step(state, parallel.put_batch(_batch(i, num_padded=i), mesh))
    assert step._cache_size() == 1


def test_non_finite_loss_names_the_step_and_losses():
    with pytest.raises(FloatingPointError, match=r"step 17.*total_loss=nan"):
        loop._check_finite(17, {"total_loss": float("nan"), "ce_loss": 1.0, "dist_ap": 0.3})
    loop._check_finite(18, {"total_loss": 1.0, "dist_ap": float("nan")})  # not a loss


# --- the loop, end to end on a tiny synthetic set -----------------------------------------


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_reid")
    make_tiny_reid(root, height=H, width=W)
    return root


def _loop_config(root):
    config = _config(root=str(root))
    config.solver.num_epochs = 2
    config.train.checkpoint_every_steps = 3
    return config


def _final_params(workdir):
    store = CheckpointStore(workdir, read_only=True)
    state = store.restore_raw()
    return state["params"], state["centers"], store.latest_step()


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run_a")
    loop.train_and_evaluate(_loop_config(tiny_dataset), workdir, log=lambda *_: None)
    return workdir


def _interrupt_at(monkeypatch, n: int) -> None:
    """Raises SIGINT while the `n`-th batch of the run is being put on the devices."""
    calls = {"n": 0}
    put_batch = parallel.put_batch

    def put_batch_then_ctrl_c(batch, mesh):
        calls["n"] += 1
        if calls["n"] == n:
            signal.raise_signal(signal.SIGINT)
        return put_batch(batch, mesh)

    monkeypatch.setattr(parallel, "put_batch", put_batch_then_ctrl_c)


def _logged(workdir, kind):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _assert_same_final_state(workdir_a, workdir_b):
    params_a, centers_a, step_a = _final_params(workdir_a)
    params_b, centers_b, step_b = _final_params(workdir_b)
    assert step_a == step_b
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(centers_a, centers_b, rtol=1e-5, atol=1e-6)
    # The log continues where it stopped: every step logged once, in order.
    assert [r["step"] for r in _logged(workdir_b, "train")] == list(range(1, step_b + 1))


def test_interrupted_and_resumed_run_equals_uninterrupted(
    tiny_dataset, uninterrupted, tmp_path, monkeypatch
):
    workdir = tmp_path / "run_b"
    _interrupt_at(monkeypatch, 5)  # mid-way through the first epoch, between two saves
    with pytest.raises(loop.TrainingInterrupted, match="step 5"):
        loop.train_and_evaluate(_loop_config(tiny_dataset), workdir, log=lambda *_: None)
    store = CheckpointStore(workdir, read_only=True)
    assert store.latest_step() == 5
    saved = store.read_data_position()  # mid-epoch: the grain state and the batches done
    assert set(saved) == {"epoch", "iterator", "batches_done"}
    assert (saved["epoch"], saved["batches_done"]) == (0, 5)
    monkeypatch.undo()
    loop.train_and_evaluate(_loop_config(tiny_dataset), workdir, log=lambda *_: None)
    _assert_same_final_state(uninterrupted, workdir)


def test_stop_on_an_epochs_last_step_saves_once_and_evaluates_on_resume(
    tiny_dataset, uninterrupted, tmp_path, monkeypatch
):
    # A stop on the last step of an epoch once saved that step twice (mid-epoch position,
    # then the end-of-epoch checkpoint), which orbax refuses; resuming then failed.
    config = _loop_config(tiny_dataset)
    config.eval.modes = ("instance",)
    config.train.eval_every_epochs = 1
    first_epoch = sum(r["epoch"] == 1 for r in _logged(uninterrupted, "train"))
    assert first_epoch % config.train.checkpoint_every_steps != 1  # a real stop, not a save
    workdir = tmp_path / "run_c"
    _interrupt_at(monkeypatch, first_epoch)
    with pytest.raises(loop.TrainingInterrupted, match=f"step {first_epoch} "):
        loop.train_and_evaluate(config, workdir, log=lambda *_: None)
    store = CheckpointStore(workdir, read_only=True)
    assert store.latest_step() == first_epoch
    # Saved as the end of epoch 1 without waiting for its evaluation, which is due.
    saved = store.read_data_position()
    assert saved == {"epoch": 1, "iterator": None, "evaluation_pending": True}  # the format
    assert DataPosition.from_json(saved) == DataPosition(1, evaluation_pending=True)
    assert _logged(workdir, "eval") == []
    monkeypatch.undo()
    loop.train_and_evaluate(config, workdir, log=lambda *_: None)
    _assert_same_final_state(uninterrupted, workdir)
    evaluations = _logged(workdir, "eval")
    assert [(r["step"], r["epoch"]) for r in evaluations] == [
        (first_epoch, 1),
        (_final_params(workdir)[2], 2),
    ]
    assert all(0 <= r["instance/mAP"] <= 1 for r in evaluations)


@pytest.mark.parametrize(
    "saved",
    [
        {"epoch": 0, "iterator": {"next_index": 12, "grain": "state"}, "batches_done": 3},
        {"epoch": 2, "iterator": None},
        {"epoch": 2, "iterator": None, "evaluation_pending": True},
    ],
)
def test_data_position_reads_and_writes_the_checkpoint_json(saved):
    position = DataPosition.from_json(saved)
    assert position.to_json() == saved
    assert position.mid_epoch == (saved["iterator"] is not None)
    assert position.evaluation_pending == saved.get("evaluation_pending", False)


def test_finished_run_is_not_retrained(tiny_dataset, uninterrupted):
    before = CheckpointStore(uninterrupted, read_only=True).all_steps()
    loop.train_and_evaluate(_loop_config(tiny_dataset), uninterrupted, log=lambda *_: None)
    assert CheckpointStore(uninterrupted, read_only=True).all_steps() == before


def test_workdir_of_another_config_is_refused(tiny_dataset, uninterrupted):
    config = _loop_config(tiny_dataset)
    config.model.arch = "resnet34"
    with pytest.raises(loop.WorkdirMismatchError, match="model.arch"):
        loop.train_and_evaluate(config, uninterrupted, log=lambda *_: None)
    saved = json.loads((uninterrupted / "config.json").read_text())
    assert saved["model"]["arch"] == "resnet18"


def _saved_before_cpu_fast_path(config_dict: dict) -> dict:
    """A config as earlier versions saved it: `model.fast_1x1` and `model.fast_ops`, no
    top-level `cpu_fast_path`."""
    old = copy.deepcopy(config_dict)
    del old["cpu_fast_path"]
    old["model"].update(fast_1x1=True, fast_ops=False)
    return old


def test_workdir_saved_before_cpu_fast_path_resumes(tiny_dataset, uninterrupted, tmp_path):
    workdir = tmp_path / "old"
    shutil.copytree(uninterrupted, workdir)
    saved = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps(_saved_before_cpu_fast_path(saved)))
    before = CheckpointStore(workdir, read_only=True).all_steps()
    loop.train_and_evaluate(_loop_config(tiny_dataset), workdir, log=lambda *_: None)
    assert CheckpointStore(workdir, read_only=True).all_steps() == before
    assert json.loads((workdir / "config.json").read_text())["cpu_fast_path"] == "auto"


def test_workdir_saved_before_the_retrieval_heads_resumes(tiny_dataset, uninterrupted, tmp_path):
    # A config.json without model.pooling / gem_* / rmac_levels, loss.metric / classifier /
    # scale / classifier_margin / easy_margin and cpu_recompute (configs.ADDED_DEFAULTS) is
    # the same run.
    workdir = tmp_path / "old"
    shutil.copytree(uninterrupted, workdir)
    saved = json.loads((workdir / "config.json").read_text())
    for dotted in ADDED_DEFAULTS:
        *groups, key = dotted.split(".")
        node = saved
        for group in groups:
            node = node[group]
        del node[key]
    (workdir / "config.json").write_text(json.dumps(saved))
    before = CheckpointStore(workdir, read_only=True).all_steps()
    loop.train_and_evaluate(_loop_config(tiny_dataset), workdir, log=lambda *_: None)
    assert CheckpointStore(workdir, read_only=True).all_steps() == before
    # A head that differs from the saved (default) one is another run.
    config = _loop_config(tiny_dataset)
    config.model.pooling = "gem"
    with pytest.raises(loop.WorkdirMismatchError, match="model.pooling: saved 'avg', now 'gem'"):
        loop.train_and_evaluate(config, workdir, log=lambda *_: None)


def test_checkpoint_saved_before_cpu_fast_path_restores(tmp_path):
    config = _config()
    variables = jax.device_get(init_variables(build_model(config, K), jax.random.key(0), (H, W, 3)))
    meta_config = _saved_before_cpu_fast_path(json.loads(config_to_json(config)))
    store = CheckpointStore(tmp_path)
    store.save(1, dict(variables), {"epoch": 1}, {"config": meta_config, "num_classes": K})
    store.close()
    restored = restore_model(tmp_path)
    assert restored.model.layers is CPU_LAYERS  # "auto", on the CPU backend in float32
    jax.tree.map(np.testing.assert_array_equal, restored.variables, dict(variables))
    # A config given when restoring chooses how the model runs.
    config.cpu_fast_path = "off"
    assert restore_model(tmp_path, config=config).model.layers is REFERENCE_LAYERS


def test_bfloat16_step_keeps_float32_state_and_finite_losses():
    config = _config()
    config.model.dtype = "bfloat16"
    mesh = parallel.make_mesh(2)
    _, _, state, step = _setup(config, mesh)
    for i in range(2):
        state, metrics = step(state, parallel.put_batch(_batch(i), mesh))
    assert all(math.isfinite(float(v)) for v in jax.device_get(metrics).values())
    for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state, state.centers)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
