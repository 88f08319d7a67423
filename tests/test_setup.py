"""The set-up files: environment.yml describes the pyproject environment; the README quick start."""

import re
import tomllib

from conftest import REPO


def test_environment_yml_installs_the_package_with_its_extras():
    text = (REPO / "environment.yml").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert "- python=3.11" in lines and "- pip" in lines and "- pip:" in lines
    pip_entries = [line[2:].strip() for line in lines[lines.index("- pip:") + 1:]]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert pip_entries == ["torch==2.13.0", f"-e .[{','.join(sorted(extras))}]"]


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
