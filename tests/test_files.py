"""Output files are written whole or not at all."""

import json

import pytest

from fracture_jax.files import atomic_path, write_json


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "model.keras"
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            assert tmp.endswith(".keras")  # writers that check the suffix still accept it
            open(tmp, "w").write("half")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_a_finished_write_replaces_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    write_json(str(target), {"roc_auc": 0.9})
    assert json.loads(target.read_text()) == {"roc_auc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
