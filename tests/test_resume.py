"""Checkpoints: a run stopped by SIGKILL, SIGTERM or SIGINT at a step resumes to bitwise the
same result and leaves no process behind; half-written checkpoints are never used; a
non-finite step stops the run with the last good state."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO
from test_train import NO_AUGMENTATION, tiny_config

from fracture_jax.errors import UserError
from fracture_jax.train import LoopState, train_and_evaluate

STEPS_PER_EPOCH, EPOCHS = 3, 3  # 24 phantom train images, batch 8
# The kill step of the image stream: drawn from a seed (FRACTURE_JAX_KILL_SEED, default 0) so
# that a failure is reproducible; both show in the test's id.
KILL_SEED = int(os.environ.get("FRACTURE_JAX_KILL_SEED", "0"))
KILL_STEP = random.Random(KILL_SEED).randint(2, STEPS_PER_EPOCH * EPOCHS - 1)


def _command(workdir, root, extra):
    overrides = {"model.name": "smallcnn", "model.image_size": 32, "data.root": root,
                 "data.num_workers": 1, "train.batch_size": 8, "train.epochs": EPOCHS,
                 "train.patience": 9, "train.checkpoint_every": 1, "train.log_every": 1,
                 "optimizer.lr": 3e-3, "train.allow_chance": True,
                 "eval.after_train": False} | extra  # the checkpoints are compared, not reports
    return [sys.executable, str(REPO / "main.py"), "--config=" + str(REPO / "configs/default.py"),
            f"--workdir={workdir}", "--mode=train"] + [f"--config.{k}={v}" for k, v in overrides.items()]


def _group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":
            found.append(int(entry))
    return found


def _leftovers(pgid: int, wait: float = 15.0) -> list[int]:
    """Processes of the run's group still alive ``wait`` seconds after it ended (its loader's
    workers, a resource tracker); killed here, so that the test leaves nothing behind."""
    deadline = time.monotonic() + wait
    while _group(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _group(pgid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def _run(workdir, root, extra, kill_at_step=None, sig=signal.SIGKILL):
    """(exit code, log, seconds from the signal to the exit, leftover processes)."""
    proc = subprocess.Popen(_command(workdir, root, extra), cwd=REPO, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            start_new_session=True)
    log, sent = [], None
    for line in proc.stderr:
        log.append(line)
        if (kill_at_step is not None and sent is None and " step " in line
                and " img/s" in line):
            epoch = int(line.split("epoch ")[1].split("/")[0])
            step = int(line.split(" step ")[1].split("/")[0])
            if (epoch - 1) * STEPS_PER_EPOCH + step >= kill_at_step:
                proc.send_signal(sig)
                sent = time.monotonic()
                if sig == signal.SIGKILL:
                    break
    try:
        proc.wait(timeout=120)
    finally:
        left = _leftovers(proc.pid)
    return proc.returncode, "".join(log), sent and time.monotonic() - sent, left


def _best_state(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "best"))
    restored = manager.restore(manager.latest_step(),
                               args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return restored.state


# The second run trains its first epoch's head on cached backbone features, then unfreezes:
# killed mid-way through the cached phase, it resumes there and then continues the image stream.
CACHED_HEAD_PHASE = {"train.head_epochs": 1, **NO_AUGMENTATION}
# The weights' EMA and gradient accumulation (an update every second step) are state too.
EMA_AND_ACCUMULATION = {"train.ema_decay": 0.9, "train.accumulate_steps": 2}
# Two steps per call where no log or checkpoint step comes between (single steps elsewhere).
STEPS_IN_A_ROW = {"train.steps_per_dispatch": 2, "train.log_every": 2,
                  "train.checkpoint_every": 2}


@pytest.fixture(scope="module")
def straight(phantom_root, tmp_path_factory):
    """The uninterrupted run of a setting, once per setting."""
    runs = {}

    def run(extra):
        key = json.dumps(extra, sort_keys=True)
        if key not in runs:
            workdir = tmp_path_factory.mktemp("straight")
            rc, log, _, left = _run(workdir, phantom_root, extra)
            assert rc == 0 and not left, log[-3000:]
            assert ("cached backbone features" in log) == ("train.head_epochs" in extra)
            runs[key] = workdir
        return runs[key]
    return run


@pytest.mark.parametrize("extra, kill_at, sig", [
    ({}, KILL_STEP, signal.SIGKILL), ({}, KILL_STEP, signal.SIGTERM),
    (EMA_AND_ACCUMULATION, KILL_STEP, signal.SIGINT), (CACHED_HEAD_PHASE, 2, signal.SIGKILL),
    (STEPS_IN_A_ROW, KILL_STEP, signal.SIGTERM)],
    ids=[f"images-seed{KILL_SEED}-sigkill-at{KILL_STEP}",
         f"images-seed{KILL_SEED}-sigterm-at{KILL_STEP}",
         f"ema-accumulation-seed{KILL_SEED}-sigint-at{KILL_STEP}", "cached-head-phase-sigkill-at2",
         f"steps-in-a-row-seed{KILL_SEED}-sigterm-at{KILL_STEP}"])
def test_stopped_at_a_step_then_resumed_is_bitwise_identical(phantom_root, tmp_path, straight,
                                                             extra, kill_at, sig):
    """SIGKILL, SIGTERM (a preemption) or SIGINT (Ctrl-C) at a step: the run stops (SIGTERM
    and SIGINT within seconds, with a checkpoint of where it was and a line saying how to
    resume, exit code 143 or 130), leaves no loader process behind, and the next start ends
    bitwise equal to the uninterrupted run."""
    name = signal.Signals(sig).name
    killed = tmp_path / "killed"
    rc, log, seconds, left = _run(killed, phantom_root, extra, kill_at_step=kill_at, sig=sig)
    assert not left, f"processes outlived the run stopped by {name}: {left}"
    assert rc == (-sig if sig == signal.SIGKILL else 128 + sig), \
        f"not stopped by {name} at step {kill_at}: {log[-2000:]}"
    if sig != signal.SIGKILL:
        assert seconds < 30, f"{name}: {seconds:.0f} s to exit"
        assert f"interrupted: stopped by {name} at step" in log, log[-2000:]
        assert "run the same command again to resume" in log
    rc, log, _, left = _run(killed, phantom_root, extra)
    # From the first traceback: grain's teardown warnings at exit can fill the log's tail.
    start = log.find("Traceback")
    assert rc == 0 and not left, (f"resume after {name} at step {kill_at}: "
                                  f"{log[start:][:3000] if start >= 0 else log[-3000:]}")
    assert "resumed from" in log
    reference = straight(extra)
    a, b = _best_state(reference), _best_state(killed)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"differs after {name} at {kill_at}"
    history = [json.loads((d / "history.json").read_text()) for d in (reference, killed)]
    assert history[0] == history[1]


def test_half_written_checkpoint_is_ignored(phantom_root, tmp_path):
    config = tiny_config(**{"data.root": str(phantom_root), "data.num_workers": 0,
                            "train.epochs": 1})
    train_and_evaluate(config, str(tmp_path))
    latest = tmp_path / "checkpoints" / "latest"
    (steps,) = [p.name for p in latest.iterdir()]
    partial = latest / "99.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 100)
    config.train.epochs = 2
    state = train_and_evaluate(config, str(tmp_path))
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]  # resumed after epoch 1, not from step 99
    assert int(state.step) in (3, 6) and int(steps) == 3


def test_non_finite_loss_stops_with_last_good_checkpoint(phantom_root, tmp_path):
    config = tiny_config(**{"data.root": str(phantom_root), "data.num_workers": 0,
                            "optimizer.lr": 1e30, "optimizer.momentum": 0.0,
                            "train.checkpoint_every": 1})
    with pytest.raises(UserError, match=r"(loss is (nan|inf)|the update is not finite)"):
        train_and_evaluate(config, str(tmp_path))
    states = _latest_states(tmp_path)
    assert states, "no checkpoint was written before the loss became non-finite"
    for state in states.values():
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def _latest_states(workdir) -> dict:
    """{step: train state} of the run's latest checkpoints."""
    latest = workdir / "checkpoints" / "latest"
    manager = ocp.CheckpointManager(latest)
    try:
        return {int(p.name): manager.restore(int(p.name), args=ocp.args.Composite(
            state=ocp.args.StandardRestore())).state for p in latest.iterdir()}
    finally:
        manager.close()


def _schedule(monkeypatch, change):
    """Every run's learning rate replaced by ``change(update count, planned rate)``."""
    from fracture_jax import train
    real = train.learning_rate_fn

    def changed(config, steps_per_epoch, scale=1.0):
        schedule = real(config, steps_per_epoch, scale)
        return lambda count: change(count, schedule(count))

    monkeypatch.setattr(train, "learning_rate_fn", changed)


@pytest.mark.parametrize("in_a_row", [1, 3])
def test_a_non_finite_step_is_skipped_and_stops_the_run_at_the_next_read(phantom_root, tmp_path,
                                                                       monkeypatch, in_a_row):
    """Step 5's learning rate is NaN: its update is not applied, the loop finds out when it
    next reads from the device (step 6, a log step) and stops with the step named; the last
    checkpoint (epoch 1, step 3) is kept and holds no NaN. Also with each epoch's three steps
    in one call (``train.steps_per_dispatch=3``)."""
    _schedule(monkeypatch, lambda count, lr: jnp.where(count == 4, jnp.nan, lr))  # 5th update
    config = tiny_config(**{"data.root": str(phantom_root), "data.num_workers": 0,
                            "train.epochs": 2, "train.log_every": 3,
                            "train.checkpoint_every": 0, "train.steps_per_dispatch": in_a_row})
    with pytest.raises(UserError, match=r"the update is not finite .* at step 5 \(epoch 2\)"):
        train_and_evaluate(config, str(tmp_path))
    states = _latest_states(tmp_path)
    assert list(states) == [3]
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    state = states[3]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    assert int(state["bad_step"]) == 0


def test_a_diverging_loss_stops_the_run(phantom_root, tmp_path, monkeypatch):
    """From the 4th update the learning rate is 1e3: the run stops with a clear divergence
    message, after three reads of a loss over 100x the first step's or, whichever comes first
    for the data order, at the val pass whose outputs are no longer finite (not a crash in the
    metrics)."""
    _schedule(monkeypatch, lambda count, lr: jnp.where(count >= 3, 1e3, lr))
    config = tiny_config(**{"data.root": str(phantom_root), "data.num_workers": 0,
                            "train.epochs": 3, "train.log_every": 1})
    with pytest.raises(UserError, match=r"the loss diverged: .* over 100x the first step's|"
                                        r"the model diverged: its val outputs are not finite"):
        train_and_evaluate(config, str(tmp_path))


def test_divergence_counts_reads_in_a_row():
    loop = LoopState(first_loss=0.7)
    assert [loop.watch(x) for x in (80.0, 71.0, 1.0, 80.0, 90.0, 100.0)] == [
        False, False, False, False, False, True]
    assert LoopState().watch(1e9) is False  # no first loss read yet


def test_a_nan_epoch_is_the_best_only_until_a_number_comes():
    nan = float("nan")
    loop = LoopState()
    assert [loop.end_epoch({}, v, minimise=False) for v in (nan, 0.6, nan, 0.5, 0.7)] == [
        True, True, False, False, True]
    assert loop.best == 0.7 and loop.bad_epochs == 0


@pytest.mark.parametrize("mode, values, best", [("max", [0.7, float("nan"), 0.6], 1),
                                                ("max", [float("nan"), 0.5], 2),
                                                ("min", [0.4, float("nan"), 0.5], 1)])
def test_a_nan_metric_never_becomes_the_best_checkpoint(tmp_path, mode, values, best):
    """The best checkpoint's ranking puts a NaN below every number, whichever way is better."""
    import grain

    from fracture_jax.checkpoint import RunCheckpoints
    ckpt = RunCheckpoints(str(tmp_path), "val_auroc", mode)
    data = iter(grain.MapDataset.range(4).to_iter_dataset())
    try:
        for step, value in enumerate(values, start=1):
            ckpt.save_best(step, {"w": np.float32(step)}, {"x": np.zeros(1)}, data, {},
                           {"val_auroc": value})
        assert ckpt.best.all_steps() == [best]
    finally:
        ckpt.close()
