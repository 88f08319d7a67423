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
