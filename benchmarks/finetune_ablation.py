"""Each fine-tuning tool against the plain recipe, on the same data, seed and budget.

One ``main.py --mode=train`` per variant (a process each, the data prepared once), then one
JSON line per variant with its val and test ROC AUC and 95% bootstrap intervals from the
run's ``eval/metrics.json``, and the learning-rate range test's suggestion. A measurement on
one data set and seed, not a claim that any tool helps.

    python benchmarks/finetune_ablation.py [--data /path/to/folder] [--out /tmp/ablation]
        [--config configs/demo.py --model smallcnn --size 96 --epochs 4 --per-class 1000]

Without ``--data`` it generates the phantom set (``--per-class`` images a class).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "plain": [],
    "ema_0.99": ["--config.train.ema_decay=0.99"],
    "layer_decay_0.7": ["--config.optimizer.layer_decay=0.7"],
    "mixup_0.2": ["--config.data.mixup_alpha=0.2"],
    "cutmix_1.0": ["--config.data.cutmix_alpha=1.0"],
    "accumulate_2": ["--config.train.accumulate_steps=2"],
    "balanced_sampling": ["--config.data.sampling=balanced"],
}


def run(out: Path, name: str, common: list[str], extra: list[str], mode: str = "train"):
    workdir = out / name
    command = [sys.executable, str(ROOT / "main.py"), f"--workdir={workdir}", f"--mode={mode}",
               *common, *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        return {"variant": name, "error": done.stderr[-1500:]}
    if mode == "lr_find":
        return {"variant": name, "suggested_lr": json.loads(
            (workdir / "lr_find" / "lr_find.json").read_text())["suggested_lr"]}
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    result = metrics["results"][metrics["primary"]]
    row = {"variant": name, "flags": extra}
    for split in ("val", "test"):
        op = result[split]["operating"]
        row[f"{split}_roc_auc"] = round(op["metrics"]["roc_auc"], 4)
        row[f"{split}_roc_auc_ci95"] = [round(v, 4) for v in op["ci95"]["roc_auc"]]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="")
    p.add_argument("--out", default="/tmp/fracture_jax_ablation")
    p.add_argument("--config", default="configs/demo.py", help="the plain recipe")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    a = p.parse_args()
    out = Path(a.out)
    data = ([f"--config.data.root={a.data}"] if a.data else
            ["--config.data.synthetic=True", f"--config.data.root={out / 'phantoms'}",
             f"--config.data.synthetic_per_class={a.per_class}",
             f"--config.data.synthetic_size={a.size + a.size // 2}"])
    common = ["--config=" + str(ROOT / a.config), *data,
              f"--config.data.prepared_dir={out / 'prepared'}", "--config.data.num_workers=0",
              f"--config.model.name={a.model}", f"--config.model.image_size={a.size}",
              f"--config.train.epochs={a.epochs}", "--config.train.patience=99",
              "--config.train.allow_chance=True", "--config.eval.bootstrap=500",
              f"--config.seed={a.seed}"]
    print(json.dumps(run(out, "lr_find", common, ["--config.lr_find.steps=60"], "lr_find")),
          flush=True)
    for name in a.variants.split(","):
        print(json.dumps(run(out, name, common, VARIANTS[name])), flush=True)


if __name__ == "__main__":
    main()
