"""The training loop: `train_and_evaluate(config, workdir)`.

Resumes by itself from the latest checkpoint in `workdir` (model, optimiser, centers, epoch
and the input pipeline's position), logs to the terminal, `metrics.jsonl` and TensorBoard,
evaluates periodically, and on Ctrl-C / SIGTERM saves a checkpoint before it exits.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from ctl_jax import config_schema, files, parallel
from ctl_jax import configs as config_lib
from ctl_jax.build import build_model
from ctl_jax.checkpoints import CheckpointStore
from ctl_jax.checkpoints.store import warn_on_stderr
from ctl_jax.cpu.malloc import release_free_memory
from ctl_jax.data import pipeline
from ctl_jax.data.source import check_trainable, load_dataset
from ctl_jax.errors import NonFiniteLossError, WorkdirMismatchError
from ctl_jax.evaluator import Evaluator, resolve_evaluation
from ctl_jax.models.reid import feature_dim
from ctl_jax.progress import progress_bar
from ctl_jax.training import ahead
from ctl_jax.training.initialisation import init_train_state, with_init_checkpoint
from ctl_jax.training.logbook import MetricsLog, flatten_eval
from ctl_jax.training.optimizer import make_optimizer
from ctl_jax.training.position import DataPosition
from ctl_jax.training.state import TrainState
from ctl_jax.training.step import check_head_config, make_train_step
from ctl_jax.training.workdir_lock import workdir_lock

# Batch key and metric of the multi-process stop vote (see `_with_stop_vote`).
STOP_VOTE = "stop_vote"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM arrived; a checkpoint was saved first.

    `signal_number` is the signal that stopped the run (the command lines exit with
    128 + it: 130 for Ctrl-C, 143 for SIGTERM). A process of a multi-process run that was
    not signalled itself but stopped on the others' vote reports SIGTERM, the signal of a
    preemption."""

    def __init__(self, message: str, signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.signal_number = int(signal_number)


def _stop_signal(stop: dict) -> int:
    return stop["signal"] if stop["signal"] is not None else signal.SIGTERM


def check_workdir(config, workdir: pathlib.Path) -> None:
    """Checks that the run in `workdir`, if any, is this config's (reads only)."""
    saved_path = workdir / "config.json"
    if saved_path.exists() and (workdir / "checkpoints").is_dir():
        saved = json.loads(saved_path.read_text())
        current = json.loads(config_lib.config_to_json(config))
        diffs = config_lib.identity_differences(saved, current)
        if diffs:
            raise WorkdirMismatchError(
                f"work directory {workdir} holds checkpoints of a different config "
                f"({'; '.join(diffs[:3])}); use another --workdir to start a new run"
            )


def save_config(config, workdir: pathlib.Path) -> None:
    """Writes `<workdir>/config.json` (process 0), atomically."""
    if jax.process_index() == 0:
        saved_path = workdir / "config.json"
        with files.atomic_open(saved_path, "w") as f:
            f.write(config_lib.config_to_json(config))


@contextlib.contextmanager
def stop_requests():
    """Turns SIGINT/SIGTERM into a flag the loop polls between steps, so the step in flight
    finishes and a checkpoint is written before the process exits."""
    flag = {"signal": None}

    def handler(signum, _frame):
        if flag["signal"] is not None:  # second Ctrl-C: stop now
            raise TrainingInterrupted("stopped without saving a checkpoint", signum)
        flag["signal"] = signum

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread (e.g. a notebook worker): no handler
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _check_finite(step: int, metrics: dict) -> None:
    loss_values = {k: float(v) for k, v in metrics.items() if k.endswith("loss")}
    if not all(math.isfinite(v) for v in loss_values.values()):
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(loss_values.items()))
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: {shown}. Lower solver.base_lr or check the data."
        )


def train_and_evaluate(config, workdir: str | pathlib.Path, log=print) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints) and evaluates.

    Resumes from the newest readable checkpoint (newer unreadable ones are reported on
    stderr and moved aside, see `CheckpointStore.restore`).

    Returns:
      The final evaluation results {mode: metrics} (empty if no evaluation mode is set).

    Raises:
      ConfigError: a numeric config value out of its range (`ctl_jax.config_schema`), or a
        head setting that cannot work; raised before anything is read or written.
      WorkdirInUseError: another training holds `workdir` (see `workdir_lock`).
      CheckpointError: `workdir` holds checkpoints of which none can be read.
      TrainingInterrupted: Ctrl-C or SIGTERM, after a checkpoint was saved.
    """
    workdir = pathlib.Path(workdir)
    config_schema.check(config)  # a value out of range fails before anything is read
    check_head_config(config)  # a bad head setting fails before anything is written
    # One training per work directory; in a multi-process run process 0 holds the lock for
    # all (see ctl_jax/training/workdir_lock.py).
    with workdir_lock(workdir, take=jax.process_index() == 0):
        return _train_and_evaluate(config, workdir, log)


def _train_and_evaluate(config, workdir: pathlib.Path, log) -> dict:
    warn = warn_on_stderr
    if jax.process_index() != 0:  # in a multi-process run, process 0 speaks for all
        log = warn = _silent
    files.make_folder(workdir)
    # Nothing is written into the work directory before the checkpoint to resume from has
    # been read: a failed resume leaves the run as it was.
    check_workdir(config, workdir)
    dataset, readers = load_dataset(config.data)
    # "auto" evaluation modes and monitor follow the data (its cameras, its protocol); from
    # here on, config.json and the checkpoints' meta hold what is used.
    config, evaluation_line = resolve_evaluation(config, dataset)
    check_trainable(dataset, evaluates=bool(config.eval.modes))
    log(dataset.statistics_table())
    if evaluation_line:
        log(evaluation_line)
    num_classes = dataset.num_classes

    mesh = parallel.make_mesh()
    parallel.check_batch_layout(config.data.num_identities, config.data.num_instances, mesh)
    model = build_model(config, num_classes)
    tx = make_optimizer(config.solver)
    image_shape = (config.data.height, config.data.width, 3)

    def init_state() -> TrainState:
        dim = feature_dim(config.model.arch)
        return init_train_state(model, tx, num_classes, dim, image_shape, config.seed)

    store = CheckpointStore(workdir, config.train.keep_checkpoints, config.train.monitor)
    state_sharding = parallel.replicated(mesh)
    abstract = ahead.abstract_like(jax.eval_shape(init_state), state_sharding)
    # Compiled before the state is created or restored, so that the compiler's working
    # memory does not come on top of it (see ctl_jax/training/ahead.py).
    step_fn = _compile_step(model, tx, config, mesh, abstract)
    if store.latest_step() is not None:
        # The newest readable checkpoint: unreadable newer ones are reported and moved aside.
        state, data, _ = store.restore(abstract, warn=warn)
        position = DataPosition.from_json(data)
        log(f"resumed from {store.directory} at step {int(state.step)}")
    else:
        initial = with_init_checkpoint(
            init_state(), config.model, log, image_size=(config.data.height, config.data.width)
        )
        state = parallel.replicate(initial, mesh)
        position = DataPosition()
    ahead.release_compiler_memory()  # of the initialiser or the restoring
    save_config(config, workdir)

    meta = {"config": json.loads(config_lib.config_to_json(config)), "num_classes": num_classes}
    evaluator = Evaluator(model, dataset, readers, config, mesh)
    metrics_log = MetricsLog(workdir)
    pcfg = pipeline.TrainPipelineConfig.from_run_config(config)
    train_pids = dataset.train.pids
    num_epochs = config.solver.num_epochs
    results = {}
    iterator = None
    try:
        with stop_requests() as stop:
            step = int(state.step)
            if position.evaluation_pending:
                # Stopped on the last step of an epoch whose evaluation was due: that
                # checkpoint was saved without waiting for it, so it runs now.
                epoch_done = position.epoch
                results, _ = _evaluate(evaluator, state, step, epoch_done, config, metrics_log, log)
            if position.epoch < num_epochs:
                # One iterator for the rest of the run: its worker processes start once, not
                # every epoch, and prepare the next epoch's batches during the evaluation.
                # Mid-epoch it starts at the first batch not trained (a batch is a function
                # of the seed, the epoch and its number).
                iterator = pipeline.make_train_iterator(
                    dataset.train,
                    readers["train"],
                    pcfg,
                    position.epoch,
                    process_index=jax.process_index(),
                    process_count=jax.process_count(),
                    epochs=num_epochs - position.epoch,
                    start_batch=position.batches_done if position.mid_epoch else 0,
                )
            for epoch in range(position.epoch, num_epochs):
                state = state.replace(epoch=parallel.replicate(jnp.int32(epoch), mesh))
                done = position.batches_done if position.mid_epoch else 0
                total = pipeline.train_batches_per_epoch(
                    train_pids, pcfg.P, pcfg.M, config.seed, epoch
                )
                state, step, interrupted = _run_epoch(
                    step_fn,
                    state,
                    iterator,
                    mesh,
                    config,
                    epoch,
                    done,
                    total,
                    store,
                    meta,
                    metrics_log,
                    stop,
                )
                eval_due = bool(config.eval.modes) and (
                    (epoch + 1) % config.train.eval_every_epochs == 0 or epoch + 1 == num_epochs
                )
                eval_metrics = None
                # A stop does not wait for a due evaluation: the resumed run runs it.
                position = DataPosition(epoch + 1, evaluation_pending=eval_due and interrupted)
                if eval_due and not interrupted:
                    results, eval_metrics = _evaluate(
                        evaluator, state, step, epoch + 1, config, metrics_log, log
                    )
                store.save(step, state, position.to_json(), meta, eval_metrics)
                if interrupted:
                    store.wait()
                    raise TrainingInterrupted(
                        _stopped_message(step, epoch, store), _stop_signal(stop)
                    )
            if not results and config.eval.modes:
                results = evaluator.run(state, config.eval.modes)
    finally:
        if iterator is not None:
            iterator.close()  # its worker processes, if any
        store.close()
        metrics_log.close()
    return results


def _silent(*_args, **_kwargs) -> None:
    pass


def _evaluate(evaluator, state, step, epoch, config, metrics_log, log) -> tuple[dict, dict]:
    """Runs the configured evaluation modes after epoch `epoch` (1-based), logs and prints
    them; returns the results and their flat metrics."""
    results = evaluator.run(state, config.eval.modes)
    release_free_memory()  # the evaluation's buffers (see ctl_jax/cpu/malloc.py)
    flat = flatten_eval(results)
    metrics_log.write("eval", step, flat, epoch=epoch)
    log(f"epoch {epoch} evaluation (step {step}):\n{evaluator.table(results)}")
    return results, flat


def _compile_step(model, tx, config, mesh, state_spec):
    """The training step (`make_train_step`, with the stop vote in multi-process runs) jitted
    with the state donated and compiled for `state_spec` and the pipeline's batches."""
    train_step = make_train_step(model, tx, config)
    batch_spec = pipeline.train_batch_spec(config)
    if jax.process_count() > 1:
        train_step = _with_stop_vote(train_step)
        batch_spec[STOP_VOTE] = (batch_spec["labels"][0], np.dtype(np.int32))
    state_sharding = parallel.replicated(mesh)
    batch_sharding = parallel.batch_sharded(mesh)
    jitted = jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, state_sharding),
        donate_argnums=0,
    )
    batch_abstract = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
        for k, (shape, dtype) in batch_spec.items()
    }
    return ahead.compile_ahead(jitted, state_spec, batch_abstract)


def _stopped_message(step, epoch, store) -> str:
    return (
        f"stopped at step {step} (epoch {epoch + 1}); checkpoint saved in "
        f"{store.directory}. Run the same command again to resume."
    )


def _with_stop_vote(train_step):
    """Wraps the step for multi-process runs so that the processes agree on when to stop.

    Ctrl-C or a SIGTERM (e.g. a TPU preemption) may reach the processes at different steps,
    but a checkpoint save is collective: every process must save the same step. Each process
    adds its request (0 or 1, one per batch row) to its rows of the batch; the step returns
    the maximum over the global batch as a replicated metric, so every process reads the same
    verdict for the same step and all of them save and stop together.
    """

    def step(state, batch):
        batch = dict(batch)
        vote = batch.pop(STOP_VOTE)
        state, metrics = train_step(state, batch)
        return state, {**metrics, STOP_VOTE: jnp.max(vote)}

    return step


def _run_epoch(
    step_fn, state, iterator, mesh, config, epoch, done, total, store, meta, metrics_log, stop
) -> tuple[TrainState, int, bool]:
    """Runs the remaining steps of one epoch.

    Returns:
      The new state, the step count, and whether a stop was requested on the epoch's last
      step (a stop earlier in the epoch saves a checkpoint here and raises
      `TrainingInterrupted`; one on the last step leaves the saving to the caller, whose
      end-of-epoch checkpoint of the same step would otherwise collide with it).

    Metrics of step t are fetched to the host only after step t+1 was dispatched, so the
    finiteness check and logging never stall the device. In a multi-process run a stop
    request is acted on one step later, when the vote in step t's metrics is read: then
    every process stops after the same step t+1.
    """
    step = int(state.step)
    pending = None  # (step, device metrics) of the previous step
    images_per_step = config.data.num_identities * config.data.num_instances
    bar = progress_bar(
        total=total,
        initial=done,
        desc=f"epoch {epoch + 1}/{config.solver.num_epochs}",
        enabled=jax.process_index() == 0,
        dynamic_ncols=True,
    )
    t_last, n_last = time.perf_counter(), 0
    voting = jax.process_count() > 1
    stop_agreed = interrupted = False
    # XLA's CPU runtime allocates a step's temporary buffer when the step is dispatched, not
    # when it starts: dispatching step t+1 while step t runs holds two of them (2 x 7 GB for
    # ResNet-50 256x128 P16xM4), and the heap keeps that peak. So on CPU the next step is
    # dispatched once the previous one has finished; its batch is still loaded and placed
    # during it. (The command lines also make single-device CPU execution synchronous, which
    # closes the remaining gap: the last step's buffer being freed just after its outputs
    # are ready; see ctl_jax/cli.py.) Accelerators allocate in stream order and keep the
    # full pipelining.
    one_step_in_flight = all(d.platform == "cpu" for d in mesh.devices.flat)
    try:
        # The iterator runs on into the next epochs: take this epoch's batches only.
        for batch in itertools.islice(iterator, total - done):
            if voting:
                requested = stop["signal"] is not None
                batch[STOP_VOTE] = np.full(len(batch["labels"]), requested, np.int32)
            placed = parallel.put_batch(batch, mesh)
            if one_step_in_flight:
                jax.block_until_ready(state)
            state, metrics = step_fn(state, placed)
            step += 1
            done += 1
            bar.update(1)
            if pending is not None:
                host = _log_step(*pending, config, metrics_log, bar, epoch)
                stop_agreed = voting and host[STOP_VOTE] > 0
            pending = (step, metrics)
            n_last += 1
            if step % config.train.log_every_steps == 0:
                now = time.perf_counter()
                bar.set_postfix_str(
                    f"img/s={n_last * images_per_step / max(now - t_last, 1e-9):.0f}", refresh=False
                )
                t_last, n_last = now, 0
            interrupted = stop_agreed if voting else stop["signal"] is not None
            # The end-of-epoch checkpoint (saved by the caller) covers the last step.
            if interrupted and done == total:
                break
            periodic = step % config.train.checkpoint_every_steps == 0 and done < total
            if interrupted or periodic:
                # The same in every process (each holds the position in its own share of
                # the epoch), so process 0's copy serves all of them.
                position = DataPosition(epoch, {"batches_done": done}, batches_done=done)
                store.save(step, state, position.to_json(), meta)
            if interrupted:
                _log_step(*pending, config, metrics_log, bar, epoch)
                store.wait()
                raise TrainingInterrupted(_stopped_message(step, epoch, store), _stop_signal(stop))
        if pending is not None:
            _log_step(*pending, config, metrics_log, bar, epoch)
    finally:
        bar.close()
    return state, step, interrupted


def _log_step(step, metrics, config, metrics_log, bar, epoch) -> dict:
    """Fetches step `step`'s metrics, checks the losses are finite and logs them.

    Returns:
      The metrics as floats, including the multi-process stop vote (which is not logged).
    """
    host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    _check_finite(step, host)
    if step % config.train.log_every_steps == 0:
        logged = {k: v for k, v in host.items() if k != STOP_VOTE}
        metrics_log.write("train", step, logged, epoch=epoch + 1)
        shown = {
            k: logged[k]
            for k in ("total_loss", "triplet_loss", "contrastive_loss", "centroid_loss", "ce_loss")
            if k in logged
        }
        bar.set_description_str(
            f"epoch {epoch + 1}/{config.solver.num_epochs} "
            + " ".join(f"{k.replace('_loss', '')}={v:.3f}" for k, v in shown.items())
        )
    return host
