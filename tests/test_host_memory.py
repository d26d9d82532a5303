"""The restart with glibc's huge-page tunable: once, only where it can work, and opt-out."""

import os
import subprocess
import sys

from fracture_jax import host_memory

SHOW = ("from fracture_jax.host_memory import restart_with_huge_pages as r; r(); "
        "import os; print(os.environ.get('GLIBC_TUNABLES', ''))")


def run(env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT, "FRACTURE_JAX_RESTARTED")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout.strip()


def test_tunables_are_added_and_removed_without_touching_others():
    assert host_memory.with_tunable(None) == host_memory.TUNABLE
    both = host_memory.with_tunable("glibc.malloc.arena_max=2")
    assert both == f"glibc.malloc.arena_max=2:{host_memory.TUNABLE}"
    assert host_memory.without_tunable(both) == "glibc.malloc.arena_max=2"
    assert host_memory.without_tunable(None) == ""


def test_restart_sets_the_tunable_where_possible_and_respects_opt_out():
    expected = host_memory.TUNABLE if host_memory._huge_pages_possible() else ""
    assert run({}) == expected
    assert run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == (
        host_memory.with_tunable("glibc.malloc.arena_max=2") if expected
        else "glibc.malloc.arena_max=2")
    assert run({host_memory.OPT_OUT: "0"}) == ""
