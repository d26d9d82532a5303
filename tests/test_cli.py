"""The command line: clear one-line errors, and the inspect mode on a data folder."""

import subprocess
import sys

import pytest
from conftest import REPO


def _main(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _error_line(result):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


def test_missing_data_folder_names_the_layout(tmp_path):
    line = _error_line(_main("--config=configs/effnet.py", "--config.optimizer.lr=3e-4",
                             "--mode=train", f"--workdir={tmp_path / 'nodata'}"))
    assert "{train,val,test}/{fractured,not_fractured}" in line


def test_data_root_that_does_not_exist(tmp_path):
    line = _error_line(_main("--config=configs/effnet.py", f"--config.data.root={tmp_path}/x",
                             f"--workdir={tmp_path / 'w'}"))
    assert f"{tmp_path}/x does not exist" in line


@pytest.mark.parametrize("args,expected", [
    (["--config.model.name=resnet18"], "unknown model 'resnet18'"),
    (["--config.optimizer.lrr=1e-3"], 'Did you mean "lr"'),
    (["--config.optimizer.lr=fast"], "could not convert"),
    (["--mode=serve"], "one of <train|eval|cv|predict|export|inspect|lr_find|config>"),
])
def test_bad_settings_give_one_line(args, expected, tmp_path):
    line = _error_line(_main("--config=configs/effnet.py", f"--workdir={tmp_path}", *args))
    assert expected in line


def test_config_mode_prints_the_resolved_config_and_help_names_the_configs(tmp_path):
    result = _main("--config=configs/effnet.py", "--config.optimizer.lr=3e-4", "--mode=config",
                   f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lr: 0.0003" in result.stdout and "name: efficientnetb2" in result.stdout
    assert not list(tmp_path.iterdir())  # nothing run, nothing written
    helped = _main("--help").stdout
    assert "configs/{default.py,demo.py,effnet.py,resnet50.py,vgg16.py}" in helped
    assert "configs/default.py" in helped and "--mode=config" in helped


def test_a_bug_inside_a_config_file_keeps_its_traceback(tmp_path):
    """Only the command line's own mistakes become one line; a config file's bug is the
    user's code failing, and its traceback points into it."""
    config = tmp_path / "mine.py"
    config.write_text("from configs import default\n\n\ndef get_config():\n"
                      "    c = default.get_config()\n    c.optimizer.lrr = c.optimizer.nope\n"
                      "    return c\n")
    result = _main(f"--config={config}", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 1 and "bad command line" not in result.stderr
    assert "Traceback" in result.stderr and f'{config}", line 6' in result.stderr


def test_inspect_prints_counts_and_writes_a_grid(phantom_root, tmp_path):
    result = _main("--config=configs/default.py", "--mode=inspect", f"--workdir={tmp_path}",
                   f"--config.data.root={phantom_root}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train  not_fractured: 12  fractured: 12" in result.stdout
    assert "skipped files: 0" in result.stdout
    assert (tmp_path / "samples.png").stat().st_size > 10_000


def test_runs_from_another_directory(tmp_path):
    """main.py finds configs/ and the package from any working directory."""
    result = _main(f"--config={REPO / 'configs/effnet.py'}", f"--workdir={tmp_path}",
                   "--config.model.name=nope", cwd=tmp_path)
    assert "unknown model 'nope'" in _error_line(result)
