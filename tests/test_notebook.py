"""The Colab notebook runs headless, top to bottom, on the CPU with tiny settings put into its
parameters cell: clone skipped (we are inside the repository), no install, phantoms, the
small CNN, one epoch, ONNX export."""

import json
from pathlib import Path

import nbformat
from conftest import REPO
from nbclient import NotebookClient

NOTEBOOK = REPO / "notebooks" / "colab.ipynb"


def _parameters(root: Path, workdir: Path) -> str:
    overrides = ["--config.model.name=smallcnn", "--config.model.image_size=32",
                 "--config.model.pretrained=None", "--config.train.batch_size=8",
                 "--config.train.epochs=1", "--config.train.allow_chance=True",
                 "--config.data.num_workers=0", "--config.eval.gradcam_per_group=1"]
    return (f"\nDATA_DIR = {str(root)!r}\nWORKDIR = {str(workdir)!r}\n"
            f"CONFIG = 'configs/default.py'\nOVERRIDES = {overrides!r}\n"
            "EXPORT_FORMATS = 'onnx'\nMOUNT_DRIVE = False\nINSTALL = False\n")


def test_the_repository_holds_the_notebook_with_outputs_cleared():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_the_notebook_runs_headless(phantom_root, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += _parameters(phantom_root, tmp_path / "run")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs if o.output_type == "stream")
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    assert "training done" in text and "evaluation done" in text
    assert "threshold" in text and "roc_auc" in text
    assert images >= 4  # history, confusion, ROC/PR, reliability, samples, Grad-CAM
    predictions = (tmp_path / "run" / "few_predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + 4
    assert (tmp_path / "run" / "export" / "model.onnx").stat().st_size > 0
    assert json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["results"]
