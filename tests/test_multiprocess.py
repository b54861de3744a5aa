"""Multi-process data parallelism on localhost, with the gloo CPU collectives.

Two processes with one CPU device each form a global mesh of two devices. They train (a SIGTERM
reaching only one of them mid-run must stop both after the same step, with one collective
checkpoint), resume, and evaluate; then two processes with two devices each evaluate the
checkpoint. Everything must equal one process with two devices on the same global batches:
with two participants every cross-device sum is a + b in either order, so the runs agree to
the last bit, and the comparison can be strict over every step (with more participants the
reduction order differs between gloo and XLA's in-process collectives, and the rounding
differences grow step by step through batch-hard mining and Adam).

Also the settings parser of `ctl_jax.distributed` (flags / environment variables).
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tiny_data import make_tiny_reid
from xla_flags import xla_flags

from ctl_jax import distributed
from ctl_jax.checkpoints import CheckpointStore

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES, LOCAL_DEVICES = 2, 1
PHASE_TIMEOUT = 300  # seconds for one multi-process command, compilation included

CONFIG_TEMPLATE = '''"""Tiny multi-process test config: 32x16 images, P=4 x M=4, ResNet-18."""

from ctl_jax.configs import load_config


def get_config():
    config = load_config({default!r})
    config.name = "tiny_multiprocess"
    config.data.root = {root!r}
    config.data.height, config.data.width = 32, 16
    config.data.num_identities, config.data.num_instances = 4, 4
    config.data.pad = 2
    config.data.eval_batch_size = 16
    config.solver.warmup_epochs = 2
    config.solver.milestones = (3,)
    config.solver.num_epochs = 2
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 3
    config.eval.modes = ("instance", "centroid")
    return config
'''


# --- settings -------------------------------------------------------------------------------


def test_multiprocess_settings_default_to_a_single_process():
    assert distributed.resolve_settings({}) is None
    assert distributed.resolve_settings({"CTL_JAX_DISTRIBUTED": "off"}) is None
    assert distributed.maybe_initialize({}) is False


def test_multiprocess_settings_from_the_environment():
    env = {
        "CTL_JAX_COORDINATOR": "10.0.0.1:1234",
        "CTL_JAX_NUM_PROCESSES": "4",
        "CTL_JAX_PROCESS_ID": "3",
        "CTL_JAX_LOCAL_DEVICE_IDS": "0,1",
    }
    kwargs = distributed.resolve_settings(env)
    assert kwargs["coordinator_address"] == "10.0.0.1:1234"
    assert (kwargs["num_processes"], kwargs["process_id"]) == (4, 3)
    assert kwargs["local_device_ids"] == [0, 1]
    # "auto" leaves detection (TPU pod, SLURM, Open MPI) to jax.distributed.initialize.
    auto = distributed.resolve_settings({"CTL_JAX_DISTRIBUTED": "auto"})
    assert "coordinator_address" not in auto and "process_id" not in auto
    # One process needs no coordination.
    one = {"CTL_JAX_COORDINATOR": "h:1", "CTL_JAX_NUM_PROCESSES": "1", "CTL_JAX_PROCESS_ID": "0"}
    assert distributed.resolve_settings(one) is None


@pytest.mark.parametrize(
    "env, message",
    [
        ({"CTL_JAX_DISTRIBUTED": "on"}, "needs coordinator"),
        ({"CTL_JAX_COORDINATOR": "h:1", "CTL_JAX_NUM_PROCESSES": "2"}, "needs process_id"),
        (
            {"CTL_JAX_COORDINATOR": "h", "CTL_JAX_NUM_PROCESSES": "2", "CTL_JAX_PROCESS_ID": "0"},
            "host:port",
        ),
        (
            {"CTL_JAX_COORDINATOR": "h:1", "CTL_JAX_NUM_PROCESSES": "2", "CTL_JAX_PROCESS_ID": "2"},
            r"process_id must be in 0\.\.1",
        ),
        (
            {"CTL_JAX_COORDINATOR": "h:1", "CTL_JAX_NUM_PROCESSES": "x", "CTL_JAX_PROCESS_ID": "0"},
            "num_processes must be an integer",
        ),
        ({"CTL_JAX_DISTRIBUTED": "maybe"}, "must be one of off, auto, on"),
    ],
)
def test_multiprocess_settings_errors_are_one_clear_line(env, message):
    with pytest.raises(distributed.DistributedSetupError, match=message):
        distributed.resolve_settings(env)


# --- two processes versus one ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny synthetic dataset (the one of test_training) and a config file for it."""
    root = tmp_path_factory.mktemp("mp_data")
    make_tiny_reid(root / "reid")
    config_path = root / "tiny_multiprocess.py"
    config_path.write_text(
        CONFIG_TEMPLATE.format(
            default=str(REPO / "configs" / "default.py"), root=str(root / "reid")
        )
    )
    return config_path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Processes:
    """`num_processes` copies of one command, joined through a localhost coordinator when
    there are several, each with `local_devices` CPU devices.

    Output goes to files (no pipe can fill up and block a child). On a timeout or a failure
    every child still running is killed, and the failure message shows their output.
    """

    def __init__(
        self,
        args: list[str],
        logdir: pathlib.Path,
        name: str,
        num_processes: int = NUM_PROCESSES,
        local_devices: int = LOCAL_DEVICES,
    ):
        port = _free_port()
        self.logs = []
        self.procs = []
        cache = jax.config.jax_compilation_cache_dir or str(REPO / ".cache" / "jax")
        for i in range(num_processes):
            env = {k: v for k, v in os.environ.items() if not k.startswith("CTL_JAX_")}
            env.update(
                XLA_FLAGS=xla_flags(local_devices),
                JAX_PLATFORMS="cpu",
                CTL_JAX_COMPILATION_CACHE=cache,
                PYTHONUNBUFFERED="1",
            )
            if num_processes > 1:
                env.update(
                    CTL_JAX_DISTRIBUTED="on",
                    CTL_JAX_COORDINATOR=f"127.0.0.1:{port}",
                    CTL_JAX_NUM_PROCESSES=str(num_processes),
                    CTL_JAX_PROCESS_ID=str(i),
                    CTL_JAX_DISTRIBUTED_TIMEOUT="120",
                )
            out = open(logdir / f"{name}.{i}.out", "w")  # noqa: SIM115
            err = open(logdir / f"{name}.{i}.err", "w")  # noqa: SIM115
            self.logs.append((out, err))
            self.procs.append(
                subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=out, stderr=err)
            )
        self.deadline = time.monotonic() + PHASE_TIMEOUT

    def output(self, i: int) -> tuple[str, str]:
        out, err = self.logs[i]
        for f in (out, err):
            if not f.closed:
                f.flush()
        return pathlib.Path(out.name).read_text(), pathlib.Path(err.name).read_text()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for out, err in self.logs:
            out.close()
            err.close()

    def report(self, reason: str) -> str:
        lines = [reason]
        for i, p in enumerate(self.procs):
            stdout, stderr = self.output(i)
            lines.append(f"--- process {i} (exit code {p.poll()}) stdout tail:\n{stdout[-3000:]}")
            lines.append(f"--- process {i} stderr tail:\n{stderr[-6000:]}")
        return "\n".join(lines)

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            message = self.report(f"timed out after {PHASE_TIMEOUT} s")
            self.kill()
            pytest.fail(message)

    def wait(self, expect_codes=(0,)) -> list[tuple[str, str]]:
        """Waits for every child; fails (killing the rest) as soon as one exits badly."""
        try:
            while any(p.poll() is None for p in self.procs):
                bad = [p.returncode for p in self.procs if p.poll() not in (None, *expect_codes)]
                if bad:
                    time.sleep(2)  # let the other process print its side of the failure
                    message = self.report(f"a process exited with {bad[0]}")
                    self.kill()
                    pytest.fail(message)
                self.check_time()
                time.sleep(0.2)
            codes = [p.returncode for p in self.procs]
            if any(c not in expect_codes for c in codes):
                message = self.report(f"exit codes {codes}, expected {expect_codes}")
                self.kill()
                pytest.fail(message)
            outputs = [self.output(i) for i in range(len(self.procs))]
        except BaseException:
            self.kill()
            raise
        self.kill()
        return outputs


def _printed(stdout: str) -> list[str]:
    """The lines a child printed itself. The gloo library announces its connections, from
    several threads at once, so its lines can come interleaved ("[Gloo] Rank [Gloo] Rank 1
    is connected ..." then "1 is connected to 1 peer ranks ...")."""
    gloo = ("[Gloo]", "peer ranks")
    return [s for s in stdout.splitlines() if s.strip() and not any(g in s for g in gloo)]


def _logged_train_steps(workdir: pathlib.Path) -> int:
    """Train records written so far (complete lines only: the file is being appended to)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    complete = path.read_text().split("\n")[:-1]
    return sum('"kind": "train"' in line for line in complete)


def _records(workdir: pathlib.Path, kind: str) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _restore(workdir: pathlib.Path):
    store = CheckpointStore(workdir, read_only=True)
    return store.restore_raw(), store.latest_step()


def test_multiprocess_training_equals_a_single_process_run(tiny_run, tmp_path):
    mp_dir, ref_dir = tmp_path / "two_processes", tmp_path / "one_process"
    # The reference: one process with as many devices as the two together, the same global
    # batches; it runs alongside (the children mostly wait for each other, the cores do not).
    reference = _Processes(
        ["-m", "ctl_jax.train", f"--config={tiny_run}", f"--workdir={ref_dir}"],
        tmp_path,
        "reference",
        num_processes=1,
        local_devices=NUM_PROCESSES * LOCAL_DEVICES,
    )
    try:
        stop_step = _train_evaluate_two_processes(tiny_run, mp_dir, tmp_path)
        reference.wait()
    finally:
        reference.kill()

    # Every step logged once, by process 0, in order across the interruption; same losses.
    mp_train, ref_train = _records(mp_dir, "train"), _records(ref_dir, "train")
    assert [r["step"] for r in mp_train] == list(range(1, len(ref_train) + 1))
    assert [r["step"] for r in ref_train] == list(range(1, len(ref_train) + 1))
    assert 0 < stop_step < len(ref_train)
    assert "stop_vote" not in mp_train[0]
    for a, b in zip(mp_train, ref_train):
        for key in ("total_loss", "triplet_loss", "centroid_loss", "ce_loss", "grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=f"step {a['step']}")

    # Same final weights, centers and batch-norm statistics.
    (mp_state, mp_step), (ref_state, ref_step) = _restore(mp_dir), _restore(ref_dir)
    assert mp_step == ref_step == len(ref_train)
    for name in ("params", "batch_stats", "centers"):
        leaves_mp, leaves_ref = jax.tree.leaves(mp_state[name]), jax.tree.leaves(ref_state[name])
        assert len(leaves_mp) == len(leaves_ref) > 0
        for a, b in zip(leaves_mp, leaves_ref):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=name)

    # Same evaluation: gathered across processes during training and by ctl_jax.evaluate.
    (mp_eval,), (ref_eval,) = _records(mp_dir, "eval"), _records(ref_dir, "eval")
    written = json.loads((mp_dir / "eval.json").read_text())
    assert set(written) >= {"instance", "centroid"}
    for mode in ("instance", "centroid"):
        for key in ("mAP", "rank1", "rank5", "num_query", "num_gallery"):
            expected = ref_eval[f"{mode}/{key}"]
            assert mp_eval[f"{mode}/{key}"] == pytest.approx(expected, abs=1e-6), (mode, key)
            assert written[mode][key] == pytest.approx(expected, abs=1e-6), (mode, key)


def _train_evaluate_two_processes(config_path, workdir, logdir) -> int:
    """Trains with a SIGTERM to process 1 mid-run, resumes, evaluates; returns the stop step."""
    train = ["-m", "ctl_jax.train", f"--config={config_path}", f"--workdir={workdir}"]

    # 1. SIGTERM reaches process 1 only. Both must stop after the same step, with one
    #    collective checkpoint of that step.
    run = _Processes(train, logdir, "train1")
    try:
        while _logged_train_steps(workdir) < 3:
            if any(p.poll() is not None for p in run.procs):
                break  # finished or failed early; wait() reports it
            run.check_time()
            time.sleep(0.2)
        if run.procs[1].poll() is None:
            run.procs[1].send_signal(signal.SIGTERM)
    except BaseException:
        run.kill()
        raise
    outputs = run.wait(expect_codes=(130,))
    stops = [re.search(r"stopped at step (\d+)", err) for _, err in outputs]
    assert all(stops), run.report("no 'stopped at step' message")
    stopped = {int(m.group(1)) for m in stops}
    assert len(stopped) == 1, f"processes stopped at different steps: {stopped}"
    (stop_step,) = stopped
    assert CheckpointStore(workdir, read_only=True).latest_step() == stop_step

    # 2. The same command resumes (a collective restore) and finishes with an evaluation.
    #    Only process 0 prints.
    outputs = _Processes(train, logdir, "train2").wait()
    assert "Dataset statistics" in outputs[0][0] and "work directory" in outputs[0][0]
    assert _printed(outputs[1][0]) == [], outputs[1][0]

    # 3. Evaluation of the checkpoint by two processes with two devices each (a different
    #    topology than the one that saved it); only process 0 prints and writes the file.
    metrics_file = workdir / "eval.json"
    evaluate = ["-m", "ctl_jax.evaluate", f"--workdir={workdir}", f"--output={metrics_file}"]
    outputs = _Processes(evaluate, logdir, "evaluate", local_devices=2).wait()
    assert "metrics written" in outputs[0][0]
    assert _printed(outputs[1][0]) == [], outputs[1][0]
    return stop_step
