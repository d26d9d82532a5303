"""One writer per workdir: a second run is refused naming the first, a dead run's lock is
taken over with a line saying so, and an unwritable workdir is one line."""

import logging
import subprocess
import sys

import pytest
from conftest import REPO

from fracture_jax.errors import UserError
from fracture_jax.workdir_lock import held

HOLD = ("import sys, time; sys.path.insert(0, {repo!r}); "
        "from fracture_jax.workdir_lock import held\n"
        "with held({workdir!r}):\n    print('held', flush=True); time.sleep(120)")


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO),
                                                                 workdir=str(tmp_path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by process {holder.pid} on .*choose "
                                            "another --workdir"):
            with held(str(tmp_path)):
                pass
    finally:
        holder.kill()  # SIGKILL: the kernel releases its lock, its record stays
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="absl"), held(str(tmp_path)):
        assert f"took over the lock of process {holder.pid}" in caplog.text
    with held(str(tmp_path)):  # released cleanly: nothing to take over
        pass


def test_an_unwritable_workdir_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "--config=configs/demo.py",
                             f"--workdir={tmp_path / 'a_file' / 'run'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: cannot write to --workdir={tmp_path / 'a_file' / 'run'}" in result.stderr
