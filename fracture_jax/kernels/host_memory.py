"""Host memory: run with glibc's malloc keeping XLA's buffers mapped, in transparent huge pages.

XLA on CPU takes fresh memory for each step's temporaries (one block of several GB) and hands
it back afterwards; glibc maps such blocks with ``mmap`` and unmaps them on free, so every step
pays the kernel's page faults on all of it again. In 4 KiB pages they cost as much CPU time as
the step itself: an EfficientNetB2 train step at 260 px, batch 32, spent 10 s in user code and
10 s in the kernel (3.7 million faults). ``glibc.malloc.hugetlb=1`` (huge pages) cut that to
9 s and 2 s. Keeping the memory mapped removes the rest: with every thread on the main arena
(``arena_max=1``), no ``mmap`` per block (``mmap_max=0``) and no trimming, a ResNet50 train
step faulted 86 times instead of 1,970 and spent 0.03 s in the kernel instead of 1.9-2.5 s.
The cost is memory: the process keeps its peak heap until it exits, and one heap holds up to two
steps' temporaries (measured in ``benchmarks/README.md``), so the buffers stay mapped only
where ``KEEP_MAPPED_MIN_GIB`` is available (``keep_mapped``); ``FRACTURE_JAX_KEEP_MAPPED=1``
or ``0`` decides instead. glibc reads tunables only when a process starts, so the entry points
restart themselves once with them set.

All of it is for XLA's CPU programs: on a host with a GPU or TPU plugin for JAX (unless
``JAX_PLATFORMS`` picks the CPU) the process is neither restarted nor its allocator changed.
"""

import importlib.util
import os
import platform
import sys

from fracture_jax.kernels import policy

HUGE_PAGES = "glibc.malloc.hugetlb=1"
KEEP_MAPPED = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
               "glibc.malloc.trim_threshold=1099511627776")
OPT_OUT = "FRACTURE_JAX_HUGE_PAGES"  # set to 0 to keep the process as it was started
KEEP_MAPPED_OPT_OUT = "FRACTURE_JAX_KEEP_MAPPED"  # set to 0 for the huge pages only
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "libtpu")
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
_RESTARTED = "FRACTURE_JAX_RESTARTED"  # never restart twice, whatever the loader did
_DECISION = "FRACTURE_JAX_BUFFERS"  # what the restart chose, and why (for the log)


def _glibc_linux() -> bool:
    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def _huge_pages_possible() -> bool:
    try:
        with open(_THP) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def accelerator_host() -> bool:
    """Whether JAX will run on a GPU or TPU here, judged without importing JAX: the first of
    ``JAX_PLATFORMS`` if set, else whether an accelerator plugin is installed."""
    chosen = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if chosen:
        return chosen.split(",")[0] != "cpu"
    return any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


# Keeping the buffers mapped holds up to two steps' temporaries: the default EfficientNetB2
# fine-tune (batch 32, 260 px) stays at 12.6 GiB resident, against a 7.6 GiB peak without
# (benchmarks/README.md). Below this much available memory only the huge pages are used.
KEEP_MAPPED_MIN_GIB = 20.0


def available_gib() -> float | None:
    """``MemAvailable`` of /proc/meminfo in GiB (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib / 2**20


def keep_mapped() -> tuple[bool, str]:
    """Whether to keep XLA's buffers mapped, and why (for the log)."""
    setting = policy.switches().keep_mapped
    if setting in ("0", "1"):
        return setting == "1", f"FRACTURE_JAX_KEEP_MAPPED={setting}"
    gib = available_gib()
    if gib is None or gib < KEEP_MAPPED_MIN_GIB:
        return False, (f"{'unknown' if gib is None else f'{gib:.1f} GiB'} available, under "
                       f"{KEEP_MAPPED_MIN_GIB:g} GiB: huge pages only")
    return True, f"{gib:.1f} GiB available"


def ours() -> tuple:
    """The tunables this process should run with."""
    return (HUGE_PAGES,) * _huge_pages_possible() + KEEP_MAPPED * keep_mapped()[0]


def _name(tunable: str) -> str:
    return tunable.partition("=")[0]


def with_tunables(tunables: str | None, add: tuple) -> str:
    """``GLIBC_TUNABLES`` with each of ``add`` appended whose name is not set there already."""
    present = [t for t in (tunables or "").split(":") if t]
    names = {_name(t) for t in present}
    return ":".join(present + [t for t in add if _name(t) not in names])


def without_tunables(tunables: str | None, remove: tuple) -> str:
    """``GLIBC_TUNABLES`` without ``remove`` (as :func:`with_tunables` found it)."""
    return ":".join(t for t in (tunables or "").split(":") if t and t not in remove)


def restart_with_tunables():
    """Re-execute this Python program with :func:`ours` set, unless each is set already
    (ours or the user's own value), the C library is not glibc on Linux, JAX runs on an
    accelerator here, or ``FRACTURE_JAX_HUGE_PAGES=0``. Call before anything heavy."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (not policy.switches().host_memory or os.environ.get(_RESTARTED) or not _glibc_linux()
            or accelerator_host()):
        return
    keep, why = keep_mapped()
    wanted = with_tunables(tunables, ours())
    if wanted == with_tunables(tunables, ()):
        return
    env = dict(os.environ, GLIBC_TUNABLES=wanted, **{_RESTARTED: "1"},
               **{_DECISION: f"{'kept' if keep else 'not kept'} mapped: {why}"})
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def decision() -> str:
    """Whether the restart kept XLA's buffers mapped, and why ("" without a restart)."""
    return os.environ.get(_DECISION, "")


def active() -> str:
    """The malloc tunables this process runs with ("" if none)."""
    return os.environ.get("GLIBC_TUNABLES", "") if _glibc_linux() else ""
