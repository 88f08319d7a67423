"""The set-up files: .ci/setup picks the torch build for the machine; environment.yml describes the
pyproject environment; the README quick start."""

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib

import pytest
from conftest import REPO

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def test_environment_yml_installs_the_package_with_its_extras():
    text = (REPO / "environment.yml").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert "- python=3.11" in lines and "- pip" in lines and "- pip:" in lines
    pip_entries = [line[2:].strip() for line in lines[lines.index("- pip:") + 1:]]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert pip_entries == [f"--extra-index-url {CPU_INDEX}", "torch==2.13.0", f"-e .[{','.join(sorted(extras))}]"]


def test_pyproject_pins_the_official_implementation_for_tests_only():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "transformers==5.23.0" in project["optional-dependencies"]["test"]
    assert not any(d.startswith("transformers") for d in project["dependencies"])


def test_readme_quick_start_is_two_commands_and_ci_runs_the_second():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["bash .ci/setup && .venv/bin/python -m minimimo", "bash .ci/run"]
    assert "pytest" in (REPO / ".ci" / "run").read_text()


def test_minimimo_never_imports_transformers():
    for path in (REPO / "minimimo").glob("*.py"):
        source = path.read_text()
        if path.name == "verify.py":  # the one place that compares with it, imported lazily
            continue
        assert "import transformers" not in source and "from transformers" not in source, path.name


# ---------------------------------------------------------------------- .ci/setup --dry-run
@pytest.fixture
def fresh_clone(tmp_path):
    """A folder holding only .ci/setup, so the script sees no .venv (nothing is installed: --dry-run)."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "setup", tmp_path / ".ci" / "setup")
    return tmp_path


def dry_run(folder, tmp_path, *, gpu: str | None, **env) -> subprocess.CompletedProcess:
    """`.ci/setup --dry-run` with a fake nvidia-smi on PATH: gpu="ok" lists a GPU, "broken" fails (the
    binary without a driver), None leaves it out."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    tools = {"bash": shutil.which("bash"), "dirname": shutil.which("dirname"),
             "python3": os.path.realpath(sys.executable)}  # a real interpreter, not a version manager's shim
    for tool, target in tools.items():
        (bin_dir / tool).unlink(missing_ok=True)
        (bin_dir / tool).symlink_to(target)
    fake = bin_dir / "nvidia-smi"
    fake.unlink(missing_ok=True)
    if gpu is not None:
        reply = 'echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"' if gpu == "ok" else "echo 'NVIDIA-SMI has failed' >&2; exit 9"
        fake.write_text(f"#!/bin/sh\n{reply}\n")
        fake.chmod(0o755)
    environment = {"PATH": str(bin_dir), "HOME": str(tmp_path), **env}
    return subprocess.run(["bash", str(folder / ".ci" / "setup"), "--dry-run"], capture_output=True, text=True,
                          env=environment, timeout=120)


@pytest.fixture
def cpu_index(tmp_path):
    """A reachable stand-in for PyTorch's CPU index: a local HTTP server with a torch/ page."""
    root = tmp_path / "cpu-index"
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def pip_install_torch(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("+ ") and "install torch==" in line)


def test_setup_takes_the_cuda_build_where_nvidia_smi_lists_a_gpu(fresh_clone, tmp_path):
    result = dry_run(fresh_clone, tmp_path, gpu="ok")
    assert result.returncode == 0, result.stderr
    assert "NVIDIA GPU is present" in result.stdout
    assert pip_install_torch(result.stdout) == "+ .venv/bin/python -m pip install torch==2.13.0"  # no -q: progress


@pytest.mark.parametrize("gpu", [None, "broken"])
def test_setup_takes_the_cpu_build_without_a_gpu(fresh_clone, tmp_path, cpu_index, gpu):
    result = dry_run(fresh_clone, tmp_path, gpu=gpu, MINIMIMO_TORCH_INDEX=cpu_index)
    assert result.returncode == 0, result.stderr
    assert "no NVIDIA GPU found" in result.stdout
    assert pip_install_torch(result.stdout) == f"+ .venv/bin/python -m pip install torch==2.13.0 --index-url {cpu_index}"


def test_setup_says_when_the_cpu_index_cannot_be_reached(fresh_clone, tmp_path, cpu_index):
    missing = cpu_index + "/no-such-index"  # 404
    result = dry_run(fresh_clone, tmp_path, gpu=None, MINIMIMO_TORCH_INDEX=missing)
    assert result.returncode == 0, result.stderr
    assert f"{missing} cannot be reached" in result.stdout
    assert pip_install_torch(result.stdout) == "+ .venv/bin/python -m pip install torch==2.13.0"


def test_setup_override_wins_and_is_checked(fresh_clone, tmp_path, cpu_index):
    forced = dry_run(fresh_clone, tmp_path, gpu="ok", MINIMIMO_TORCH="cpu", MINIMIMO_TORCH_INDEX=cpu_index)
    assert "--index-url" in pip_install_torch(forced.stdout)
    forced = dry_run(fresh_clone, tmp_path, gpu=None, MINIMIMO_TORCH="cuda")
    assert pip_install_torch(forced.stdout) == "+ .venv/bin/python -m pip install torch==2.13.0"
    wrong = dry_run(fresh_clone, tmp_path, gpu=None, MINIMIMO_TORCH="rocm")
    assert wrong.returncode == 2 and "MINIMIMO_TORCH must be cpu or cuda, got 'rocm'" in wrong.stderr


def test_setup_keeps_an_installed_torch_of_the_wanted_build():
    """Run again in this checkout, whose .venv holds torch 2.13.0: nothing to download."""
    import torch

    build = "cuda" if torch.version.cuda else "cpu"
    result = subprocess.run(["bash", str(REPO / ".ci" / "setup"), "--dry-run"], capture_output=True, text=True,
                            env={**os.environ, "MINIMIMO_TORCH": build}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"torch 2.13.0 ({build} build) is installed already" in result.stdout
    assert "install torch==" not in result.stdout


def test_the_loaders_progress_bar_is_a_widget_in_a_notebook():
    """tqdm.auto draws a widget in a notebook when ipywidgets is installed (the notebooks extra), and
    warns "IProgress not found" without it; in a terminal it stays text."""
    import nbformat
    from nbclient import NotebookClient

    assert any(d.startswith("ipywidgets") for d in
               tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["notebooks"])
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import warnings\nwarnings.simplefilter('always')\nimport minimimo\n"
        "model = minimimo.load(minimimo.default_checkpoint())")])
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    outputs = notebook.cells[0].outputs
    assert not any("IProgress" in output.get("text", "") for output in outputs), outputs
    assert any("application/vnd.jupyter.widget-view+json" in output.get("data", {}) for output in outputs), outputs
