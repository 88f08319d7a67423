"""The command line: the README's main job, `info`, `generate` and `chat`."""

import subprocess
import sys

import pytest

from minimimo.cli import main


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIMO_HOME", str(tmp_path))
    return tmp_path


def test_demo_is_the_main_job(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "mimo-tiny-python" in out and "3 MTP blocks" in out and "new tokens, decode" in out


def test_demo_on_the_random_fp8_checkpoint_the_package_writes(home, capsys):
    from minimimo.defaults import demo_checkpoint

    folder = demo_checkpoint()  # the stand-in used when no bundled checkpoint is installed
    assert (folder / "model_1_linear_fc1.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert main(["demo", "--model", str(folder)]) == 0
    assert "grids {'uniform'" in capsys.readouterr().out


def test_info_flash_prints_exact_counts_and_memory():
    out = subprocess.run([sys.executable, "-m", "minimimo", "info", "--flash"], capture_output=True, text=True,
                         check=True).stdout
    assert "308,778,780,864" in out and "15,445,936,320" in out and "GSSSSGSSSSSG" in out
    assert "5.31x" in out  # all-global / hybrid at 256K tokens


def test_generate_streams_and_reports_speed(home, capsys):
    assert main(["generate", "--prompt", "import os", "--max-new-tokens", "5", "--no-stop"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("import os") and "5 new tokens" in captured.err and "tokens/s" in captured.err


def test_chat_keeps_the_conversation(home, monkeypatch, capsys):
    lines = iter(["hello", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("mimo> ") == 2


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        main(["demo", "--model", str(tmp_path / "nowhere")])
