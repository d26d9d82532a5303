"""Host memory: run with glibc's malloc asking Linux for transparent huge pages.

XLA on CPU takes fresh memory for each step's temporaries and hands it back afterwards. In
4 KiB pages the kernel's page faults cost as much CPU time as the step itself: an
EfficientNetB2 train step at 260 px, batch 32, spent 10 s in user code and 10 s in the kernel
(3.7 million faults). With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` the same step took 9 s
and 2 s, and half the wall time. glibc reads the tunable only when a process starts, so the
entry points restart themselves once with it set.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "FRACTURE_JAX_HUGE_PAGES"  # set to 0 to keep the process as it was started
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
_RESTARTED = "FRACTURE_JAX_RESTARTED"  # never restart twice, whatever the loader did


def _huge_pages_possible() -> bool:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open(_THP) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def with_tunable(tunables: str | None) -> str:
    """``GLIBC_TUNABLES`` with the huge-page tunable added."""
    return ":".join(t for t in (tunables, TUNABLE) if t)


def without_tunable(tunables: str | None) -> str:
    """``GLIBC_TUNABLES`` as it was before :func:`with_tunable`."""
    return ":".join(t for t in (tunables or "").split(":") if t and t != TUNABLE)


def restart_with_huge_pages():
    """Re-execute this Python program with the tunable set, unless it is set already, the
    platform cannot use it, or ``FRACTURE_JAX_HUGE_PAGES=0``. Call before anything heavy."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (TUNABLE in tunables.split(":") or os.environ.get(OPT_OUT) == "0"
            or os.environ.get(_RESTARTED)):
        return
    if not _huge_pages_possible():
        return
    env = dict(os.environ, GLIBC_TUNABLES=with_tunable(tunables), **{_RESTARTED: "1"})
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
