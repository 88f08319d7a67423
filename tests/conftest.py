"""Shared test helpers: where the official-output cases live, and small model builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SHARED_REFERENCE = REPO.parent / "shared" / "reference"  # present in CI, absent in a user's clone

# one thread: these models are tiny, so threads only add overhead (and stall on a busy machine)
torch.set_num_threads(int(os.environ.get("MINIMIMO_TEST_THREADS", 1)))


def case_dirs() -> list[Path]:
    """Every official-output case: the repo's own fixtures, plus ../shared/reference when present."""
    cases = sorted(p.parent for p in FIXTURES.glob("*/expected.safetensors"))
    if SHARED_REFERENCE.is_dir():
        cases += sorted(p.parent for p in SHARED_REFERENCE.glob("*/expected.safetensors"))
    return cases


def case_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


@pytest.fixture
def tiny_model():
    from minimimo import MiMoConfig, MiMoForCausalLM

    return MiMoForCausalLM(MiMoConfig.tiny()).init_weights(seed=0).eval()


# `slow`: too slow for every CI run (minutes, or GBs on disk). Skipped unless asked for with
# `pytest --run-slow` or a marker expression that names it (`pytest -m slow`).
def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
