"""Peak resident memory of one train step's process, fracture_jax beside PyTorch.

Each measurement is a fresh process running the same step (a model's full fine-tune, batch
32, 260 px, random weights, synthetic batches): fracture_jax's ``train_speed.py`` under the
default memory policy and with ``FRACTURE_JAX_KEEP_MAPPED`` forced each way, then the PyTorch
peer script. The peak is the kernel's ``ru_maxrss`` of that process alone (``os.wait4``),
its images/s the run's own median. One JSON line each, then a summary.

    python benchmarks/peak_memory.py [--model efficientnetb2] [--peers-dir ../shared/bench/peers]
        [--peers-env ~/.cache/fracture_peers]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_speed import PEER_NAMES  # noqa: E402


def measure(label: str, command: list[str], env: dict) -> dict:
    """Run ``command``; its own peak RSS and its JSON line's median images/s."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    speed = next((r.get("img_per_s_median") for r in records if r.get("img_per_s_median")), None)
    return {"framework": label, "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "img_per_s_median": speed, "exit_code": proc.returncode}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="efficientnetb2")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peers-dir", default="../shared/bench/peers")
    p.add_argument("--peers-env", default=os.environ.get("PEERS", "~/.cache/fracture_peers"))
    a = p.parse_args()
    ours = [sys.executable, "benchmarks/train_speed.py", "--models", a.model, "--modes", "full",
            "--steps", str(a.steps)]
    base = {k: v for k, v in os.environ.items()
            if k not in ("FRACTURE_JAX_KEEP_MAPPED", "FRACTURE_JAX_RESTARTED")}
    rows = [measure("fracture_jax (default policy)", ours, base),
            measure("fracture_jax (KEEP_MAPPED=0)", ours, base | {"FRACTURE_JAX_KEEP_MAPPED": "0"}),
            measure("fracture_jax (KEEP_MAPPED=1)", ours, base | {"FRACTURE_JAX_KEEP_MAPPED": "1"})]
    torch = os.path.join(os.path.expanduser(a.peers_env), "torch", "bin", "python")
    rows.append(measure("pytorch", [torch, os.path.join(a.peers_dir, "torch_bench.py"),
                                    "--models", PEER_NAMES["torch"].get(a.model, a.model),
                                    "--modes", "train", "--channels-last", "1",
                                    "--wait-quiet", "5"], base))
    for row in rows:
        print(json.dumps(row), flush=True)
    torch_peak = rows[-1]["peak_rss_gib"]
    print(json.dumps({"summary": {r["framework"]: {
        "peak_rss_over_pytorch": round(r["peak_rss_gib"] / torch_peak, 3) if torch_peak else None,
        "speed_over_pytorch": round(r["img_per_s_median"] / rows[-1]["img_per_s_median"], 3)
        if r["img_per_s_median"] and rows[-1]["img_per_s_median"] else None} for r in rows}}))


if __name__ == "__main__":
    main()
