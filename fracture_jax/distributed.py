"""Joining a multi-process run (several GPU hosts, a TPU slice, a SLURM job) with JAX's own
distributed runtime, before anything else touches JAX.

Three ways in, chosen by ``main.py``'s flags:

- ``--coordinator=HOST:PORT --num_processes=N --process_id=I`` (or the environment variables
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``): every process names
  the coordinator (process 0's address) and itself;
- ``--distributed=auto``: ``jax.distributed.initialize()`` detects a Cloud TPU slice, a SLURM
  job (``srun``), Open MPI (``mpirun``) or a GKE/k8s job set, and fills in the rest;
- neither: a single process, as before.

A process that dies is noticed by the others through the coordinator's heartbeats: they stop
within ``HEARTBEAT_S`` + ``SHUTDOWN_S`` seconds with JAX's message naming the missing task,
instead of waiting on a collective for good.
"""

import os

import jax
from absl import logging

HEARTBEAT_S = 15  # a process silent this long counts as dead (JAX's default: 100 s)
SHUTDOWN_S = 30  # how long the others wait at exit for it (JAX's default: 300 s)
INIT_TIMEOUT_S = 120  # how long a process waits for all the others to join


def settings_from_env(coordinator: str | None, num_processes: int | None,
                      process_id: int | None) -> tuple[str | None, int | None, int | None]:
    """The flags, each falling back to its JAX_* environment variable."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    return coordinator, num_processes, process_id


def join(mode: str, coordinator: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> bool:
    """Join the multi-process run ``mode`` asks for: "off" (unless a coordinator is given),
    "auto" (detected), or explicit settings. Returns whether this is a multi-process run."""
    from fracture_jax.errors import UserError
    coordinator, num_processes, process_id = settings_from_env(coordinator, num_processes,
                                                               process_id)
    if mode == "off" and coordinator is None:
        return False
    if mode != "auto" and (num_processes is None or process_id is None):
        raise UserError("a multi-process run needs --coordinator=HOST:PORT, --num_processes and "
                        "--process_id on every process (or JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed=auto on a TPU "
                        "slice or in a SLURM job")
    timeouts = dict(initialization_timeout=INIT_TIMEOUT_S, heartbeat_timeout_seconds=HEARTBEAT_S,
                    shutdown_timeout_seconds=SHUTDOWN_S)
    if mode == "auto" and coordinator is None:
        jax.distributed.initialize(**timeouts)
    else:
        jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
    logging.info("joined a run of %d processes as process %d", jax.process_count(),
                 jax.process_index())
    return True


def peer_failure(error: BaseException) -> str | None:
    """A one-line explanation when ``error`` is how a multi-process run sees another process
    die (a collective or the coordinator failing); None otherwise."""
    if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
        return None
    first = str(error).strip().splitlines()[0][:300]
    return (f"process {jax.process_index()}: another process of this {jax.process_count()}-process "
            f"run stopped or cannot be reached ({first}); every process stops now. Start them "
            "all again with the same command: the run resumes from its last checkpoint")
