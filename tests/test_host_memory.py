"""The restart with glibc's malloc tunables: once, never over the user's own values, opt-out."""

import os
import subprocess
import sys

import pytest

from fracture_jax.kernels import host_memory, policy

SHOW = ("from fracture_jax.kernels.host_memory import restart_with_tunables as r; r(); "
        "import os; print(os.environ.get('GLIBC_TUNABLES', ''))")
ARENAS = "glibc.malloc.arena_max=2"


@pytest.fixture(autouse=True)
def keep_mapped(monkeypatch):
    """Buffers kept mapped whatever this machine's free memory (tested on its own below)."""
    monkeypatch.setenv(host_memory.KEEP_MAPPED_OPT_OUT, "1")
    policy.switches.cache_clear()
    yield
    monkeypatch.undo()
    policy.switches.cache_clear()


def run(env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT, "FRACTURE_JAX_RESTARTED")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout.strip()


def test_tunables_are_added_and_removed_without_touching_the_users():
    ours = host_memory.ours()
    assert host_memory.with_tunables(None, ours) == ":".join(ours)
    both = host_memory.with_tunables(ARENAS, ours)
    assert both.split(":") == [ARENAS] + [t for t in ours if "arena_max" not in t]
    assert host_memory.without_tunables(both, ours) == ARENAS
    assert host_memory.without_tunables(None, ours) == ""


def test_restart_sets_the_tunables_on_glibc_and_respects_opt_out():
    on_glibc = host_memory._glibc_linux()
    assert run({}) == (":".join(host_memory.ours()) if on_glibc else "")
    assert run({"GLIBC_TUNABLES": ARENAS}) == (
        host_memory.with_tunables(ARENAS, host_memory.ours()) if on_glibc else ARENAS)
    assert run({host_memory.OPT_OUT: "0"}) == ""
    if on_glibc:
        assert "glibc.malloc.mmap_max=0" in run({})
        huge_pages_only = run({host_memory.KEEP_MAPPED_OPT_OUT: "0"})
        assert "mmap_max" not in huge_pages_only and "arena_max" not in huge_pages_only


def test_memory_stays_mapped_between_large_allocations():
    """With the tunables, freeing and taking again a 256 MiB block faults no new pages."""
    if not host_memory._glibc_linux():
        pytest.skip("glibc's tunables: Linux with glibc only")
    code = ("import ctypes, resource; libc = ctypes.CDLL(None); libc.malloc.restype = "
            "ctypes.c_void_p\n"
            "def touch():\n"
            "    p = libc.malloc(1 << 28); ctypes.memset(p, 1, 1 << 28)\n"
            "    libc.free(ctypes.c_void_p(p))\n"
            "touch(); before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "touch(); print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    env = {k: v for k, v in os.environ.items() if k != "FRACTURE_JAX_RESTARTED"}

    def faults(tunables):
        env["GLIBC_TUNABLES"] = tunables
        return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                  text=True, check=True).stdout)
    kept, fresh = faults(":".join(host_memory.KEEP_MAPPED)), faults("")
    assert fresh >= 100  # 65,536 pages of 4 KiB, or 128 huge ones where THP is always on
    assert kept < fresh / 10, (kept, fresh)


@pytest.mark.parametrize("setting, gib, kept", [("auto", 64.0, True), ("auto", 11.0, False),
                                               ("auto", None, False), ("1", 11.0, True),
                                               ("0", 64.0, False)])
def test_buffers_stay_mapped_only_where_memory_allows(monkeypatch, setting, gib, kept):
    """A 12 GB machine gets the huge pages only (the kept buffers of the default EfficientNetB2
    fine-tune alone hold 12.6 GiB); the setting, when given, decides."""
    monkeypatch.setenv(host_memory.KEEP_MAPPED_OPT_OUT, setting)
    policy.switches.cache_clear()
    monkeypatch.setattr(host_memory, "available_gib", lambda: gib)
    keep, why = host_memory.keep_mapped()
    assert keep is kept and ("GiB" in why or "unknown" in why or "KEEP_MAPPED" in why)
    assert ("glibc.malloc.mmap_max=0" in host_memory.ours()) is kept


def test_no_restart_on_an_accelerator_host(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert host_memory.accelerator_host()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not host_memory.accelerator_host()
    if host_memory._glibc_linux():
        assert run({"JAX_PLATFORMS": "tpu,cpu"}) == ""  # not restarted, allocator unchanged
