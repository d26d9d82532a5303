"""One writer per workdir: a training run holds ``<workdir>/.lock`` (an advisory ``flock``,
which the kernel releases when the process dies, however it dies)."""

import contextlib
import fcntl
import os
import socket
import time

import jax
from absl import logging

from fracture_jax.errors import UserError

LOCK = ".lock"


def _holder(text: str) -> str:
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    return (f"process {fields.get('pid', '?')} on {fields.get('host', '?')}, started "
            f"{fields.get('started', '?')}")


@contextlib.contextmanager
def held(workdir: str):
    """Hold ``workdir``'s lock for the block; a one-line error if another run holds it or the
    folder cannot be written. In a multi-process run, process 0 holds it for them all."""
    if jax.process_index() != 0:
        yield
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(os.path.join(workdir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write to --workdir={workdir} ({e.strerror}); a training run "
                        "needs a writable folder: choose another --workdir") from None
    try:
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"--workdir={workdir} is in use by {_holder(previous)}; wait for "
                            "it to finish, stop it, or choose another --workdir") from None
        if previous:
            logging.warning("took over the lock of %s in %s, which is no longer running",
                            _holder(previous), workdir)
        record = (f"pid={os.getpid()} host={socket.gethostname()} "
                  f"started={time.strftime('%Y-%m-%dT%H:%M:%S')}\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder behind
    finally:
        os.close(fd)
