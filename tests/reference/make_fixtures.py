"""Generate the golden test fixtures in ``tests/fixtures`` from the official implementation.

Each fixture is a tiny, randomly initialised MiMo-V2-Flash checkpoint written in the layout of the
Hugging Face repository ``XiaomiMiMo/MiMo-V2-Flash`` (hub ``config.json`` keys, hub tensor names,
sharded safetensors + ``model.safetensors.index.json``), plus what the official implementation
(transformers ``MiMoV2FlashForCausalLM``, eager attention, ``grouped_mm`` experts) computes for it:

* ``expected.safetensors``: ``input_ids`` [B, T] int64, ``logits`` [B, T, V] float32,
  ``hidden_states.K`` [B, T, H] float32 for K = 0..L (0 = embeddings, K = output of layer K-1,
  L = output of the final norm), ``greedy_ids`` [B, T + n] int64 (cached greedy generation with
  EOS stopping off, checked against greedy decoding by full recomputation without a cache).
  The ``pad-left`` case adds ``attention_mask`` / ``position_ids`` [B, T] int64 and
  ``greedy_ids_unpadded.R`` [1, T_R + n] (row R's prompt alone, without padding).
* ``meta.json``: versions, seed, settings, the smallest top-1/top-2 logit gap along the greedy path
  and the smallest router selection gap (seeds with near ties are skipped), observed tolerances and
  sanity numbers.

Usage::

    python tests/reference/make_fixtures.py [--out tests/fixtures] [--only NAME ...]

The module is importable; a live parity test can reuse :func:`hub_config`,
:func:`random_hub_state`, :func:`official_model` and :func:`write_case`.

FP8 cases: every chosen linear is quantized block-wise to ``float8_e4m3fn`` with a float32
``<name>_scale_inv`` (scale = block amax / 448). The reference outputs are computed by the official
model in float32 on the correctly dequantized weights (``float32(fp8) * scale_inv`` of the block),
NOT by transformers' own FP8 loader (which infers the block height as rows // scale_rows and is
therefore wrong for partial blocks and for the per-head grid of the hub's full-attention k_proj).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import transformers
from transformers import AutoModelForCausalLM, MiMoV2FlashConfig, MiMoV2FlashForCausalLM

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

FP8_MAX = 448.0
PARTIAL_ROTARY_FACTOR = 0.334
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"

# Thresholds under which a seed is considered a near tie and is re-drawn.
GREEDY_GAP_MIN = 1e-3
ROUTER_GAP_MIN = 1e-5

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

# Values a caller may choose. Everything else in the hub config is derived from these, with the
# values transformers 5.23 hard-codes (so the stored config says what the official model computes).
_CONFIG_DEFAULTS = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=24,
    v_head_dim=16,
    sliding_window_size=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=None,
    attention_value_scale=0.707,
    initializer_range=0.02,
    max_position_embeddings=4096,
    use_cache=True,
    torch_dtype="float32",
    bos_token_id=1,
    eos_token_id=2,
)


def is_full_attention_layer(i: int) -> bool:
    """transformers' rule: full attention at layer 0 and wherever (i + 1) % 6 == 0."""
    return i == 0 or (i + 1) % 6 == 0


def rotary_dim(head_dim: int) -> int:
    return int(head_dim * PARTIAL_ROTARY_FACTOR)


def hub_config(*, quantization: str | None = None, fp8_block: int = 16, **overrides) -> dict:
    """Return a hub-style ``config.json`` dict (all the hub's keys, in the hub's spelling).

    ``overrides`` may set any key of ``_CONFIG_DEFAULTS``; the remaining keys (``swa_*``,
    ``hybrid_layer_pattern``, ``moe_layer_freq``, ``sliding_window``, thetas, eps, ...) are derived
    so that they equal what transformers 5.23 derives on its own.

    ``quantization``: None, ``"fp8"`` (every decoder linear FP8; ``ignored_layers`` names
    ``lm_head`` and the routers) or ``"fp8-hub"`` (as released: ``o_proj`` unquantized and
    ``ignored_layers`` = every ``o_proj`` + ``model.decoder.self_attn.o_proj``).
    """
    unknown = set(overrides) - set(_CONFIG_DEFAULTS)
    if unknown:
        raise ValueError(f"hub_config: keys that cannot be set directly: {sorted(unknown)}")
    v = {**_CONFIG_DEFAULTS, **overrides}
    L, nh, kv, d = v["num_hidden_layers"], v["num_attention_heads"], v["num_key_value_heads"], v["head_dim"]
    rd = rotary_dim(d)
    if rd == 0 or rd % 2:
        raise ValueError(f"head_dim {d}: int(head_dim * 0.334) = {rd} must be even and > 0")
    if nh % (2 * kv):
        raise ValueError("num_attention_heads must be divisible by 2 * num_key_value_heads (SWA kv heads)")
    e, ng, tg, k = v["n_routed_experts"], v["n_group"], v["topk_group"], v["num_experts_per_tok"]
    if e % ng or e // ng < 2:
        raise ValueError("n_routed_experts must split into n_group groups of >= 2 experts")
    if not 1 <= tg <= ng or tg * (e // ng) < k:
        raise ValueError("topk_group groups must hold at least num_experts_per_tok experts")
    w = v["sliding_window_size"]

    cfg = {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": v["vocab_size"],
        "hidden_size": v["hidden_size"],
        "intermediate_size": v["intermediate_size"],
        "moe_intermediate_size": v["moe_intermediate_size"],
        "num_hidden_layers": L,
        "num_attention_heads": nh,
        "num_key_value_heads": kv,
        "head_dim": d,
        "v_head_dim": v["v_head_dim"],
        "swa_num_attention_heads": nh,
        "swa_num_key_value_heads": 2 * kv,
        "swa_head_dim": d,
        "swa_v_head_dim": v["v_head_dim"],
        "hybrid_layer_pattern": [0 if is_full_attention_layer(i) else 1 for i in range(L)],
        "moe_layer_freq": [0] + [1] * (L - 1),
        "sliding_window": w,
        "sliding_window_size": w,
        "attention_chunk_size": w,
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "rope_theta": 5000000,
        "swa_rope_theta": 10000,
        "partial_rotary_factor": PARTIAL_ROTARY_FACTOR,
        "attention_value_scale": v["attention_value_scale"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "n_routed_experts": e,
        "n_shared_experts": None,
        "num_experts_per_tok": k,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": ng,
        "topk_group": tg,
        "norm_topk_prob": v["norm_topk_prob"],
        "routed_scaling_factor": v["routed_scaling_factor"],
        "layernorm_epsilon": 1e-05,
        "hidden_act": "silu",
        "initializer_range": v["initializer_range"],
        "tie_word_embeddings": False,
        "max_position_embeddings": v["max_position_embeddings"],
        "use_cache": v["use_cache"],
        "torch_dtype": v["torch_dtype"],
        "bos_token_id": v["bos_token_id"],
        "eos_token_id": v["eos_token_id"],
    }
    if quantization == "fp8":
        cfg["torch_dtype"] = "bfloat16"
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [fp8_block, fp8_block],
            "ignored_layers": ["lm_head"] + [f"model.layers.{i}.mlp.gate" for i in range(1, L)],
        }
    elif quantization == "fp8-hub":
        cfg["torch_dtype"] = "bfloat16"
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [fp8_block, fp8_block],
            "packed_modules_mapping": {},
            "ignored_layers": [f"model.layers.{i}.self_attn.o_proj" for i in range(L)]
            + ["model.decoder.self_attn.o_proj"],
        }
    elif quantization is not None:
        raise ValueError(f"unknown quantization {quantization!r}")
    return cfg


def official_config(config_dict: dict) -> MiMoV2FlashConfig:
    """The transformers config for a hub dict (without quantization: we feed dequantized weights)."""
    d = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    return MiMoV2FlashConfig(**d)


def layer_geometry(cfg: dict, i: int) -> dict:
    full = cfg["hybrid_layer_pattern"][i] == 0
    return {
        "full": full,
        "kv": cfg["num_key_value_heads"] if full else cfg["swa_num_key_value_heads"],
        "nh": cfg["num_attention_heads"] if full else cfg["swa_num_attention_heads"],
        "moe": cfg["moe_layer_freq"][i] == 1,
    }


# ----------------------------------------------------------------------------------------------
# Random weights (hub names)
# ----------------------------------------------------------------------------------------------


def _normal(gen, shape, std):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def _uniform(gen, shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float32)


def _linear(gen, out_f, in_f):
    return _normal(gen, (out_f, in_f), 1.0 / math.sqrt(in_f))


def random_hub_state(config_dict: dict, seed: int, router_bias_std: float = 0.1) -> dict[str, torch.Tensor]:
    """Random but plausible float32 weights under the hub's tensor names (main model only).

    Norm weights U(0.8, 1.2); linear weights N(0, 1/fan_in); sinks N(0, 1); router N(0, 1/H);
    ``e_score_correction_bias`` N(0, router_bias_std) (comparable to the spread of the sigmoid
    scores, so the bias changes expert choices); embeddings N(0, 1); lm_head N(0, 1/H).
    """
    c = config_dict
    gen = torch.Generator().manual_seed(seed)
    H, V = c["hidden_size"], c["vocab_size"]
    D, DV = c["head_dim"], c["v_head_dim"]
    s: dict[str, torch.Tensor] = {}
    s["model.embed_tokens.weight"] = _normal(gen, (V, H), 1.0)
    for i in range(c["num_hidden_layers"]):
        g = layer_geometry(c, i)
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = _uniform(gen, (H,), 0.8, 1.2)
        s[p + "post_attention_layernorm.weight"] = _uniform(gen, (H,), 0.8, 1.2)
        s[p + "self_attn.q_proj.weight"] = _linear(gen, g["nh"] * D, H)
        s[p + "self_attn.k_proj.weight"] = _linear(gen, g["kv"] * D, H)
        s[p + "self_attn.v_proj.weight"] = _linear(gen, g["kv"] * DV, H)
        s[p + "self_attn.o_proj.weight"] = _linear(gen, H, g["nh"] * DV)
        if not g["full"]:
            s[p + "self_attn.attention_sink_bias"] = _normal(gen, (g["nh"],), 1.0)
        if g["moe"]:
            E, MI = c["n_routed_experts"], c["moe_intermediate_size"]
            s[p + "mlp.gate.weight"] = _normal(gen, (E, H), 1.0 / math.sqrt(H))
            s[p + "mlp.gate.e_score_correction_bias"] = _normal(gen, (E,), router_bias_std)
            for e in range(E):
                s[p + f"mlp.experts.{e}.gate_proj.weight"] = _linear(gen, MI, H)
                s[p + f"mlp.experts.{e}.up_proj.weight"] = _linear(gen, MI, H)
                s[p + f"mlp.experts.{e}.down_proj.weight"] = _linear(gen, H, MI)
        else:
            I = c["intermediate_size"]
            s[p + "mlp.gate_proj.weight"] = _linear(gen, I, H)
            s[p + "mlp.up_proj.weight"] = _linear(gen, I, H)
            s[p + "mlp.down_proj.weight"] = _linear(gen, H, I)
    s["model.norm.weight"] = _uniform(gen, (H,), 0.8, 1.2)
    s["lm_head.weight"] = _normal(gen, (V, H), 1.0 / math.sqrt(H))
    return s


def random_mtp_state(config_dict: dict, seed: int, blocks: int = 1) -> dict[str, torch.Tensor]:
    """Random float32 MTP block tensors with the released checkpoint's names (SWA geometry, dense MLP).

    transformers has no MTP modules and ignores ``model.mtp.*``; these only exercise a loader.
    """
    c = config_dict
    gen = torch.Generator().manual_seed(seed)
    H, D, DV, I = c["hidden_size"], c["head_dim"], c["v_head_dim"], c["intermediate_size"]
    nh, kv = c["swa_num_attention_heads"], c["swa_num_key_value_heads"]
    s: dict[str, torch.Tensor] = {}
    for b in range(blocks):
        p = f"model.mtp.layers.{b}."
        s[p + "enorm.weight"] = _uniform(gen, (H,), 0.8, 1.2)
        s[p + "hnorm.weight"] = _uniform(gen, (H,), 0.8, 1.2)
        s[p + "eh_proj.weight"] = _linear(gen, H, 2 * H)
        s[p + "input_layernorm.weight"] = _uniform(gen, (H,), 0.8, 1.2)
        s[p + "self_attn.q_proj.weight"] = _linear(gen, nh * D, H)
        s[p + "self_attn.k_proj.weight"] = _linear(gen, kv * D, H)
        s[p + "self_attn.v_proj.weight"] = _linear(gen, kv * DV, H)
        s[p + "self_attn.o_proj.weight"] = _linear(gen, H, nh * DV)
        s[p + "self_attn.attention_sink_bias"] = _normal(gen, (nh,), 1.0)
        s[p + "pre_mlp_layernorm.weight"] = _uniform(gen, (H,), 0.8, 1.2)
        s[p + "mlp.gate_proj.weight"] = _linear(gen, I, H)
        s[p + "mlp.up_proj.weight"] = _linear(gen, I, H)
        s[p + "mlp.down_proj.weight"] = _linear(gen, H, I)
        s[p + "final_layernorm.weight"] = _uniform(gen, (H,), 0.8, 1.2)
    return s


# ----------------------------------------------------------------------------------------------
# FP8 block quantization
# ----------------------------------------------------------------------------------------------


def uniform_row_blocks(rows: int, b: int) -> list[tuple[int, int]]:
    return [(r, min(r + b, rows)) for r in range(0, rows, b)]


def per_head_row_blocks(rows: int, head_dim: int, b: int) -> list[tuple[int, int]]:
    """Row blocks of height b that restart at every head of ``head_dim`` rows (last one partial)."""
    if rows % head_dim:
        raise ValueError(f"{rows} rows are not a whole number of {head_dim}-row heads")
    out = []
    for h0 in range(0, rows, head_dim):
        out += [(h0 + r0, h0 + r1) for r0, r1 in uniform_row_blocks(head_dim, b)]
    return out


def quantize_fp8(w: torch.Tensor, b: int, row_blocks: list[tuple[int, int]], gen: torch.Generator | None):
    """Block-wise FP8 quantization. Each block first gets a random magnitude 2^U(-1.5, 1.5) (if
    ``gen`` is given), then ``scale_inv = amax / 448`` and ``fp8 = (w / scale_inv)``.

    Returns (fp8 weight, float32 scale_inv [row blocks, ceil(in/b)], the scaled float32 weight).
    """
    rows, cols = w.shape
    col_blocks = uniform_row_blocks(cols, b)
    w = w.clone()
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(len(row_blocks), len(col_blocks), dtype=torch.float32)
    for bi, (r0, r1) in enumerate(row_blocks):
        for bj, (c0, c1) in enumerate(col_blocks):
            blk = w[r0:r1, c0:c1]
            if gen is not None:
                blk *= 2.0 ** _uniform(gen, (), -1.5, 1.5)
            s = blk.abs().amax() / FP8_MAX
            scale[bi, bj] = s
            q[r0:r1, c0:c1] = (blk / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale, w


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, b: int, row_blocks: list[tuple[int, int]]) -> torch.Tensor:
    """``float32(fp8[i, j]) * scale_inv[block of row i, j // b]`` (a float32 multiply)."""
    rows, cols = q.shape
    if len(row_blocks) != scale.shape[0] or math.ceil(cols / b) != scale.shape[1]:
        raise ValueError(f"grid {len(row_blocks)} x {math.ceil(cols / b)} does not match scale {tuple(scale.shape)}")
    row_idx = torch.empty(rows, dtype=torch.long)
    for bi, (r0, r1) in enumerate(row_blocks):
        row_idx[r0:r1] = bi
    col_idx = torch.arange(cols) // b
    return q.to(torch.float32) * scale.to(torch.float32)[row_idx][:, col_idx]


def blocks_below_max(q: torch.Tensor, b: int, row_blocks: list[tuple[int, int]]) -> int:
    """Number of blocks of a candidate grid whose largest |fp8| is below 448 (0 for the true grid)."""
    a = q.to(torch.float32).abs()
    n = 0
    for r0, r1 in row_blocks:
        for c0, c1 in uniform_row_blocks(q.shape[1], b):
            n += int(a[r0:r1, c0:c1].amax() < FP8_MAX)
    return n


def grid_for(q: torch.Tensor, scale: torch.Tensor, b: int, head_dim: int) -> list[tuple[int, int]]:
    """The row grid a scale's shape implies: uniform (ceil(rows/b) rows) or per-head
    (rows/head_dim * ceil(head_dim/b) rows). If both fit the shape, the amax test decides."""
    rows = q.shape[0]
    cands = []
    if scale.shape[0] == math.ceil(rows / b):
        cands.append(uniform_row_blocks(rows, b))
    if rows % head_dim == 0 and scale.shape[0] == (rows // head_dim) * math.ceil(head_dim / b):
        g = per_head_row_blocks(rows, head_dim, b)
        if g not in cands:
            cands.append(g)
    if not cands:
        raise ValueError(f"no FP8 grid explains weight {tuple(q.shape)} with scale {tuple(scale.shape)}")
    if len(cands) > 1:
        cands = [g for g in cands if blocks_below_max(q, b, g) == 0]
        if len(cands) != 1:
            raise ValueError(f"ambiguous FP8 grid for weight {tuple(q.shape)} with scale {tuple(scale.shape)}")
    return cands[0]


def dequantize_state(config_dict: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float32 copy of a stored state: FP8 tensors dequantized (grid from the scale's shape), scales
    dropped, everything else converted exactly to float32."""
    qc = config_dict.get("quantization_config") or {}
    b = (qc.get("weight_block_size") or [None])[0]
    out = {}
    for name, t in state.items():
        if name.endswith("_scale_inv"):
            continue
        sname = name + "_scale_inv"
        if sname in state:
            if b is None:
                raise ValueError(f"{name} has a scale but the config has no weight_block_size")
            grid = grid_for(t, state[sname], b, config_dict["head_dim"])
            out[name] = dequantize_fp8(t, state[sname], b, grid)
        else:
            out[name] = t.to(torch.float32)
    return out


# ----------------------------------------------------------------------------------------------
# Storage formats
# ----------------------------------------------------------------------------------------------

_FP8_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _fp8_targets(cfg: dict, hub_style: bool) -> list[str]:
    names = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj in _FP8_ATTN:
            if hub_style and proj == "o_proj":
                continue
            names.append(p + f"self_attn.{proj}.weight")
        if cfg["moe_layer_freq"][i]:
            for e in range(cfg["n_routed_experts"]):
                names += [p + f"mlp.experts.{e}.{x}_proj.weight" for x in ("gate", "up", "down")]
        else:
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def _is_router(name: str) -> bool:
    return name.endswith("mlp.gate.weight") or name.endswith("mlp.gate.e_score_correction_bias")


def store_state(cfg: dict, state: dict[str, torch.Tensor], kind: str, seed: int = 0):
    """Convert float32 hub weights to what goes on disk.

    kind ``"float32"``: as is. ``"bfloat16"``: bf16 except the router (float32; the router weight
    rounded to bf16-representable values, the correction bias arbitrary float32).
    ``"fp8"`` / ``"fp8-hub"``: FP8 + float32 ``_scale_inv`` for the quantized linears (see
    :func:`hub_config`), bf16 for the rest, float32 router. In ``"fp8-hub"`` the full-attention
    ``k_proj`` uses the per-head grid; MTP tensors in ``state`` are quantized like the hub does.

    Returns (stored state, float32 weights before quantization rounding (block magnitudes applied),
    info dict).
    """
    info: dict = {}
    if kind == "float32":
        return {k: v.clone() for k, v in state.items()}, state, info
    if kind == "bfloat16":
        out = {}
        for k, v in state.items():
            if k.endswith("mlp.gate.weight"):
                out[k] = v.to(torch.bfloat16).to(torch.float32)
            elif k.endswith("e_score_correction_bias"):
                out[k] = v.clone()
            else:
                out[k] = v.to(torch.bfloat16)
        return out, state, info
    if kind not in ("fp8", "fp8-hub"):
        raise ValueError(kind)
    hub_style = kind == "fp8-hub"
    b = cfg["quantization_config"]["weight_block_size"][0]
    D = cfg["head_dim"]
    gen = torch.Generator().manual_seed(seed + 7_000_003)
    targets = set(_fp8_targets(cfg, hub_style))
    if hub_style:
        for k in state:
            if k.startswith("model.mtp.") and any(
                k.endswith(f"{m}.weight") for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
            ):
                targets.add(k)
    out, pre = {}, {}
    partial, per_head = set(), []
    for k, v in state.items():
        if k in targets:
            full_k = (
                hub_style
                and k.endswith("self_attn.k_proj.weight")
                and k.startswith("model.layers.")
                and cfg["hybrid_layer_pattern"][int(k.split(".")[2])] == 0
            )
            grid = per_head_row_blocks(v.shape[0], D, b) if full_k else uniform_row_blocks(v.shape[0], b)
            q, s, w_scaled = quantize_fp8(v, b, grid, gen)
            out[k], out[k + "_scale_inv"], pre[k] = q, s, w_scaled
            if full_k:
                per_head.append(k)
            if v.shape[0] % b or v.shape[1] % b or any(r1 - r0 != b for r0, r1 in grid):
                generic = ".".join("*" if p.isdigit() else p for p in k.split("."))
                partial.add(f"{generic} {list(v.shape)} -> scale {list(s.shape)}")
        elif _is_router(k):
            out[k], pre[k] = v.clone(), v
        else:
            out[k] = v.to(torch.bfloat16)
            pre[k] = v
    info["weights_with_partial_blocks"] = sorted(partial)
    info["per_head_grid_tensors"] = per_head
    return out, pre, info


# ----------------------------------------------------------------------------------------------
# Hub names <-> transformers names; the official model in memory
# ----------------------------------------------------------------------------------------------


def to_transformers_state(config_dict: dict, state32: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map float32 hub-named weights to transformers' parameter names: ``attention_sink_bias`` ->
    ``sinks``; per-expert gate/up -> ``experts.gate_up_proj`` [E, 2*MI, H] (gate rows first) and
    down -> ``experts.down_proj`` [E, H, MI]. ``model.mtp.*`` is dropped (transformers has no MTP)."""
    E = config_dict["n_routed_experts"]
    out = {}
    experts: dict[str, dict] = {}
    for k, v in state32.items():
        if k.startswith("model.mtp."):
            continue
        if ".mlp.experts." in k:
            prefix, rest = k.split(".mlp.experts.")
            e, proj = rest.split(".")[:2]
            experts.setdefault(prefix, {})[(int(e), proj)] = v
            continue
        out[k.replace("self_attn.attention_sink_bias", "self_attn.sinks")] = v
    for prefix, d in experts.items():
        out[prefix + ".mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([d[(e, "gate_proj")], d[(e, "up_proj")]], 0) for e in range(E)]
        )
        out[prefix + ".mlp.experts.down_proj"] = torch.stack([d[(e, "down_proj")] for e in range(E)])
    return out


def official_model(
    config_dict: dict,
    hub_state: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    experts_implementation: str = "grouped_mm",
) -> MiMoV2FlashForCausalLM:
    """The official transformers model built in memory from hub-named weights (FP8 tensors with a
    ``_scale_inv`` companion are dequantized first; MTP tensors are ignored).

    Mirrors ``from_pretrained(..., dtype=dtype)``: parameters in ``dtype``, while
    ``e_score_correction_bias`` and the rotary ``inv_freq`` buffers stay float32."""
    state32 = dequantize_state(config_dict, hub_state)
    model = MiMoV2FlashForCausalLM(official_config(config_dict))
    model.load_state_dict(to_transformers_state(config_dict, state32), strict=True)
    keep32 = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.float32}
    model.to(dtype)
    for n, b in keep32.items():
        mod_name, _, attr = n.rpartition(".")
        mod = model.get_submodule(mod_name)
        mod._buffers[attr] = b
    model.set_attn_implementation("eager")
    model.set_experts_implementation(experts_implementation)
    return model.eval()


def load_official(folder: str | os.PathLike, dtype: torch.dtype):
    """``from_pretrained`` as the reference uses it; returns (model, loading info dict)."""
    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder),
        dtype=dtype,
        attn_implementation="eager",
        experts_implementation="grouped_mm",
        output_loading_info=True,
    )
    return model.eval(), info


@contextlib.contextmanager
def _mtp_ignore_rule_disabled():
    """Temporarily drop transformers' ``^model\\.mtp\\.`` ignore rule, to see what the loader drops."""
    from transformers.models.mimo_v2_flash import modeling_mimo_v2_flash as mm

    saved = mm.MiMoV2FlashPreTrainedModel.__dict__.get("_keys_to_ignore_on_load_unexpected")
    mm.MiMoV2FlashPreTrainedModel._keys_to_ignore_on_load_unexpected = None
    try:
        yield
    finally:
        mm.MiMoV2FlashPreTrainedModel._keys_to_ignore_on_load_unexpected = saved


# ----------------------------------------------------------------------------------------------
# Writing a case folder
# ----------------------------------------------------------------------------------------------


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def shard_plan(config_dict: dict, names: list[str], layout: str) -> dict[str, str]:
    """tensor name -> file name. ``two-shard``: embeddings + first half of the layers in shard 1,
    the rest + norm + lm_head in shard 2. ``hub``: the released checkpoint's per-layer files."""
    L = config_dict["num_hidden_layers"]
    plan = {}
    for n in names:
        if layout == "two-shard":
            if n.startswith("model.layers."):
                i = int(n.split(".")[2])
                f = 1 if i < (L + 1) // 2 else 2
            elif n.startswith("model.embed_tokens."):
                f = 1
            else:
                f = 2
            plan[n] = f"model-0000{f}-of-00002.safetensors"
        elif layout == "hub":
            if n.startswith("model.embed_tokens."):
                plan[n] = "model_embedding.safetensors"
            elif n.startswith("model.mtp."):
                plan[n] = "model_mtp.safetensors"
            elif n.startswith("model.layers."):
                i = int(n.split(".")[2])
                if ".mlp.experts." in n:
                    fc = "fc2" if ".down_proj." in n else "fc1"
                    plan[n] = f"model_{i}_linear_{fc}.safetensors"
                else:
                    plan[n] = f"model_{i}.safetensors"
            elif n in ("lm_head.weight", "model.norm.weight"):
                plan[n] = "model_final.safetensors"
            else:
                raise ValueError(f"no hub file for {n}")
        else:
            raise ValueError(layout)
    return plan


def write_checkpoint(folder: Path, config_dict: dict, state: dict[str, torch.Tensor], layout: str) -> dict[str, int]:
    """Write config.json, the weight files and model.safetensors.index.json; return file -> count."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    plan = shard_plan(config_dict, list(state), layout)
    files: dict[str, dict] = {}
    for n, f in plan.items():
        files.setdefault(f, {})[n] = state[n].contiguous()
    for f, tensors in sorted(files.items()):
        save_file(tensors, str(folder / f), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(_nbytes(t) for t in state.values())},
        "weight_map": {n: plan[n] for n in sorted(plan)},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {f: len(t) for f, t in sorted(files.items())}


def write_case(
    folder: str | os.PathLike,
    config_dict: dict,
    stored_state: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    meta: dict,
    layout: str = "two-shard",
) -> None:
    """Write one complete case folder (checkpoint + expected.safetensors + meta.json)."""
    folder = Path(folder)
    files = write_checkpoint(folder, config_dict, stored_state, layout)
    meta = {**meta, "files": files}
    save_file({k: v.contiguous() for k, v in expected.items()}, str(folder / "expected.safetensors"))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for f in folder.iterdir():
        f.chmod(0o644)


def read_folder_state(folder: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a case folder through its index (as a loader would)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    if set(out) != set(index["weight_map"]):
        raise AssertionError("index and files disagree")
    return out


# ----------------------------------------------------------------------------------------------
# Official outputs and checks
# ----------------------------------------------------------------------------------------------


def _positions(mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor:
    if mask is None:
        return torch.arange(T).unsqueeze(0).expand(B, T)
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def forward_outputs(model, ids: torch.Tensor, mask: torch.Tensor | None = None):
    kw = {}
    if mask is not None:
        kw = dict(attention_mask=mask, position_ids=_positions(mask, *ids.shape))
    return model(ids, output_hidden_states=True, use_cache=False, **kw)


@torch.no_grad()
def greedy_generate(model, ids, n, mask=None):
    kw = {} if mask is None else {"attention_mask": mask}
    return model.generate(ids, do_sample=False, max_new_tokens=n, use_cache=True, eos_token_id=None, **kw)


@torch.no_grad()
def greedy_recompute(model, ids, n, mask=None):
    """Greedy decoding by full recomputation without a cache; also returns the top-1/top-2 gaps."""
    gaps = []
    for _ in range(n):
        kw = {}
        if mask is not None:
            kw = dict(attention_mask=mask, position_ids=_positions(mask, *ids.shape))
        last = model(ids, use_cache=False, **kw).logits[:, -1].float()
        top2 = last.topk(2, dim=-1).values
        gaps.append((top2[:, 0] - top2[:, 1]).min().item())
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids, min(gaps)


@torch.no_grad()
def router_inputs(model, ids, mask=None) -> list[torch.Tensor]:
    """The inputs of every router (one [tokens, H] tensor per MoE layer), pad tokens dropped."""
    captured = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1])))
        for m in model.modules()
        if type(m).__name__ == "MiMoV2FlashTopkRouter"
    ]
    try:
        kw = {} if mask is None else dict(attention_mask=mask, position_ids=_positions(mask, *ids.shape))
        model(ids, use_cache=False, **kw)
    finally:
        for h in hooks:
            h.remove()
    if mask is not None:
        keep = mask.reshape(-1).bool()
        captured = [x[keep] for x in captured]
    return captured


def router_selection(router, x: torch.Tensor, use_bias: bool = True):
    """Recompute transformers' selection; return (selected expert sets as a bool mask, smallest gap).

    The gap is the smaller of: the k-th chosen vs the best unchosen biased score among the allowed
    groups, and (n_group > topk_group) the topk_group-th vs the next group score."""
    logits = F.linear(x.float(), router.weight.float())
    scores = logits.sigmoid()
    sfc = scores + (router.e_score_correction_bias if use_bias else 0.0)
    ng, tg, k, E = router.num_group, router.topk_group, router.top_k, router.num_experts
    gaps = []
    gs = sfc.view(-1, ng, E // ng).topk(2, dim=-1).values.sum(-1)
    if tg < ng:
        gss = gs.sort(-1, descending=True).values
        gaps.append((gss[:, tg - 1] - gss[:, tg]).min())
    gidx = gs.topk(tg, dim=-1).indices
    gmask = torch.zeros_like(gs).scatter_(1, gidx, 1).bool()
    allowed = gmask.unsqueeze(-1).expand(-1, ng, E // ng).reshape(-1, E)
    masked = sfc.masked_fill(~allowed, float("-inf"))
    ss = masked.sort(-1, descending=True).values
    if allowed.sum(-1).min() > k:
        gaps.append((ss[:, k - 1] - ss[:, k]).min())
    sel = torch.zeros_like(sfc, dtype=torch.bool).scatter_(1, masked.topk(k, dim=-1).indices, True)
    gap = min(g.item() for g in gaps) if gaps else float("inf")
    return sel, gap


def _max_abs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a.float() - b.float()).abs()
    if mask is not None:
        d = d[mask.bool()]
    return d.max().item()


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclass
class CaseSpec:
    name: str
    description: str
    config: dict
    storage: str = "float32"  # float32 | bfloat16 | fp8 | fp8-hub
    layout: str = "two-shard"  # two-shard | hub
    seed: int = 1000
    batch: int = 2
    seq_len: int = 24
    new_tokens: int = 10
    pad_left: list[int] | None = None  # pad tokens per row (left padding)
    mtp_blocks: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.storage == "bfloat16" else torch.float32


CASES: list[CaseSpec] = [
    CaseSpec(
        name="l3-w4-kv1",
        description="3 layers [0,1,1]; window 4 < T=24; 1 kv head (SWA 2); 4 experts top-2; routed_scaling_factor 2.5; head_dim 12 (rotary 4); float32",
        config=hub_config(
            vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=12, v_head_dim=8,
            sliding_window_size=4, n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=2.5,
        ),
        seed=1100, seq_len=24, new_tokens=10,
    ),
    CaseSpec(
        name="l6-w64-kv2-group",
        description="6 layers [0,1,1,1,1,0] (last layer full attention); window 64 > T=24 (+12 new); 2 kv heads (SWA 4); 8 experts top-2 with n_group 4, topk_group 2; routed_scaling_factor null; float32",
        config=hub_config(
            vocab_size=192, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=24, v_head_dim=16,
            sliding_window_size=64, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
            routed_scaling_factor=None,
        ),
        seed=1200, seq_len=24, new_tokens=12,
    ),
    CaseSpec(
        name="l7-w6-kv4-nonorm",
        description="7 layers [0,1,1,1,1,0,1]; window 6 < T=32; 4 kv heads (SWA 8), 8 query heads; 4 experts top-2 with norm_topk_prob false; routed_scaling_factor 1.0; head_dim 12; float32",
        config=hub_config(
            vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=7, num_attention_heads=8, num_key_value_heads=4, head_dim=12, v_head_dim=8,
            sliding_window_size=6, n_routed_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
            routed_scaling_factor=1.0,
        ),
        seed=1300, seq_len=32, new_tokens=8,
    ),
    CaseSpec(
        name="fp8-edge",
        description="FP8 block 16 on every decoder linear (o_proj too) with partial edge blocks everywhere (hidden 40, head_dim 24, moe 24, dense 72); 4 layers [0,1,1,1]; window 8; 1 kv head; 4 experts top-2; routed_scaling_factor 2.5; two shards; outputs in float32 on the dequantized weights",
        config=hub_config(
            quantization="fp8", fp8_block=16,
            vocab_size=160, hidden_size=40, intermediate_size=72, moe_intermediate_size=24,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=24, v_head_dim=16,
            sliding_window_size=8, n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=2.5,
        ),
        storage="fp8", seed=1400, seq_len=24, new_tokens=10,
    ),
    CaseSpec(
        name="hub-fp8",
        description="the released checkpoint's file layout (model_embedding / model_N / model_N_linear_fc1|fc2 / model_final / model_mtp), FP8 block 16, bf16 o_proj, per-head FP8 grid of the full-attention k_proj (2 kv heads x 24 rows -> scale rows 4), one MTP block (ignored by transformers); 6 layers; window 8 < T=32; 8 experts top-2; routed_scaling_factor null; outputs in float32",
        config=hub_config(
            quantization="fp8-hub", fp8_block=16,
            vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=24, v_head_dim=16,
            sliding_window_size=8, n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=None,
        ),
        storage="fp8-hub", layout="hub", seed=1500, seq_len=32, new_tokens=12, mtp_blocks=1,
    ),
    CaseSpec(
        name="bf16",
        description="bfloat16 weights (float32 router weight with bf16-representable values and float32 e_score_correction_bias), computed in bfloat16; 5 layers [0,1,1,1,1]; window 8 < T=24; 1 kv head; 4 experts top-2; routed_scaling_factor 1.5",
        config=hub_config(
            torch_dtype="bfloat16",
            vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=1, head_dim=24, v_head_dim=16,
            sliding_window_size=8, n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=1.5,
        ),
        storage="bfloat16", seed=1600, seq_len=24, new_tokens=10,
    ),
    CaseSpec(
        name="pad-left",
        description="batch with left padding of 2 and 7 tokens (attention_mask, position_ids = cumsum(mask) - 1); greedy_ids from generate(input_ids, attention_mask=...) and greedy_ids_unpadded.R per row; 6 layers; window 5 < T=20; 2 kv heads; 4 experts top-2; float32",
        config=hub_config(
            vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=12, v_head_dim=8,
            sliding_window_size=5, n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=None,
        ),
        seed=1700, seq_len=20, new_tokens=10, pad_left=[2, 7],
    ),
]

PAD_TOKEN_ID = 0


def _versions() -> dict:
    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "reference_class": "transformers MiMoV2FlashForCausalLM (from_pretrained, attn_implementation=eager, experts_implementation=grouped_mm)",
    }


def _make_inputs(spec: CaseSpec, seed: int, V: int):
    gen = torch.Generator().manual_seed(seed + 99)
    B, T = spec.batch, spec.seq_len
    ids = torch.randint(3, V, (B, T), generator=gen, dtype=torch.long)
    mask = None
    if spec.pad_left is not None:
        mask = torch.ones(B, T, dtype=torch.long)
        for r, p in enumerate(spec.pad_left):
            ids[r, :p] = PAD_TOKEN_ID
            mask[r, :p] = 0
    return ids, mask


def _variant_logits(spec, stored32, ids, mask, cfg=None, edit: Callable[[dict], None] | None = None, **kw):
    st = dict(stored32)
    if edit is not None:
        edit(st)
    m = official_model(cfg or spec.config, st, spec.compute_dtype, **kw)
    return forward_outputs(m, ids, mask).logits


def build_case(spec: CaseSpec, out_root: Path, max_tries: int = 8) -> dict:
    """Generate one case (re-drawing the seed on near ties) and write it under out_root/name."""
    cfg = spec.config
    tried = []
    for attempt in range(max_tries):
        seed = spec.seed + attempt
        result = _try_seed(spec, seed)
        if result["ok"]:
            break
        tried.append({"seed": seed, "reason": result["reason"]})
        print(f"  [{spec.name}] seed {seed} rejected: {result['reason']}")
    else:
        raise RuntimeError(f"{spec.name}: no usable seed in {max_tries} tries: {tried}")
    result["meta"]["seeds_rejected"] = tried
    folder = out_root / spec.name
    if folder.exists():
        shutil.rmtree(folder)
    write_case(folder, cfg, result["stored"], result["expected"], result["meta"], spec.layout)
    # The folder as written must give the same outputs (written files -> official loader).
    _verify_written(spec, folder, result)
    return result["meta"]


def _try_seed(spec: CaseSpec, seed: int) -> dict:
    cfg = spec.config
    dtype = spec.compute_dtype
    B, T, n = spec.batch, spec.seq_len, spec.new_tokens
    L = cfg["num_hidden_layers"]
    master = random_hub_state(cfg, seed)
    if spec.mtp_blocks:
        master.update(random_mtp_state(cfg, seed + 555, spec.mtp_blocks))
    stored, pre, qinfo = store_state(cfg, master, spec.storage, seed)
    stored32 = dequantize_state(cfg, stored)  # what the official model computes with
    ids, mask = _make_inputs(spec, seed, cfg["vocab_size"])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Load through the official loader. FP8: from a float32 copy of the dequantized weights
        # (same file layout, quantization_config removed), never through transformers' FP8 path.
        if spec.storage.startswith("fp8"):
            cfg32 = {k: v for k, v in cfg.items() if k != "quantization_config"}
            cfg32["torch_dtype"] = "float32"
            write_checkpoint(tmp / "ref32", cfg32, stored32, spec.layout)
            load_dir = tmp / "ref32"
        else:
            write_checkpoint(tmp / "case", cfg, stored, spec.layout)
            load_dir = tmp / "case"
        model, info = load_official(load_dir, dtype)
        model2, _ = load_official(load_dir, dtype)
        mtp_report = None
        if spec.mtp_blocks:
            with _mtp_ignore_rule_disabled():
                _, info_noignore = load_official(load_dir, dtype)
            unexpected = sorted(info_noignore["unexpected_keys"])
            mtp_report = {
                "unexpected_before_ignore_rule": len(unexpected),
                "all_unexpected_are_mtp": all(k.startswith("model.mtp.") for k in unexpected),
                "unexpected_after_ignore_rule": len(info["unexpected_keys"]),
                "names_as_reported": sorted({".".join("*" if p.isdigit() else p for p in k.split(".")) for k in unexpected}),
            }
        tf_fp8 = None
        if spec.storage.startswith("fp8"):
            tf_fp8 = _transformers_own_fp8(spec, stored, stored32, tmp)

    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        raise AssertionError(f"{spec.name}: from_pretrained reported {problems}")
    mem = official_model(cfg, stored, dtype)
    sd_load, sd_mem = model.state_dict(), mem.state_dict()
    assert set(sd_load) == set(sd_mem)
    state_mismatch = [k for k in sd_load if sd_load[k].dtype != sd_mem[k].dtype or not torch.equal(sd_load[k], sd_mem[k])]
    if state_mismatch:
        raise AssertionError(f"{spec.name}: in-memory model differs from from_pretrained in {state_mismatch}")

    out = forward_outputs(model, ids, mask)
    logits = out.logits
    hs = out.hidden_states
    assert len(hs) == L + 1
    with torch.no_grad():
        last_is_norm = torch.equal(model.lm_head(hs[L]), logits)
    out_mem = forward_outputs(mem, ids, mask)
    out_again = forward_outputs(model, ids, mask)
    out_load2 = forward_outputs(model2, ids, mask)

    # Greedy: cached generate vs full recomputation.
    greedy = greedy_generate(model, ids, n, mask)
    recomputed, _ = greedy_recompute(model, ids, n, mask)
    gen_matches = torch.equal(greedy, recomputed)
    # Gaps along the greedy path, from one uncached forward of the whole greedy sequence.
    full_mask = None if mask is None else torch.cat([mask, torch.ones(B, n, dtype=mask.dtype)], 1)
    with torch.no_grad():
        path_mask = None if full_mask is None else full_mask[:, :-1]
        kw = {} if path_mask is None else dict(attention_mask=path_mask, position_ids=_positions(path_mask, B, T + n - 1))
        path_logits = model(greedy[:, :-1], use_cache=False, **kw).logits[:, T - 1 :].float()
    top2 = path_logits.topk(2, dim=-1)
    greedy_gap = (top2.values[..., 0] - top2.values[..., 1]).min().item()
    path_argmax_ok = torch.equal(top2.indices[..., 0], greedy[:, T:])

    # Router gaps over every token of the greedy sequence (prompt + generated).
    routers = [m for m in model.modules() if type(m).__name__ == "MiMoV2FlashTopkRouter"]
    xs = router_inputs(model, greedy[:, :-1], full_mask[:, :-1] if full_mask is not None else None)
    router_gap, changed, total = float("inf"), 0, 0
    for r, x in zip(routers, xs):
        sel, gap = router_selection(r, x)
        sel0, _ = router_selection(r, x, use_bias=False)
        router_gap = min(router_gap, gap)
        changed += (sel != sel0).any(-1).sum().item()
        total += x.shape[0]

    reasons = []
    if not gen_matches or not path_argmax_ok:
        reasons.append("cached generate differs from greedy by full recomputation")
    if greedy_gap < GREEDY_GAP_MIN:
        reasons.append(f"greedy top1/top2 gap {greedy_gap:.3g} < {GREEDY_GAP_MIN}")
    if router_gap < ROUTER_GAP_MIN:
        reasons.append(f"router selection gap {router_gap:.3g} < {ROUTER_GAP_MIN}")
    distinct = [len(set(row.tolist())) for row in greedy[:, T:]]
    if min(distinct) < 2:
        reasons.append("a greedy continuation repeats one token")
    if reasons:
        return {"ok": False, "reason": "; ".join(reasons)}

    expected = {"input_ids": ids.clone(), "logits": logits.float().clone(), "greedy_ids": greedy.clone()}
    for k, h in enumerate(hs):
        expected[f"hidden_states.{k}"] = h.float().clone()

    meta = {
        "case": spec.name,
        "description": spec.description,
        **_versions(),
        "weights_storage": _storage_words(spec.storage),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "layout": spec.layout,
        "seed": seed,
        "batch": B,
        "seq_len": T,
        "new_tokens": n,
        "num_hidden_layers": L,
        "hybrid_layer_pattern": cfg["hybrid_layer_pattern"],
        "sliding_window_size": cfg["sliding_window_size"],
        "sliding_window_note": "a query at position t sees keys t-W .. t (W previous tokens and itself); transformers stores sliding_window = W + 1",
        "kv_heads_full_swa": [cfg["num_key_value_heads"], cfg["swa_num_key_value_heads"]],
        "experts": {
            "n_routed_experts": cfg["n_routed_experts"],
            "num_experts_per_tok": cfg["num_experts_per_tok"],
            "n_group": cfg["n_group"],
            "topk_group": cfg["topk_group"],
            "group_score": "sum of the top-2 biased scores of each group (transformers)",
            "norm_topk_prob": cfg["norm_topk_prob"],
            "routed_scaling_factor_in_config": cfg["routed_scaling_factor"],
        },
        "hidden_states": f"{L + 1} entries: 0 = token embeddings, k = output of decoder layer k-1 (k < {L}), {L} = output of the final norm",
        "hidden_states_last_is_final_norm_output": last_is_norm,
        "generation": {
            "do_sample": False,
            "max_new_tokens": n,
            "use_cache": True,
            "eos_stopping": "disabled (eos_token_id=None): exactly max_new_tokens tokens are appended",
            "matches_greedy_without_cache": gen_matches,
            "min_top1_top2_logit_gap_along_greedy_path": greedy_gap,
            "eos_token_in_continuation": bool((greedy[:, T:] == cfg["eos_token_id"]).any()),
        },
        "min_router_selection_gap": router_gap,
        "router_gap_definition": "smallest, over MoE layers and all tokens of greedy_ids[:, :-1], of (k-th chosen - best unchosen biased score among the allowed groups) and, when n_group > topk_group, (topk_group-th - next group score)",
        "tolerance_observed": {
            "in_memory_vs_from_pretrained_logits_max_abs": _max_abs(out_mem.logits, logits),
            "two_forward_passes_logits_max_abs": _max_abs(out_again.logits, logits),
            "two_independent_loads_logits_max_abs": _max_abs(out_load2.logits, logits),
        },
        "sanity": {
            "logits_std": logits.float().std().item() if mask is None else logits.float()[mask.bool()].std().item(),
            "distinct_new_tokens_per_row": distinct,
            "router_bias_changes_selection_fraction": changed / max(total, 1),
        },
        "loading": {
            "from_pretrained_reported_problems": False,
            "in_memory_state_dict_equals_from_pretrained": True,
        },
    }
    tol = meta["tolerance_observed"]
    nthreads = torch.get_num_threads()
    torch.set_num_threads(1)
    tol["one_thread_vs_default_threads_logits_max_abs"] = _max_abs(forward_outputs(model, ids, mask).logits, logits)
    torch.set_num_threads(nthreads)
    tol["default_threads"] = nthreads
    model.set_experts_implementation("eager")
    tol["experts_eager_loop_vs_grouped_mm_logits_max_abs"] = _max_abs(forward_outputs(model, ids, mask).logits, logits)
    model.set_experts_implementation("grouped_mm")
    if dtype == torch.bfloat16:
        l32 = forward_outputs(official_model(cfg, stored, torch.float32), ids, mask).logits
        tol["same_weights_in_float32_logits_max_abs"] = _max_abs(l32, logits)
        tol["same_weights_in_float32_logits_mean_abs"] = (l32 - logits.float()).abs().mean().item()

    # Sanity variants (each a fresh in-memory official model).
    sanity = meta["sanity"]
    cmp_mask = None if mask is None else mask.unsqueeze(-1).expand_as(logits)

    def zero_sinks(st):
        for k in list(st):
            if k.endswith("attention_sink_bias") and k.startswith("model.layers."):
                st[k] = torch.zeros_like(st[k])

    def zero_bias(st):
        for k in list(st):
            if k.endswith("e_score_correction_bias"):
                st[k] = torch.zeros_like(st[k])

    sanity["zero_sinks_logits_max_abs_change"] = _max_abs(_variant_logits(spec, stored32, ids, mask, edit=zero_sinks), logits, cmp_mask)
    sanity["zero_router_bias_logits_max_abs_change"] = _max_abs(_variant_logits(spec, stored32, ids, mask, edit=zero_bias), logits, cmp_mask)
    if cfg["sliding_window_size"] < T:
        wide = copy.deepcopy(cfg)
        wide["sliding_window_size"] = 100_000
        sanity["no_window_logits_max_abs_change"] = _max_abs(_variant_logits(spec, stored32, ids, mask, cfg=wide), logits, cmp_mask)
    else:
        sanity["window_covers_whole_sequence"] = True
    rsf = cfg["routed_scaling_factor"]
    if rsf not in (None, 1.0):
        one = copy.deepcopy(cfg)
        one["routed_scaling_factor"] = 1.0
        sanity["routed_scaling_factor_to_1_logits_max_abs_change"] = _max_abs(_variant_logits(spec, stored32, ids, mask, cfg=one), logits, cmp_mask)
    if not cfg["norm_topk_prob"]:
        nrm = copy.deepcopy(cfg)
        nrm["norm_topk_prob"] = True
        sanity["norm_topk_prob_true_logits_max_abs_change"] = _max_abs(_variant_logits(spec, stored32, ids, mask, cfg=nrm), logits, cmp_mask)
    if cfg["n_group"] > 1:
        ng = copy.deepcopy(cfg)
        ng["n_group"], ng["topk_group"] = 1, 1
        sanity["no_group_limit_logits_max_abs_change"] = _max_abs(_variant_logits(spec, stored32, ids, mask, cfg=ng), logits, cmp_mask)

    if spec.pad_left is not None:
        expected["attention_mask"] = mask.clone()
        expected["position_ids"] = _positions(mask, B, T).clone()
        rows = {}
        for r, p in enumerate(spec.pad_left):
            u = greedy_generate(model, ids[r : r + 1, p:], n)
            expected[f"greedy_ids_unpadded.{r}"] = u.clone()
            lu = forward_outputs(model, ids[r : r + 1, p:]).logits
            rows[str(r)] = {
                "pad_tokens": p,
                "padded_generation_equals_unpadded": torch.equal(u[0], greedy[r, p:]),
                "padded_vs_unpadded_logits_max_abs_on_real_tokens": _max_abs(lu[0], logits[r, p:]),
            }
        meta["padding"] = {
            "pad_token_id": PAD_TOKEN_ID,
            "side": "left",
            "attention_mask": "expected['attention_mask'], int64, 0 = pad",
            "position_ids": "expected['position_ids'] = cumsum(attention_mask) - 1, 0 at pads (what generate uses); logits and hidden_states were computed with attention_mask and these position_ids",
            "compare_only_real_tokens": "values at pad positions (attention_mask == 0) are whatever the official masking produces there; compare logits and hidden states only where attention_mask == 1",
            "rows": rows,
            "all_rows_padded_equals_unpadded": all(v["padded_generation_equals_unpadded"] for v in rows.values()),
        }

    if spec.storage.startswith("fp8"):
        meta["fp8"] = _fp8_meta(spec, stored, stored32, pre, qinfo, ids, mask, logits, tf_fp8)
    if mtp_report is not None:
        meta["mtp"] = {
            "blocks": spec.mtp_blocks,
            "file": "model_mtp.safetensors",
            "tensors_on_disk": sum(1 for k in stored if k.startswith("model.mtp.")),
            "official_outputs": "none: transformers 5.23 has no MTP modules; expected.safetensors holds main-model outputs only",
            "transformers_load": mtp_report,
        }
    return {"ok": True, "stored": stored, "expected": expected, "meta": meta, "stored32": stored32}


def _storage_words(kind: str) -> str:
    return {
        "float32": "float32 everywhere",
        "bfloat16": "bfloat16, except mlp.gate.weight (float32, bf16-representable values) and mlp.gate.e_score_correction_bias (float32)",
        "fp8": "float8_e4m3fn q/k/v/o, dense MLP and expert linears with float32 _scale_inv; router float32; everything else bfloat16",
        "fp8-hub": "float8_e4m3fn q/k/v, dense MLP and expert linears (decoder layers and MTP block) with float32 _scale_inv; o_proj, eh_proj, embeddings, lm_head, norms and sinks bfloat16; router weight and e_score_correction_bias float32",
    }[kind]


def _fp8_meta(spec, stored, stored32, pre, qinfo, ids, mask, logits, tf_fp8) -> dict:
    cfg = spec.config
    b = cfg["quantization_config"]["weight_block_size"][0]
    D = cfg["head_dim"]
    scaled = [k[: -len("_scale_inv")] for k in stored if k.endswith("_scale_inv")]
    amax_fail = {k: blocks_below_max(stored[k], b, grid_for(stored[k], stored[k + "_scale_inv"], b, D)) for k in scaled}
    meta = {
        "weight_block_size": [b, b],
        "scale_dtype": "float32",
        "dequantization": "float32(fp8 value) * float32 scale_inv of its block, rounded to float32",
        "reference": "official model loaded in float32 from a float32 copy of the dequantized weights (same layout, quantization_config removed)",
        "weights_with_partial_blocks": qinfo["weights_with_partial_blocks"],
        "block_magnitudes": "each block was multiplied by 2^U(-1.5, 1.5) before quantization",
        "scales": "every block's scale is its amax / 448, so the largest |fp8| of every block is 448",
        "fp8_tensors": len(scaled),
        "blocks_below_448_on_true_grid_total": sum(amax_fail.values()),
    }
    lq = _variant_logits(spec, pre, ids, mask)
    meta["unquantized_vs_dequantized_logits_max_abs"] = _max_abs(lq, logits)
    noscale = {k: v for k, v in stored.items() if not k.endswith("_scale_inv")}
    meta["ignoring_scales_logits_max_abs_change"] = _max_abs(_variant_logits(spec, noscale, ids, mask), logits)
    if qinfo["per_head_grid_tensors"]:
        ks = qinfo["per_head_grid_tensors"]
        rows = stored[ks[0]].shape[0]
        kv = rows // D
        grid = {
            "rule": "full-attention k_proj rows quantized per kv head: each head's head_dim rows split into ceil(head_dim/b) row blocks (the last one partial), the grid restarting at every head; scale row of weight row r = (r // head_dim) * ceil(head_dim / b) + (r % head_dim) // b",
            "tensors": ks,
            "weight_shape": list(stored[ks[0]].shape),
            "scale_shape_per_head_grid": list(stored[ks[0] + "_scale_inv"].shape),
            "scale_rows_a_uniform_grid_would_have": math.ceil(rows / b),
            "row_blocks": [list(x) for x in per_head_row_blocks(rows, D, b)],
        }
        # Wrong grids: uniform b-row blocks using scale rows 0..ceil(rows/b)-1, and rows // scale_rows.
        wrong_u, wrong_d = dict(stored32), dict(stored32)
        h_div = rows // stored[ks[0] + "_scale_inv"].shape[0]
        for k in ks:
            s = stored[k + "_scale_inv"]
            u = uniform_row_blocks(rows, b)
            wrong_u[k] = dequantize_fp8(stored[k], s[: len(u)], b, u)
            dgrid = uniform_row_blocks(rows, h_div)
            wrong_d[k] = dequantize_fp8(stored[k], s, b, dgrid)
            grid.setdefault("uniform_grid_blocks_below_448", {})[k] = blocks_below_max(stored[k], b, u)
            grid.setdefault("rows_div_scale_rows_grid_blocks_below_448", {})[k] = blocks_below_max(stored[k], b, dgrid)
            grid.setdefault("per_head_grid_blocks_below_448", {})[k] = blocks_below_max(stored[k], b, per_head_row_blocks(rows, D, b))
        lu = _variant_logits(spec, wrong_u, ids, mask)
        ld = _variant_logits(spec, wrong_d, ids, mask)
        grid["uniform_grid_logits_max_abs_change"] = _max_abs(lu, logits)
        grid["rows_div_scale_rows_block_height"] = h_div
        grid["rows_div_scale_rows_grid_logits_max_abs_change"] = _max_abs(ld, logits)
        meta["full_attention_k_proj_grid"] = grid
        meta["kv_heads_full_attention"] = kv
    if tf_fp8 is not None:
        meta["transformers_own_fp8_load"] = tf_fp8
    return meta


def _transformers_own_fp8(spec, stored, stored32, tmp: Path) -> dict:
    """For information: what transformers' own FP8 loading makes of the folder (not the reference)."""
    folder = tmp / "fp8"
    write_checkpoint(folder, spec.config, stored, spec.layout)
    res: dict = {}
    try:
        m, info = load_official(folder, torch.bfloat16)
        sd = m.state_dict()
        ref = to_transformers_state(spec.config, stored32)
        bad = []
        for k, v in ref.items():
            if k in sd and sd[k].shape == v.shape:
                d = (sd[k].float() - v.to(torch.bfloat16).float()).abs().max().item()
                # bf16 rounding of a correctly dequantized weight differs from v by < 1 % of |v|
                if d > 0.02 * v.abs().max().item():
                    bad.append(f"{k} (max abs {d:.3g})")
        res["loads"] = True
        res["tensors_not_matching_correct_dequantization"] = bad
    except ImportError as exc:  # transformers' FP8 path needs `accelerate`, which may be absent
        res["ran"] = False
        res["reason"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    except Exception as exc:  # noqa: BLE001 - informational only
        res["loads"] = False
        res["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return res


def _verify_written(spec: CaseSpec, folder: Path, result: dict) -> None:
    """Re-read the written folder through its index, dequantize it with the shape-derived grids, and
    check that the official model reproduces expected.safetensors exactly."""
    st = read_folder_state(folder)
    for k, v in result["stored"].items():
        if st[k].dtype != v.dtype or not torch.equal(st[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else st[k], v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v):
            raise AssertionError(f"{spec.name}: {k} differs after writing")
    cfg = json.loads((folder / "config.json").read_text())
    m = official_model(cfg, st, spec.compute_dtype)
    with safe_open(str(folder / "expected.safetensors"), "pt") as h:
        exp = {k: h.get_tensor(k) for k in h.keys()}
    out = forward_outputs(m, exp["input_ids"], exp.get("attention_mask"))
    if not torch.equal(out.logits.float(), exp["logits"]):
        raise AssertionError(f"{spec.name}: re-read folder does not reproduce the logits")
    if spec.layout == "two-shard" and not spec.storage.startswith("fp8"):
        m2, info = load_official(folder, spec.compute_dtype)
        out2 = forward_outputs(m2, exp["input_ids"], exp.get("attention_mask"))
        if not torch.equal(out2.logits.float(), exp["logits"]):
            raise AssertionError(f"{spec.name}: from_pretrained of the written folder does not reproduce the logits")


# ----------------------------------------------------------------------------------------------
# README and CLI
# ----------------------------------------------------------------------------------------------


def write_readme(out_root: Path) -> None:
    lines = [
        "# Golden fixtures (official outputs)",
        "",
        "Produced by `tests/reference/make_fixtures.py` with transformers "
        f"{transformers.__version__} (`MiMoV2FlashForCausalLM`, eager attention, `grouped_mm` experts), "
        f"torch {torch.__version__}, on CPU. Regenerate with "
        "`python tests/reference/make_fixtures.py [--only NAME]`.",
        "",
        "Each folder is a tiny random MiMo-V2-Flash checkpoint in the Hugging Face hub layout "
        "(`config.json` with the hub's keys, hub tensor names, safetensors shards + "
        "`model.safetensors.index.json`), plus `expected.safetensors` (`input_ids`, `logits`, "
        "`hidden_states.0..L` with 0 = embeddings and L = final-norm output, `greedy_ids`) and "
        "`meta.json` (seed, settings, near-tie margins, observed tolerances, sanity numbers). "
        "The format is that of `shared/reference/README.md`.",
        "",
        "FP8 cases: the expected outputs were computed in float32 by the official model on the "
        "correctly dequantized weights (`float32(fp8) * scale_inv` of the block), not by "
        "transformers' own FP8 loader.",
        "",
        "| case | covers |",
        "|---|---|",
    ]
    for s in CASES:
        lines.append(f"| `{s.name}` | {s.description} |")
    lines += [
        "",
        "`pad-left` also stores `attention_mask` and `position_ids` [B, T] (int64; logits and hidden "
        "states computed with both) and `greedy_ids_unpadded.R` [1, T_R + n] (row R's prompt without "
        "its padding, generated alone). Compare its logits and hidden states only where "
        "`attention_mask == 1`.",
        "",
    ]
    (out_root / "README.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--only", nargs="*", default=None, help="case names to (re)generate")
    args = ap.parse_args(argv)
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    names = {s.name for s in CASES}
    if args.only:
        unknown = set(args.only) - names
        if unknown:
            ap.error(f"unknown case(s) {sorted(unknown)}; known: {sorted(names)}")
    t_all = time.time()
    for spec in CASES:
        if args.only and spec.name not in args.only:
            continue
        t0 = time.time()
        meta = build_case(spec, out_root)
        g = meta["generation"]
        print(
            f"{spec.name}: seed {meta['seed']}, logits std {meta['sanity']['logits_std']:.3f}, "
            f"greedy gap {g['min_top1_top2_logit_gap_along_greedy_path']:.3g}, "
            f"router gap {meta['min_router_selection_gap']:.3g}, {time.time() - t0:.1f}s"
        )
    write_readme(out_root)
    print(f"done in {time.time() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
