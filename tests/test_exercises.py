"""Every exercise check accepts the solution's answer and rejects wrong answers with an explanation.

The checks live in notebooks/course/checks.py; the solutions in notebooks/solutions/. A check that
passed whatever it was given would teach nothing, so each test below feeds it the right answer (it must
print "correct") and at least one typical wrong answer (it must raise ExerciseError naming the mistake).
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "notebooks"))
from course import checks  # noqa: E402
from course.checks import ExerciseError  # noqa: E402
from minimimo import MiMoConfig  # noqa: E402


def accepts(check, *answer, capsys):
    check(*answer)
    out = capsys.readouterr().out
    assert out.startswith("correct"), out


def rejects(check, *answer, match):
    with pytest.raises(ExerciseError, match=match):
        check(*answer)


def unanswered(check, *answer, capsys):
    check(*answer)
    assert capsys.readouterr().out.startswith("not answered yet")


# --------------------------------------------------------------------------- notebook 00
FLASH = MiMoConfig.flash()
COUNTS = FLASH.parameter_counts()
EXPERT = 3 * 4096 * 2048
ROUTER = 256 * 4096 + 256


def test_ex_00_1_total_with_moe_layer_0(capsys):
    right = COUNTS["total"] - COUNTS["dense_mlp"] + ROUTER + 256 * EXPERT
    accepts(checks.check_ex_00_1, right, capsys=capsys)
    unanswered(checks.check_ex_00_1, None, capsys=capsys)
    rejects(checks.check_ex_00_1, right - ROUTER, match="router")
    rejects(checks.check_ex_00_1, COUNTS["total"], match="today's total")
    rejects(checks.check_ex_00_1, right + COUNTS["dense_mlp"], match="kept the dense MLP")
    rejects(checks.check_ex_00_1, right + 1, match="off by")
    rejects(checks.check_ex_00_1, 3.1e11, match="whole number")


def test_ex_00_2_global_layers_of_60(capsys):
    accepts(checks.check_ex_00_2, [0, 5, 11, 17, 23, 29, 35, 41, 47, 53, 59], capsys=capsys)
    rejects(checks.check_ex_00_2, [5, 11, 17, 23, 29, 35, 41, 47, 53, 59], match="layer 0")
    rejects(checks.check_ex_00_2, [0, 6, 12, 18, 24, 30, 36, 42, 48, 54], match="5, 11, 17")
    rejects(checks.check_ex_00_2, [0, 5, 11, 17, 23, 29, 35, 41, 47], match="missing")


def test_ex_00_3_active_with_top_4(capsys):
    right = COUNTS["active"] - 47 * 4 * EXPERT
    accepts(checks.check_ex_00_3, right, capsys=capsys)
    rejects(checks.check_ex_00_3, COUNTS["active"], match="top-8")
    rejects(checks.check_ex_00_3, COUNTS["active"] - 4 * EXPERT, match="47 MoE layers")
    rejects(checks.check_ex_00_3, COUNTS["active"] // 2, match="halving")


def attention_parameters(hidden_size, g, sink=True, v_dim=None, o_dim=None):
    v_dim = g.v_head_dim if v_dim is None else v_dim
    o_dim = g.v_head_dim if o_dim is None else o_dim
    q, k = g.num_heads * g.head_dim * hidden_size, g.num_kv_heads * g.head_dim * hidden_size
    v, o = g.num_kv_heads * v_dim * hidden_size, hidden_size * g.num_heads * o_dim
    return q + k + v + o + (g.num_heads if g.has_sink and sink else 0)


def test_ex_00_4_attention_parameters(capsys):
    accepts(checks.check_ex_00_4, attention_parameters, capsys=capsys)
    unanswered(checks.check_ex_00_4, lambda h, g: None, capsys=capsys)
    rejects(checks.check_ex_00_4, lambda h, g: attention_parameters(h, g, sink=False), match="sink")
    rejects(checks.check_ex_00_4, lambda h, g: attention_parameters(h, g, v_dim=g.head_dim), match="v_head_dim")
    rejects(checks.check_ex_00_4, lambda h, g: attention_parameters(h, g, o_dim=g.head_dim), match="o_proj")


# --------------------------------------------------------------------------- notebook 01
def test_ex_01_1_rotary_channels_of_128(capsys):
    accepts(checks.check_ex_01_1, (42, 21), capsys=capsys)
    rejects(checks.check_ex_01_1, (43, 21), match="floors")
    rejects(checks.check_ex_01_1, (42, 42), match="two channels")
    rejects(checks.check_ex_01_1, 42, match="pair")


def test_ex_01_2_long_wavelengths_at_640k(capsys):
    accepts(checks.check_ex_01_2, 11, capsys=capsys)
    rejects(checks.check_ex_01_2, 9, match="theta 5e6|262,144")
    rejects(checks.check_ex_01_2, 12, match="not 12")


def _rope_interleaved(x, positions, rotary_dim, theta, sign=1, rotate_all=False):
    from einops import rearrange, repeat
    from course import layers
    angles = sign * rearrange(positions.float(), "b t -> b t 1") * layers.inv_freq(rotary_dim, theta)
    angles = repeat(angles, "b t f -> b 1 t (f two)", two=2)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    pairs = rearrange(x_rot, "... (f two) -> ... f two", two=2)
    turned = rearrange(torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1), "... f two -> ... (f two)")
    out = x_rot * angles.cos() + turned * angles.sin()
    return torch.cat([out, 2 * x_pass if rotate_all else x_pass], dim=-1)


def test_ex_01_3_rope_interleaved(capsys):
    from course import layers
    accepts(checks.check_ex_01_3, _rope_interleaved, capsys=capsys)
    unanswered(checks.check_ex_01_3, lambda *a: None, capsys=capsys)
    rotate_half = lambda x, p, r, theta: layers.rope(x, *layers.cos_sin(p, r, theta))  # noqa: E731
    rejects(checks.check_ex_01_3, rotate_half, match="that is rotate-half")
    rejects(checks.check_ex_01_3, lambda x, p, r, th: _rope_interleaved(x, p, r, th, sign=-1), match="wrong way")
    rejects(checks.check_ex_01_3, lambda x, p, r, th: _rope_interleaved(x, p, r, th, rotate_all=True),
            match="pass through")


def test_ex_01_4_half_to_interleaved_rows(capsys):
    from einops import rearrange

    def right(w, head_dim=192, rotary_dim=64):
        w = rearrange(w, "(h d) c -> h d c", d=head_dim)
        rot = rearrange(w[:, :rotary_dim], "h (two f) c -> h (f two) c", two=2)
        return rearrange(torch.cat([rot, w[:, rotary_dim:]], dim=1), "h d c -> (h d) c")

    def inverse(w, head_dim=192, rotary_dim=64):                   # (f two) -> (two f): the wrong direction
        w = rearrange(w, "(h d) c -> h d c", d=head_dim)
        rot = rearrange(w[:, :rotary_dim], "h (f two) c -> h (two f) c", two=2)
        return rearrange(torch.cat([rot, w[:, rotary_dim:]], dim=1), "h d c -> (h d) c")

    accepts(checks.check_ex_01_4, right, capsys=capsys)
    rejects(checks.check_ex_01_4, lambda w, head_dim=192, rotary_dim=64: w.clone(), match="unchanged")
    rejects(checks.check_ex_01_4, inverse, match="scores differ")


# --------------------------------------------------------------------------- notebook 02
def test_ex_02_1_first_query_128_vs_129_keys(capsys):
    accepts(checks.check_ex_02_1, 128, capsys=capsys)
    rejects(checks.check_ex_02_1, 129, match="earlier one")
    rejects(checks.check_ex_02_1, 127, match="both masks agree")


def test_ex_02_2_sink_logit_for_90_percent(capsys):
    import math
    accepts(checks.check_ex_02_2, math.log(9 * 129), capsys=capsys)
    rejects(checks.check_ex_02_2, math.log(129), match="half the mass")
    rejects(checks.check_ex_02_2, math.log(0.9 * 129), match="9 n")
    rejects(checks.check_ex_02_2, math.log(9 * 128), match="129 keys")


def _repeat_kv(q, k, v, visible, scale, order="(g r)", masked=True):
    from einops import rearrange, repeat
    r = q.shape[1] // k.shape[1]
    k = repeat(k, f"b g s d -> b {order} s d", r=r)
    v = repeat(v, f"b g s e -> b {order} s e", r=r)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) * scale
    if masked:
        scores = scores.masked_fill(~rearrange(visible, "b t s -> b 1 t s"), float("-inf"))
    return torch.einsum("bhts,bhse->bhte", scores.softmax(-1), v)


def test_ex_02_3_gqa_by_repeating_kv(capsys):
    accepts(checks.check_ex_02_3, _repeat_kv, capsys=capsys)
    unanswered(checks.check_ex_02_3, lambda *a: None, capsys=capsys)
    rejects(checks.check_ex_02_3, lambda *a: _repeat_kv(*a, order="(r g)"), match="wrong order")
    rejects(checks.check_ex_02_3, lambda *a: _repeat_kv(*a, masked=False), match="mask is not applied")
    rejects(checks.check_ex_02_3, lambda q, k, v, vis, scale: _repeat_kv(q, k, v, vis, 1.0), match="differs")


def test_ex_02_4_sink_parameters(capsys):
    accepts(checks.check_ex_02_4, (39 + 3) * 64, capsys=capsys)
    rejects(checks.check_ex_02_4, 39 * 64, match="MTP")
    rejects(checks.check_ex_02_4, 51 * 64, match="global layers have no sink")
    rejects(checks.check_ex_02_4, 42 * 8, match="query")


# --------------------------------------------------------------------------- notebook 03
def test_ex_03_1_kv_bytes_at_32k(capsys):
    c = (192 + 128) * 2
    global_part, rings = 9 * 4 * c * 32_768, 39 * 8 * c * 128
    accepts(checks.check_ex_03_1, global_part + rings, capsys=capsys)
    rejects(checks.check_ex_03_1, global_part, match="global layers only")
    rejects(checks.check_ex_03_1, global_part + 39 * 8 * c * 129, match="128 slots")
    rejects(checks.check_ex_03_1, 2 * (global_part + rings), match="float32")
    rejects(checks.check_ex_03_1, 9 * 8 * c * 32_768 + rings, match="4 KV heads")


def test_ex_03_2_ring_slots(capsys):
    accepts(checks.check_ex_03_2, (104, 83), capsys=capsys)
    rejects(checks.check_ex_03_2, (104, 104), match="modulus")
    rejects(checks.check_ex_03_2, (7, 83), match="remainder")


def test_ex_03_3_write_before_read(capsys):
    accepts(checks.check_ex_03_3, 5, capsys=capsys)
    rejects(checks.check_ex_03_3, 0, match="twice")
    rejects(checks.check_ex_03_3, 6, match="distance exactly W")
    rejects(checks.check_ex_03_3, 3, match="not wrapped")


def _longest_context(config, budget, layout="hybrid", rings=True, small_budgets=True):
    slope, ring_slope, window = 0, 0, config.sliding_window_size
    for i in range(config.num_hidden_layers):
        g = config.attention(0 if layout == "all-global" else i)
        per_token = g.num_kv_heads * (g.head_dim + g.v_head_dim) * 2
        if g.window is not None and layout == "hybrid":
            ring_slope += per_token
        else:
            slope += per_token
    if small_budgets and budget < (slope + ring_slope) * window:
        return budget // (slope + ring_slope)
    return (budget - (ring_slope * window if rings else 0)) // slope


def test_ex_03_4_longest_context(capsys):
    accepts(checks.check_ex_03_4, _longest_context, capsys=capsys)
    unanswered(checks.check_ex_03_4, lambda *a: None, capsys=capsys)
    rejects(checks.check_ex_03_4, lambda c, b, lay="hybrid": _longest_context(c, b, lay, rings=False), match="rings")
    rejects(checks.check_ex_03_4, lambda c, b, lay="hybrid": _longest_context(c, b, lay, small_budgets=False),
            match="smaller than the rings")
    rejects(checks.check_ex_03_4, lambda c, b, lay="hybrid": _longest_context(c, b, lay) + 1, match="floor")


# --- notebooks 04-08 ---
# (course helper B's section: exercises of notebooks 04 to 08)


# --------------------------------------------------------------------------- notebook 04
def test_ex_04_1_active_experts(capsys):
    right = 256 * (1 - (1 - 8 / 256) ** 32)
    accepts(checks.check_ex_04_1, right, capsys=capsys)
    unanswered(checks.check_ex_04_1, None, capsys=capsys)
    rejects(checks.check_ex_04_1, 256, match="tokens share experts")
    rejects(checks.check_ex_04_1, 256 - right, match="idle")
    rejects(checks.check_ex_04_1, 8, match="one token")


def test_ex_04_2_softmax_router(capsys):
    def right(x, weight, bias, top_k):
        probs = torch.softmax(x.float() @ weight.float().T, dim=-1)
        ids = (probs + bias).topk(top_k, dim=-1).indices
        w = probs.gather(1, ids)
        return w / w.sum(-1, keepdim=True), ids

    def bias_in_logits(x, weight, bias, top_k):
        probs = torch.softmax(x @ weight.T + bias, dim=-1)
        ids = probs.topk(top_k, dim=-1).indices
        w = probs.gather(1, ids)
        return w / w.sum(-1, keepdim=True), ids

    def biased_weights(x, weight, bias, top_k):
        scores = torch.softmax(x @ weight.T, dim=-1) + bias
        ids = scores.topk(top_k, dim=-1).indices
        w = scores.gather(1, ids)
        return w / w.sum(-1, keepdim=True), ids

    def not_yet(x, weight, bias, top_k):
        raise NotImplementedError

    accepts(checks.check_ex_04_2, right, capsys=capsys)
    rejects(checks.check_ex_04_2, bias_in_logits, match="logits before the softmax")
    rejects(checks.check_ex_04_2, biased_weights, match="weights include the bias")
    unanswered(checks.check_ex_04_2, not_yet, capsys=capsys)


def test_ex_04_3_no_bias_no_change(capsys):
    accepts(checks.check_ex_04_3, 0, capsys=capsys)
    rejects(checks.check_ex_04_3, 0.3, match="increasing in the logit")
    rejects(checks.check_ex_04_3, 2, match="between 0 and 1")


# --------------------------------------------------------------------------- notebook 05
def test_ex_05_1_acceptance_length(capsys):
    accepts(checks.check_ex_05_1, 3.439, capsys=capsys)
    unanswered(checks.check_ex_05_1, None, capsys=capsys)
    rejects(checks.check_ex_05_1, 2.439, match="bonus token")
    rejects(checks.check_ex_05_1, 3.7, match="0.9\\^j")
    rejects(checks.check_ex_05_1, 3.0, match="not 3.0")


def test_ex_05_2_accept_rule(capsys):
    def right(drafts, target):
        n = int((drafts == target[:len(drafts)]).long().cumprod(0).sum())
        return torch.cat([drafts[:n], target[n:n + 1]])

    def no_bonus(drafts, target):
        n = int((drafts == target[:len(drafts)]).long().cumprod(0).sum())
        return drafts[:n]

    def every_match(drafts, target):      # keeps matches after the first disagreement
        keep = drafts[drafts == target[:len(drafts)]]
        return torch.cat([keep, target[len(keep):len(keep) + 1]])

    def not_yet(drafts, target):
        raise NotImplementedError

    accepts(checks.check_ex_05_2, right, capsys=capsys)
    rejects(checks.check_ex_05_2, no_bonus, match="without the main model's own next")
    rejects(checks.check_ex_05_2, every_match, match="first disagreement")
    unanswered(checks.check_ex_05_2, not_yet, capsys=capsys)


def test_ex_05_3_broken_drafter(capsys):
    accepts(checks.check_ex_05_3, True, 1.2, 2.5, capsys=capsys)
    rejects(checks.check_ex_05_3, False, 1.2, 2.5, match="cannot change the output")
    rejects(checks.check_ex_05_3, True, 2.6, 2.5, match="not below")
    rejects(checks.check_ex_05_3, True, 5, 2.5, match="between 1 and")


# --------------------------------------------------------------------------- notebook 06
def test_ex_06_1_hub_tensor_names(capsys):
    from minimimo.hub import tensor_specs
    specs = tensor_specs(FLASH)
    right = len(specs)
    mtp = sum(name.startswith("model.mtp.") for name in specs)
    accepts(checks.check_ex_06_1, right, capsys=capsys)
    unanswered(checks.check_ex_06_1, None, capsys=capsys)
    rejects(checks.check_ex_06_1, right - mtp, match="MTP blocks")
    rejects(checks.check_ex_06_1, right + 9, match="global layers have no sink")
    rejects(checks.check_ex_06_1, right + sum(s.quantizable for s in specs.values()), match="_scale_inv")
    rejects(checks.check_ex_06_1, right - 1000, match="off by")


def test_ex_06_2_first_hidden_state_that_moves(capsys):
    accepts(checks.check_ex_06_2, 3, capsys=capsys)
    rejects(checks.check_ex_06_2, 2, match="output of layer 1")
    rejects(checks.check_ex_06_2, 5, match="earlier one")


def test_ex_06_3_left_padded_batch(capsys):
    import minimimo
    directory = minimimo.default_checkpoint()
    model = minimimo.load(directory, dtype=torch.float32, progress=False)
    config = model.config

    def right(W, config, ids, mask, n):
        return minimimo.generate(model, ids, n, attention_mask=mask)

    def mask_ignored(W, config, ids, mask, n):     # pads visible, positions shifted by the padding
        return minimimo.generate(model, ids, n)

    def unanswered_fn(W, config, ids, mask, n):
        raise NotImplementedError

    accepts(checks.check_ex_06_3, right, {}, config, capsys=capsys)
    rejects(checks.check_ex_06_3, mask_ignored, {}, config, match="padded row 0")
    unanswered(checks.check_ex_06_3, unanswered_fn, {}, config, capsys=capsys)


# --------------------------------------------------------------------------- notebook 07
def test_ex_07_1_scale_rows_of_global_k_proj(capsys):
    accepts(checks.check_ex_07_1, 8, capsys=capsys)
    unanswered(checks.check_ex_07_1, None, capsys=capsys)
    rejects(checks.check_ex_07_1, 6, match="uniform grid")
    rejects(checks.check_ex_07_1, 32, match="columns")


def test_ex_07_2_twelve_row_grid_fails_the_amax_test(capsys):
    accepts(checks.check_ex_07_2, 1, capsys=capsys)
    rejects(checks.check_ex_07_2, 0, match="true per-head grid")
    rejects(checks.check_ex_07_2, 5, match="count again")


def _quantizer(uniform_always=False, divide_by_448=True):
    from minimimo.fp8 import quantize as package_quantize

    def quantize(weight, block, head_size=None):
        if uniform_always:
            head_size = None
        fp8, scale = package_quantize(weight, block, head_size=head_size)
        if not divide_by_448:   # scale = amax: every |fp8| <= 1, no block reaches 448
            from course.fp8 import per_head_row_index, uniform_row_index
            rows, cols = weight.shape
            row = per_head_row_index(rows, block[0], head_size) if head_size else uniform_row_index(rows, block[0])
            scale = scale * 448
            fp8 = (weight / scale[row][:, torch.arange(cols) // block[1]]).to(torch.float8_e4m3fn)
        return fp8, scale
    return quantize


def test_ex_07_3_quantizer(capsys):
    accepts(checks.check_ex_07_3, _quantizer(), capsys=capsys)
    rejects(checks.check_ex_07_3, _quantizer(uniform_always=True), match="restart at every head")
    rejects(checks.check_ex_07_3, _quantizer(divide_by_448=False), match="no \\|fp8\\| = 448")

    def not_yet(weight, block, head_size=None):
        raise NotImplementedError
    unanswered(checks.check_ex_07_3, not_yet, capsys=capsys)


# --------------------------------------------------------------------------- notebook 08
def test_ex_08_1_four_gpus(capsys):
    accepts(checks.check_ex_08_1, {"4 x 80GiB": False, "4 x 141GB": True}, capsys=capsys)
    unanswered(checks.check_ex_08_1, None, capsys=capsys)
    rejects(checks.check_ex_08_1, {"4 x 80GiB": True, "4 x 141GB": True}, match="10% of each device")
    rejects(checks.check_ex_08_1, {"4 x 80GiB": False, "4 x 141GB": False}, match="planner says")
    rejects(checks.check_ex_08_1, [False, True], match="give a dict")


def test_ex_08_2_plan_for_four_gpus(capsys):
    from minimimo.plan import plan
    p = plan(FLASH, devices=4, device_memory="141GB", weight_dtype="fp8")
    fill = max(row["total"] / row["capacity"] for row in p.per_device())
    accepts(checks.check_ex_08_2, (p.placement["mtp.0"], fill), capsys=capsys)
    rejects(checks.check_ex_08_2, (0, fill), match="come last")
    rejects(checks.check_ex_08_2, (p.placement["mtp.0"], fill / 0.9), match="not over the 90%")
    rejects(checks.check_ex_08_2, (p.placement["mtp.0"], 57), match="percentage")


def test_ex_08_3_kv_copies(capsys):
    def right(heads, kv, world):
        return [max(1, world // kv)] * kv

    def never_replicated(heads, kv, world):
        return [1] * kv

    def not_yet(heads, kv, world):
        raise NotImplementedError

    accepts(checks.check_ex_08_3, right, capsys=capsys)
    rejects(checks.check_ex_08_3, never_replicated, match="needs its own copy")
    unanswered(checks.check_ex_08_3, not_yet, capsys=capsys)
