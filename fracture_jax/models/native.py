"""This package's C kernels (``<name>.c`` beside this file), compiled on first use.

The system's C compiler (``$CC``, else ``cc``) builds each source once per source text, flags
and CPU (``-march=native``) into ``$XDG_CACHE_HOME/fracture_jax/native`` (default
``~/.cache``); later processes load the cached library. Without a compiler, or with
``FRACTURE_JAX_NATIVE=0``, ``library`` returns None (with a warning saying why) and callers keep
their XLA code, which computes the same values.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
OPT_OUT = "FRACTURE_JAX_NATIVE"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fracture_jax" / "native"


def _cpu() -> str:
    """The machine and its instruction-set flags: what ``-march=native`` compiles for."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def build(name: str) -> Path:
    """The compiled library of ``<name>.c``, built now unless a cached one exists. Raises
    OSError (no compiler) or RuntimeError (the compiler's complaint)."""
    source = Path(__file__).with_name(f"{name}.c")
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([source.read_text(), compiler, *FLAGS, _cpu()]).encode())
    directory = cache_dir()
    library = directory / f"{name}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.partial")
    result = subprocess.run([compiler, *FLAGS, str(source), "-o", str(partial)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} could not compile {source}: {result.stderr[-2000:]}")
    os.replace(partial, library)  # whole or absent, whatever runs beside this process
    return library


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """``<name>.c``'s loaded library, or None where it cannot be built or loaded."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return None
    try:
        return ctypes.CDLL(str(build(name)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logging.warning("%s.c not compiled (%s): the XLA version runs instead, slower on CPU; "
                        "install a C compiler with OpenMP (gcc) to get it", name, error)
        return None
