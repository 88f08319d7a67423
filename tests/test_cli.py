"""The command line: the README's main job and `info`."""

import subprocess
import sys

from minimimo.cli import main


def test_demo_writes_loads_and_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIMIMO_HOME", str(tmp_path))
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "logits (1, 16, 256)" in out and "FP8" in out
    assert (tmp_path / "demo-random-v1" / "model_1_linear_fc1.safetensors").is_file()


def test_info_flash_prints_exact_counts():
    out = subprocess.run([sys.executable, "-m", "minimimo", "info", "--flash"], capture_output=True, text=True,
                         check=True).stdout
    assert "308,778,780,864" in out and "15,445,936,320" in out
    assert "GSSSSGSSSSSG" in out
