"""Multi-process runs on this machine: two processes of two faked CPU devices each, joined by a
loopback coordinator (JAX's distributed runtime, gloo collectives), train like one process of
four devices; one process killed stops the other with a message, and both restarted resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO
from test_resume import _leftovers

from fracture_jax.checkpoint import load_best

# 24 phantom train images, a global batch of 8: 3 steps an epoch, a checkpoint every 2 steps
OVERRIDES = {"model.name": "smallcnn", "model.image_size": 32, "model.pretrained": None,
             "optimizer.name": "sgd", "optimizer.lr": 0.01, "train.batch_size": 8,
             "train.epochs": 3, "train.patience": 9, "train.checkpoint_every": 2,
             "train.log_every": 1, "train.allow_chance": True, "eval.after_train": False,
             "data.num_workers": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, root, processes: int, devices: int) -> list[subprocess.Popen]:
    """``processes`` training processes of ``devices`` CPU devices each, into ``workdir``."""
    command = [sys.executable, str(REPO / "main.py"), "--config=" + str(REPO / "configs/default.py"),
               f"--workdir={workdir}", "--mode=train", f"--config.data.root={root}"]
    command += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if processes > 1:
        command += [f"--coordinator=127.0.0.1:{_free_port()}", f"--num_processes={processes}"]
    return [subprocess.Popen(command + ([f"--process_id={i}"] if processes > 1 else []),
                             cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                             start_new_session=True) for i in range(processes)]


def _finish(procs, timeout=300) -> list[tuple[int, str]]:
    """(exit code, log) of each process, after it ended; nothing of theirs left running."""
    results = []
    for proc in procs:
        try:
            log = proc.communicate(timeout=timeout)[1]
        finally:
            left = _leftovers(proc.pid)
        assert not left, f"processes outlived process {proc.pid}: {left}"
        results.append((proc.returncode, log))
    return results


def _train(workdir, root, processes: int, devices: int):
    for rc, log in _finish(_start(workdir, root, processes, devices)):
        start = log.find("Traceback")
        assert rc == 0, log[start:][:3000] if start >= 0 else log[-3000:]
    return workdir


def _params(workdir) -> list[np.ndarray]:
    weights, _ = load_best(str(workdir))
    return [np.asarray(x) for x in jax.tree.leaves(weights["params"])]


def _history(workdir) -> list[dict]:
    return json.loads((workdir / "history.json").read_text())


@pytest.fixture(scope="module")
def two_processes(phantom_root, tmp_path_factory):
    """The uninterrupted run of two processes of two devices each."""
    return _train(tmp_path_factory.mktemp("two"), phantom_root, processes=2, devices=2)


def test_two_processes_train_like_one_process_of_four_devices(two_processes, phantom_root,
                                                              tmp_path):
    """The same global batches, augmentation and updates: parameters equal to float tolerance
    (the gradient sums cross processes in another order), the same metrics every epoch."""
    one = _train(tmp_path / "one", phantom_root, processes=1, devices=4)
    for a, b in zip(_params(two_processes), _params(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(_history(two_processes), _history(one), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-5), k


def test_a_killed_process_stops_the_other_and_both_resume(two_processes, phantom_root,
                                                          tmp_path):
    """SIGKILL of process 1 mid-run: process 0 exits within a minute with a message saying
    what happened and how to resume; both started again end equal to the uninterrupted run.
    Resuming with another process count is refused with the reason."""
    workdir = tmp_path / "killed"
    procs = _start(workdir, phantom_root, processes=2, devices=2)
    for line in procs[1].stderr:  # past the first checkpoint (step 2), before the end (step 9)
        if " epoch 2/3 step 2/3 " in line:
            procs[1].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            break
    else:
        _finish(procs, timeout=60)
        pytest.fail("process 1 ended without reaching epoch 2, step 2")
    (rc0, log0), (rc1, _) = _finish(procs, timeout=60)
    assert rc1 == -signal.SIGKILL
    assert time.monotonic() - killed_at < 60
    assert rc0 != 0 and "another process of this 2-process run stopped" in log0, log0[-3000:]
    assert "Start them all again with the same command" in log0

    (rc, log), = _finish(_start(workdir, phantom_root, processes=1, devices=4))
    assert rc == 2 and "written by a run of 2 processes" in log, log[-3000:]

    _train(workdir, phantom_root, processes=2, devices=2)
    for a, b in zip(_params(two_processes), _params(workdir), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _history(two_processes) == _history(workdir)
