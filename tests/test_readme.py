"""Every snippet of the README works: each ```python block runs (against the embedded checkpoint),
and each command of a ```bash block exists: `minimimo ...` lines parse with the real parser (the
ones that load no model also run), other commands name files that are there."""

from __future__ import annotations

import re
import shlex
import importlib.util
import subprocess
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO

from minimimo.cli import build_parser, main

README = (REPO / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands() -> list[list[str]]:
    """Each line of each bash block, comment dropped, `a && b` split, as argument lists."""
    found = []
    for block in blocks("bash"):
        for line in block.splitlines():
            for command in line.split("#")[0].split("&&"):
                if command.strip():
                    found.append(shlex.split(command))
    return found


def minimimo_args(words: list[str]) -> list[str] | None:
    """The arguments given to minimimo (`minimimo ...`, `python -m minimimo ...`, `torchrun ... -m
    minimimo ...`), or None when the command is not minimimo."""
    if words[0] == "minimimo":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "minimimo":
            return words[i + 2:]
    return None


def test_the_readme_has_snippets():
    assert len(blocks("python")) >= 1 and len(commands()) >= 10


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, capsys):
    code = blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out  # every block shows something


@pytest.mark.parametrize("words", [w for w in commands() if minimimo_args(w) is not None], ids=shlex.join)
def test_minimimo_command_parses(words, capsys):
    args = minimimo_args(words)
    if args in (["--help"], ["-h"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0 and "commands" in capsys.readouterr().out
        return
    parsed = build_parser().parse_args(args or ["demo"])  # a usage error raises SystemExit here
    if parsed.command in ("info", "plan"):  # load no model: run them
        assert main(args) == 0
        assert capsys.readouterr().out


@pytest.mark.parametrize("words", [w for w in commands() if minimimo_args(w) is None], ids=shlex.join)
def test_other_command_names_what_is_there(words):
    program, *rest = words
    if program == "bash":
        assert (REPO / rest[0]).is_file(), rest[0]
    elif program == "source":
        assert rest == [".venv/bin/activate"]
        assert (Path(sys.prefix) / "bin" / "activate").is_file()  # the environment the tests run in
    elif program == "jupyter":
        assert shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)), "jupyterlab is not installed"
        assert rest[0] == "lab" and (REPO / rest[1]).is_dir()
    elif program == "python" and rest[0].startswith("bench/"):
        assert (REPO / rest[0]).is_file(), rest[0]
        done = subprocess.run([sys.executable, rest[0], "--help"], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    elif program == "pip":  # installing a package the README names: it must be one we depend on
        assert rest[:2] == ["install", "-U"] and rest[2] in (REPO / "pyproject.toml").read_text(), rest
    elif program == "hf":  # huggingface_hub's command line, for the real weights (not run: 292 GiB)
        assert rest[0] == "download" and rest[1] == "XiaomiMiMo/MiMo-V2-Flash", rest
        assert importlib.util.find_spec("huggingface_hub"), "huggingface_hub is not installed"
    else:
        pytest.fail(f"the README runs {shlex.join(words)!r}, which this test does not know how to check")
