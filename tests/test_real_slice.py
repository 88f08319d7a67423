"""MiMo-V2-Flash at its true sizes: a few layers written on the fly (bench/real_slice.py), 9.8 GB.

Too slow for every CI run (minutes of writing and loading on two cores): marked `slow`, run with
`pytest -m slow tests/test_real_slice.py` (or `--run-slow`). The bf16 load, the timings and the
peak memory are in `bench/real_slice.py`.
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from real_slice import slice_config, write_slice  # noqa: E402

import minimimo  # noqa: E402
from minimimo.hub import INDEX  # noqa: E402
from minimimo.plan import weight_bytes  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_slice(tmp_path_factory):
    return write_slice(tmp_path_factory.mktemp("real-slice"))


def test_slice_has_the_release_layout(real_slice):
    import json

    from safetensors import safe_open

    files = sorted(p.name for p in real_slice.glob("*.safetensors"))
    assert files == ["model_0.safetensors", "model_1.safetensors", "model_1_linear_fc1.safetensors",
                     "model_1_linear_fc2.safetensors", "model_embedding.safetensors", "model_final.safetensors",
                     "model_mtp.safetensors"]
    weight_map = json.loads((real_slice / INDEX).read_text())["weight_map"]
    with safe_open(str(real_slice / "model_0.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight_scale_inv").get_shape() == [8, 32]  # per head
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.layers.0.self_attn.o_proj.weight").get_dtype() == "BF16"
    with safe_open(str(real_slice / "model_1.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.1.self_attn.k_proj.weight_scale_inv").get_shape() == [12, 32]
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "F32"
    assert sum(".experts." in n and n.endswith("proj.weight") for n in weight_map) == 256 * 3


def held(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_fp8_kept_loads_strictly_and_holds_the_planned_bytes(real_slice):
    c = slice_config()
    model = minimimo.load(real_slice, dtype=torch.bfloat16, weight_dtype="fp8", progress=False)
    assert model.config.hidden_size == 4096 and model.config.vocab_size == 152_576
    assert model.config.n_routed_experts == 256 and model.config.moe_intermediate_size == 2048
    fp8_bytes = sum(t.numel() for t in [*model.parameters(), *model.buffers()] if t.dtype == torch.float8_e4m3fn)
    assert fp8_bytes > 6.4e9  # the 768 expert matrices at least stayed 1 byte per weight
    planned = sum(weight_bytes(c, "fp8").values())  # what `minimimo plan` counts before allocating anything
    assert held(model) == planned


def test_fp8_kept_decodes_with_and_without_mtp(real_slice):
    # float32 activations over FP8 weights: exact enough that cached decode, full recomputation
    # and MTP drafting must all give the same tokens
    model = minimimo.load(real_slice, dtype=torch.float32, weight_dtype="fp8", progress=False)
    ids = torch.tensor([[11, 22, 33, 44, 55, 66, 77, 88]])
    greedy = minimimo.generate(model, ids, 3)
    with torch.no_grad():  # full recomputation, the slow twin of cached decode
        full = ids
        for _ in range(3):
            full = torch.cat([full, model(full)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy, full)
    assert torch.equal(minimimo.generate(model, ids, 3, mtp_steps=1), greedy)
