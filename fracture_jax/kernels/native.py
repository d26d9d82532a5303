"""This package's C and C++ sources (``<name>.c``, ``<name>.cc`` beside this file), compiled
on first use.

The system's compilers (``$CC``/``$CXX``, else ``cc``/``c++``) build each source once per
source text, flags, CPU (``-march=native``) and, for C++, the XLA FFI headers that jaxlib ships
(``jax.ffi.include_dir()``), into ``policy.switches().cache_dir``; later processes load the
cached library. Without a compiler, or with ``FRACTURE_JAX_NATIVE=0``, ``library`` returns None
(with a warning saying why) and callers keep their XLA code.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
from pathlib import Path

from fracture_jax.kernels import policy

C_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
CXX_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")


def _cpu() -> str:
    """The machine and its instruction-set flags: what ``-march=native`` compiles for."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def _command(source: Path) -> tuple[str, list[str], str]:
    """(compiler, flags, what else the library depends on) for ``source``."""
    s = policy.switches()
    if source.suffix == ".c":
        return s.c_compiler, list(C_FLAGS), _cpu()
    import jax
    include = jax.ffi.include_dir()
    headers = sorted(Path(include).rglob("*.h"))
    return (s.cxx_compiler, [*CXX_FLAGS, f"-I{include}"],
            "".join(h.read_text() for h in headers))


def build(name: str) -> Path:
    """The compiled library of ``<name>.c`` or ``<name>.cc``, built now unless a cached one
    exists. Raises OSError (no compiler) or RuntimeError (the compiler's complaint)."""
    here = Path(__file__).parent
    source = next(p for p in (here / f"{name}.c", here / f"{name}.cc") if p.exists())
    compiler, flags, depends = _command(source)
    key = hashlib.sha256("\0".join([source.read_text(), compiler, *flags, depends]).encode())
    directory = policy.switches().cache_dir
    library = directory / f"{name}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.partial")
    result = subprocess.run([compiler, *flags, str(source), "-o", str(partial)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} could not compile {source}: {result.stderr[-2000:]}")
    os.replace(partial, library)  # whole or absent, whatever runs beside this process
    return library


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """``<name>``'s loaded library, or None where it cannot be built or loaded."""
    if not policy.switches().native:
        return None
    try:
        return ctypes.CDLL(str(build(name)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logging.warning("%s not compiled (%s): the XLA version runs instead, slower on CPU; "
                        "install a C/C++ compiler with OpenMP (gcc, g++) to get it", name, error)
        return None
