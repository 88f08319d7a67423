"""One check per exercise. A check prints "correct: ..." for a right answer and raises
`ExerciseError` with an explanation of what is wrong otherwise (so a wrong answer stops the cell,
and `tests/test_exercises.py` can show that every check rejects at least one wrong answer).

Names: check_ex_NN_K, exercise K of notebook NN.
"""

from __future__ import annotations

import math


class ExerciseError(AssertionError):
    """A wrong answer; the message says what is wrong and where to look."""


def _correct(message: str) -> None:
    print(f"correct: {message}")


def _wrong(message: str):
    raise ExerciseError(message)


def _unanswered(answer, hint: str) -> bool:
    """True (after printing the hint) while the learner's answer is still None."""
    if answer is None:
        print(f"not answered yet. Hint: {hint}")
        return True
    return False


def _integer(answer, what: str) -> int:
    if isinstance(answer, bool) or not isinstance(answer, int):
        try:
            import torch
            if isinstance(answer, torch.Tensor) and answer.numel() == 1 and not answer.is_floating_point():
                return int(answer)
        except ImportError:
            pass
        _wrong(f"{what} should be a whole number (int), got {type(answer).__name__} {answer!r}")
    return answer


def _flash():
    from minimimo import MiMoConfig
    return MiMoConfig.flash()


# --------------------------------------------------------------------------- notebook 00
def check_ex_00_1(answer):
    """Total parameters with layer 0 a MoE layer too."""
    if _unanswered(answer, "start from counts['total']: remove the dense MLP, add what every MoE layer has."):
        return
    answer = _integer(answer, "the total")
    flash = _flash()
    base = flash.parameter_counts()
    right = flash.replace(moe_layer_freq=[1] * flash.num_hidden_layers).parameter_counts()["total"]
    h, m, e = flash.hidden_size, flash.moe_intermediate_size, flash.n_routed_experts
    expert, router = 3 * h * m, e * h + e
    if answer == right:
        return _correct(f"{right:,d} parameters: the dense MLP ({base['dense_mlp']:,d}) goes, a router "
                        f"({router:,d}) and {e} experts ({e * expert:,d}) come, {right - base['total']:+,d} in all.")
    if answer == base["total"]:
        _wrong("that is today's total: layer 0 changes from a dense MLP to a MoE layer, so the count changes.")
    if answer == right - router:
        _wrong(f"{right - answer:,d} short: the new MoE layer also has a router (gate.weight [{e}, {h}] and "
               f"e_score_correction_bias [{e}]).")
    if answer == right + base["dense_mlp"]:
        _wrong(f"you added the MoE layer but kept the dense MLP ({base['dense_mlp']:,d}); layer 0 has one or the other.")
    if answer == base["total"] - base["dense_mlp"] + router + flash.num_experts_per_tok * expert:
        _wrong("you added only the 8 chosen experts; the *total* counts all 256 experts of the layer (8 is the active count).")
    _wrong(f"off by {answer - right:+,d}. One expert is gate, up, down = 3 x {h} x {m} = {expert:,d}; the router is "
           f"{router:,d}; the dense MLP of layer 0 is {base['dense_mlp']:,d}.")


def _flash_rule_globals(n_layers):
    return [i for i in range(n_layers) if i == 0 or (i + 1) % 6 == 0]


def check_ex_00_2(answer):
    """Global layers of a 60-layer model with Flash's rule."""
    if _unanswered(answer, "print [i for i, kind in enumerate(config.hybrid_layer_pattern) if kind == 0] and "
                           "look at the spacing."):
        return
    right = _flash_rule_globals(60)
    flash = _flash()
    assert _flash_rule_globals(48) == [i for i, kind in enumerate(flash.hybrid_layer_pattern) if kind == 0]
    try:
        answer = sorted(int(i) for i in answer)
    except (TypeError, ValueError):
        _wrong(f"give a list of layer indices, got {answer!r}")
    if answer == right:
        return _correct(f"{right}: layer 0 plus every sixth layer (i + 1 divisible by 6), {len(right)} global layers, "
                        f"{60 - len(right)} sliding.")
    if 0 not in answer:
        _wrong("layer 0 is global too (the report makes the first block global with a dense FFN).")
    if answer == [0] + list(range(6, 60, 6)):
        _wrong("the global layer closes each block of six: layers 5, 11, 17, ... (0-based), not 6, 12, ...")
    missing, extra = sorted(set(right) - set(answer)), sorted(set(answer) - set(right))
    _wrong(f"not quite: missing {missing}, not global {extra}. Layer 0 and every layer i with (i + 1) % 6 == 0.")


def check_ex_00_3(answer):
    """Active parameters with top-4 routing."""
    if _unanswered(answer, "only the experts_active term of section 4 depends on how many experts a token uses."):
        return
    answer = _integer(answer, "the active count")
    flash = _flash()
    base = flash.parameter_counts()
    right = flash.replace(num_experts_per_tok=4).parameter_counts()["active"]
    expert = 3 * flash.hidden_size * flash.moe_intermediate_size
    if answer == right:
        return _correct(f"{right:,d} active ({human_share(right, base['total'])} of {base['total']:,d}); 4 experts x "
                        f"47 layers x {expert:,d} = {4 * 47 * expert:,d} fewer than with top-8. The total is unchanged.")
    if answer == base["active"]:
        _wrong("that is the top-8 count: with 4 experts per token, 4 x 47 experts fewer run.")
    if answer == base["active"] - 4 * expert:
        _wrong("you removed 4 experts from one layer; every one of the 47 MoE layers routes to 4 fewer.")
    if answer == base["active"] // 2:
        _wrong("halving everything is too much: attention, embeddings, the dense MLP and the routers do not change.")
    _wrong(f"off by {answer - right:+,d}; active = total - 47 x (256 - k) x {expert:,d} with k = 4.")


def human_share(part, whole):
    return f"{part / whole:.2%}"


def check_ex_00_4(attention_parameters):
    """attention_parameters(hidden_size, geometry) -> int."""
    from minimimo import MiMoConfig
    flash, tiny = _flash(), MiMoConfig.tiny()
    cases = [("Flash global layer", flash, 0), ("Flash sliding layer", flash, 1), ("tiny sliding layer", tiny, 1),
             ("tiny global layer", tiny, 0)]
    first = attention_parameters(flash.hidden_size, flash.attention(0))
    if _unanswered(first, "q_proj is [heads x head_dim, hidden]; k_proj [kv_heads x head_dim, hidden]; v_proj uses "
                          "v_head_dim; o_proj is [hidden, heads x v_head_dim]."):
        return
    for name, config, layer in cases:
        g, h = config.attention(layer), config.hidden_size
        q, k, v, o = g.num_heads * g.head_dim * h, g.num_kv_heads * g.head_dim * h, g.num_kv_heads * g.v_head_dim * h, \
            h * g.num_heads * g.v_head_dim
        sink = g.num_heads if g.has_sink else 0
        right = q + k + v + o + sink
        got = _integer(attention_parameters(h, g), f"attention_parameters for the {name}")
        if got == right:
            continue
        if got == right - sink:
            _wrong(f"{name}: {sink} short, the sink logits (one per query head, attention_sink_bias) are parameters.")
        if got == q + k + v + o + g.num_heads and not g.has_sink:
            _wrong(f"{name}: this layer has no sink (geometry.has_sink is False); do not count one.")
        if got == q + 2 * k + o + sink:
            _wrong(f"{name}: v_proj has kv_heads x v_head_dim rows ({g.v_head_dim} per head), not head_dim ({g.head_dim}).")
        if got == q + k + v + h * g.num_heads * g.head_dim + sink:
            _wrong(f"{name}: o_proj reads heads x v_head_dim = {g.num_heads * g.v_head_dim} channels, not "
                   f"heads x head_dim.")
        if got == 2 * q + v * g.num_heads // g.num_kv_heads + o + sink:
            _wrong(f"{name}: keys and values have kv_heads ({g.num_kv_heads}) heads, not one per query head (GQA).")
        _wrong(f"{name}: got {got:,d}, expected {right:,d} (q {q:,d} + k {k:,d} + v {v:,d} + o {o:,d} + sinks {sink}).")
    _correct("q, k, v, o and the sinks add up for global and sliding layers of both configs.")



# --------------------------------------------------------------------------- notebook 01
def check_ex_01_1(answer):
    """Rotary channels and pairs for head_dim 128, factor 0.334."""
    if _unanswered(answer, "rotary_dim = int(head_dim * partial_rotary_factor); each pair is two channels."):
        return
    right = (int(128 * 0.334), int(128 * 0.334) // 2)
    try:
        channels, pairs = answer
    except (TypeError, ValueError):
        _wrong(f"give a pair (rotary channels, pairs), got {answer!r}")
    if (channels, pairs) == right:
        return _correct(f"128 x 0.334 = {128 * 0.334:.3f}, floored to {right[0]} channels in {right[1]} pairs; "
                        f"{128 - right[0]} channels stay position-free.")
    if channels == round(128 * 0.334):
        _wrong(f"128 x 0.334 = {128 * 0.334:.3f}; int() floors it (to {right[0]}), it does not round.")
    if channels == right[0] and pairs == channels:
        _wrong("a pair is two channels that turn together: pairs = rotary channels / 2.")
    _wrong(f"rotary channels = int(128 x 0.334) = int({128 * 0.334:.3f}); pairs are half of that.")


def _wavelengths(theta, rotary_dim=64):
    import torch
    return 2 * math.pi * theta ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim)


def check_ex_01_2(answer):
    """Pairs with a wavelength beyond 32,768 tokens at theta 640,000."""
    if _unanswered(answer, "wavelength_i = 2 pi / inv_freq(64, theta)[i]; count the ones above 32,768."):
        return
    answer = _integer(answer, "the number of pairs")
    right = int((_wavelengths(640_000) > 32_768).sum())
    if answer == right:
        return _correct(f"{right} of 32 pairs turn less than once across the 32K pre-training context; the global "
                        f"theta was raised to 5e6 for 256K, where {int((_wavelengths(5e6) > 262_144).sum())} pairs "
                        "are longer than the context.")
    if answer == int((_wavelengths(640_000) > 262_144).sum()):
        _wrong("that counts wavelengths beyond 262,144 tokens; the question asks about the 32,768-token context.")
    if answer == int((_wavelengths(5e6) > 32_768).sum()) or answer == int((_wavelengths(5e6) > 262_144).sum()):
        _wrong("that is the count for theta 5e6 (the extended model); use theta 640,000.")
    if answer == int((_wavelengths(640_000, 128) > 32_768).sum()):
        _wrong("that uses rotary_dim 128; MiMo rotates 64 channels, 32 pairs.")
    _wrong(f"not {answer}. The wavelengths grow geometrically from 2 pi (pair 0) to 2 pi x 640,000^(62/64) tokens.")


def _reference_interleaved(x, positions, rotary_dim, theta):
    import torch
    from einops import rearrange, repeat
    omega = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    angles = repeat(rearrange(positions.float(), "b t -> b t 1") * omega, "b t f -> b 1 t (f two)", two=2)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    pairs = rearrange(x_rot, "... (f two) -> ... f two", two=2)
    turned = rearrange(torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1), "... f two -> ... (f two)")
    return torch.cat([x_rot * angles.cos() + turned * angles.sin(), x_pass], dim=-1)


def check_ex_01_3(rope_interleaved):
    """rope_interleaved(x, positions, rotary_dim, theta) with pairs (2i, 2i + 1)."""
    import torch
    from .layers import cos_sin, rope
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 10, 24, generator=gen)
    positions = torch.arange(10).expand(2, 10) + torch.tensor([[0], [50]])
    got = rope_interleaved(x, positions, 8, 1e4)
    if _unanswered(got, "angles as in cos_sin, repeated with 'b t f -> b 1 t (f two)'; the partner of channel 2i "
                        "is 2i + 1: [x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]."):
        return
    want = _reference_interleaved(x, positions, 8, 1e4)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        _wrong(f"expected a tensor of shape {list(want.shape)}, got {type(got).__name__} "
               f"{list(got.shape) if isinstance(got, torch.Tensor) else ''}")
    if torch.allclose(got, want, atol=1e-5):
        return _correct("pairs (2i, 2i + 1) turn by p x omega_i; the result differs from rotate-half everywhere "
                        "except position 0.")
    if torch.allclose(got, rope(x, *cos_sin(positions, 8, 1e4)), atol=1e-5):
        _wrong("that is rotate-half (pairs i, i + r/2); interleaved pairs neighbours (2i, 2i + 1).")
    if torch.allclose(got, _reference_interleaved(x, -positions, 8, 1e4), atol=1e-5):
        _wrong("it turns the wrong way: x' = x cos + rotate(x) sin with rotate([a, b]) = [-b, a].")
    if torch.allclose(got[..., :8], want[..., :8], atol=1e-5):
        _wrong("the rotary channels are right, but the channels from rotary_dim on must pass through unchanged.")
    if not torch.allclose(got[..., 8:], x[..., 8:]):
        _wrong("channels from rotary_dim on must pass through unchanged (they are position-free).")
    bad = (got - want).abs().amax(dim=(0, 1, 2))
    _wrong(f"the rotary channels differ from the reference (largest error {bad.max():.3f} at channel "
           f"{int(bad.argmax())}). Check the frequency order: pair i uses omega_i = theta^(-2i / rotary_dim).")


def check_ex_01_4(half_to_interleaved_rows):
    """half_to_interleaved_rows(w, head_dim, rotary_dim) so that interleaved RoPE reproduces rotate-half scores."""
    import torch
    from einops import rearrange
    from .layers import cos_sin, rope
    gen = torch.Generator().manual_seed(4)
    head_dim, rotary_dim, heads, hidden, T = 24, 8, 2, 32, 12
    w_q = torch.randn(heads * head_dim, hidden, generator=gen) / 6
    w_k = torch.randn(heads * head_dim, hidden, generator=gen) / 6
    x = torch.randn(1, T, hidden, generator=gen)
    positions = torch.arange(T)[None]
    permuted = half_to_interleaved_rows(w_q, head_dim, rotary_dim)
    if _unanswered(permuted, "per head, the first rotary_dim rows go from (two f) to (f two) order: "
                            "rearrange(w, '(h d) c -> h d c', d=head_dim), permute the first rotary_dim rows."):
        return
    if not isinstance(permuted, torch.Tensor) or permuted.shape != w_q.shape:
        _wrong(f"return a weight of the same shape {list(w_q.shape)}")

    def heads_of(w):
        return rearrange(x @ w.T, "b t (h d) -> b h t d", d=head_dim)

    cos, sin = cos_sin(positions, rotary_dim, 1e4)
    want = rope(heads_of(w_q), cos, sin) @ rope(heads_of(w_k), cos, sin).transpose(-1, -2)
    q = _reference_interleaved(heads_of(permuted), positions, rotary_dim, 1e4)
    k = _reference_interleaved(heads_of(half_to_interleaved_rows(w_k, head_dim, rotary_dim)), positions, rotary_dim, 1e4)
    got = q @ k.transpose(-1, -2)
    if torch.allclose(got, want, atol=1e-4):
        return _correct("interleaved RoPE on the permuted rows gives the rotate-half scores at every position: the "
                        "convention lives in the order of the q/k_proj rows.")
    if torch.equal(permuted, w_q):
        _wrong("the weight came back unchanged; interleaved RoPE then pairs the wrong channels (scores agree only "
               "at position 0).")
    _wrong(f"the scores differ by up to {(got - want).abs().max():.3f}. Within each head, rotary row i must move to "
           "2i and row i + rotary_dim/2 to 2i + 1; the other rows stay, and each head is permuted on its own.")



# --------------------------------------------------------------------------- notebook 02
def check_ex_02_1(answer):
    """First query position whose output differs between a 129-key and a 128-key window."""
    if _unanswered(answer, "mask_128 = visible & (distance < 128); compare the outputs row by row and take the "
                           "first position where they differ by more than 1e-6."):
        return
    answer = _integer(answer, "the position")
    right = 128
    if answer == right:
        return _correct("query 128 is the first with a key at distance exactly 128 (key 0): the official 129-key "
                        "window sees it, a 128-key window does not. Every query from 128 on differs, so the two "
                        "agree only on sequences shorter than 129 tokens.")
    if answer == 129:
        _wrong("query 129 differs, but an earlier one already does: which query is the first to have a key at "
               "distance exactly 128?")
    if answer < right:
        _wrong(f"query {answer} has no key farther than {answer} positions back, so distance 128 never arises and "
               "both masks agree.")
    _wrong(f"query {answer} differs, but an earlier one already does. Compare the outputs of every query.")


def check_ex_02_2(answer):
    """Sink logit that takes 90% of the mass from 129 keys scoring 0."""
    if _unanswered(answer, "solve e^s / (e^s + 129) = 0.9 for s."):
        return
    try:
        answer = float(answer)
    except (TypeError, ValueError):
        _wrong(f"give a number, got {answer!r}")
    right = math.log(9 * 129)
    if abs(answer - right) < 1e-3:
        return _correct(f"sigma = ln(9 x 129) = {right:.3f}: the sink must out-score all 129 keys together by a "
                        f"factor 9. With 1 key the same sigma would leave only {1 / (1 + 9 * 129):.2%} for it.")
    if abs(answer - math.log(129)) < 1e-3:
        _wrong("ln 129 gives the sink half the mass (e^s = 129 = sum of the keys); 90% needs e^s nine times that.")
    if abs(answer - math.log(0.9 * 129)) < 1e-3 or abs(answer - math.log(9)) < 1e-3:
        _wrong("e^s / (e^s + n) = 0.9 means e^s = 0.9 (e^s + n), so e^s = 9 n with n = 129.")
    if abs(answer - math.log(9 * 128)) < 1e-3:
        _wrong("a sliding query sees 129 keys (128 previous + itself), not 128.")
    _wrong(f"with sigma = {answer:.3f} the sink takes {math.exp(answer) / (math.exp(answer) + 129):.1%} of the mass, "
           "not 90%.")


def check_ex_02_3(attention_repeat_kv):
    """GQA by repeating the KV heads must equal grouped attention without a sink."""
    import torch
    from einops import repeat
    from .layers import attention_with_sink, mask_from_positions
    gen = torch.Generator().manual_seed(5)
    b, h, g, t, d, e = 2, 8, 2, 12, 16, 8
    q, k, v = torch.randn(b, h, t, d, generator=gen), torch.randn(b, g, t, d, generator=gen), torch.randn(b, g, t, e, generator=gen)
    pos = torch.arange(t).expand(b, t)
    visible = mask_from_positions(pos, pos, 4)
    got = attention_repeat_kv(q, k, v, visible, d ** -0.5)
    if _unanswered(got, "einops repeat along the head axis, r = h // g copies of each KV head; which of '(g r)' "
                        "and '(r g)' puts the copies of KV head 0 next to each other, for query heads 0 .. r-1?"):
        return
    want = attention_with_sink(q, k, v, visible, None, d ** -0.5)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        _wrong(f"expected shape {list(want.shape)} [b h t e], got "
               f"{list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
    if torch.allclose(got, want, atol=1e-5):
        return _correct("query head h reads copy h // r of the KV heads, as the grouped einsum does; the copies cost "
                        f"memory (r = {h // g} times the keys here, 8 or 16 in MiMo), the grouping does not.")
    k_interleaved = repeat(k, "b g s d -> b (r g) s d", r=h // g)
    v_interleaved = repeat(v, "b g s e -> b (r g) s e", r=h // g)
    per_head = attention_with_sink(q, k_interleaved, v_interleaved, visible, None, d ** -0.5)
    if torch.allclose(got, per_head, atol=1e-5):
        _wrong("the copies are in the wrong order: '(r g)' gives query head h the KV head h % g; MiMo (and the "
               "checkpoint) group consecutive query heads, h // r, which is '(g r)'.")
    unmasked = attention_with_sink(q, k, v, torch.ones_like(visible), None, d ** -0.5)
    if torch.allclose(got, unmasked, atol=1e-5):
        _wrong("the mask is not applied: hidden keys must get -inf (or the most negative float) before the softmax.")
    _wrong(f"differs from grouped attention by up to {(got - want).abs().max():.3f}; check the scale, the mask and "
           "that the softmax runs over the key axis.")


def check_ex_02_4(answer):
    """Sink parameters in the 48 layers and 3 MTP blocks."""
    if _unanswered(answer, "one sink logit per query head, only in attention with a window."):
        return
    answer = _integer(answer, "the number of sink parameters")
    flash = _flash()
    sliding = sum(flash.attention(i).has_sink for i in range(flash.num_hidden_layers))
    heads = flash.swa_num_attention_heads
    right = (sliding + flash.num_mtp_layers) * heads
    if answer == right:
        return _correct(f"({sliding} sliding layers + {flash.num_mtp_layers} MTP blocks) x {heads} query heads = "
                        f"{right:,d}: the cheapest parameters of the model; the report's ablation "
                        "found the 128-token window clearly worse without them.")
    if answer == sliding * heads:
        _wrong(f"the {flash.num_mtp_layers} MTP blocks use sliding-window attention with a sink too.")
    if answer == (flash.num_hidden_layers + flash.num_mtp_layers) * heads or answer == flash.num_hidden_layers * heads:
        _wrong("the 9 global layers have no sink (add_full_attention_sink_bias is false).")
    if answer == (sliding + flash.num_mtp_layers) * flash.swa_num_key_value_heads or answer == sliding * flash.swa_num_key_value_heads:
        _wrong("one sink per *query* head (64), not per KV head.")
    _wrong(f"not {answer:,d}: count the attention blocks with a sink, times the query heads of each.")



# --------------------------------------------------------------------------- notebook 03
def check_ex_03_1(answer):
    """KV bytes of Flash at 32,768 tokens, bf16, one sequence."""
    if _unanswered(answer, "9 global layers x 4 kv heads x (192 + 128) x 2 B x 32,768 tokens, plus 39 rings of "
                           "8 kv heads x (192 + 128) x 2 B x 128 slots."):
        return
    answer = _integer(answer, "the number of bytes")
    flash = _flash()
    L, c = 32_768, (192 + 128) * 2
    right = flash.kv_cache_bytes(L, "bfloat16")
    global_part, rings = 9 * 4 * c * L, 39 * 8 * c * 128
    if answer == right:
        return _correct(f"{right:,d} B = {right / 2**30:.3f} GiB: {global_part:,d} in the 9 global layers, "
                        f"{rings:,d} in the 39 rings ({rings / right:.1%}); all-global would be "
                        f"{flash.kv_cache_bytes(L, 'bfloat16', 'all-global') / right:.2f}x more.")
    if answer == global_part:
        _wrong(f"that is the global layers only; the 39 rings add {rings:,d} B (constant once L >= 128).")
    if answer == global_part + 39 * 8 * c * 129:
        _wrong("a ring holds 128 slots; the 129th key a query reads is the new token itself, not a stored one.")
    if answer == 2 * right:
        _wrong("bf16 is 2 bytes per number; that looks like float32 (4).")
    if answer == 9 * 8 * c * L + rings:
        _wrong("the global layers have 4 KV heads, not 8.")
    if answer == flash.kv_cache_bytes(L, "bfloat16", "all-global"):
        _wrong("that is the all-global baseline (48 global layers); MiMo keeps rings in its 39 sliding layers.")
    if answer == right // 2:
        _wrong("keys and values both: (192 + 128) channels per head and token, not one of them.")
    _wrong(f"off by {answer - right:+,d} B. Per token and KV head: keys 192 + values 128 channels, 2 bytes each.")


def check_ex_03_2(answer):
    """Slots of position 1000 in rings of 128 and 131 slots."""
    if _unanswered(answer, "slot(p) = p mod (number of slots)."):
        return
    try:
        with_w, with_reserve = (int(a) for a in answer)
    except (TypeError, ValueError):
        _wrong(f"give a pair (slot with 128 slots, slot with 131 slots), got {answer!r}")
    right = (1000 % 128, 1000 % 131)
    if (with_w, with_reserve) == right:
        return _correct(f"1000 mod 128 = {right[0]} and 1000 mod 131 = {right[1]}: with spare slots a position moves "
                        "to another slot, which is why a ring's reserve is fixed when the cache is created.")
    if with_w == right[0] and with_reserve == right[0]:
        _wrong("with reserve=3 the ring has 131 slots and slot(p) = p mod 131: the reserve changes the modulus.")
    if with_w in (1000 // 128, 1000 % 129):
        _wrong("slot(p) = p mod W with W = 128 slots (the remainder, not the quotient; 128 slots, not 129).")
    _wrong(f"({with_w}, {with_reserve}) is not it: slot(p) = p mod slots, slots = 128 and 131.")


def check_ex_03_3(answer):
    """First wrong output of a write-then-read ring with W = 5."""
    if _unanswered(answer, "which query is the first whose oldest visible key (distance W) sits in the slot the "
                           "query's own token takes?"):
        return
    answer = _integer(answer, "the position")
    right = 5
    if answer == right:
        return _correct("position 5: token 5 goes to slot 5 % 5 = 0 and overwrites token 0, which query 5 still "
                        "sees (distance exactly W). From then on every query loses its oldest key, so reading "
                        "before writing is what gives each query its W + 1 keys.")
    if answer == 0:
        _wrong("the very first output is right: before position 5 nothing is overwritten. If your ring was wrong "
               "from 0, it probably returned the new token twice (once from its slot, once appended); return only "
               "the W slots after writing.")
    if answer < right:
        _wrong(f"at position {answer} the ring has not wrapped yet: every key 0..{answer} is still in its slot.")
    if answer == right + 1:
        _wrong("an earlier position already goes wrong: the key at distance exactly W is still visible (W + 1 keys).")
    _wrong(f"position {answer} is wrong, but an earlier one already is.")


def check_ex_03_4(longest_context):
    """longest_context(config, budget_bytes, layout) -> the largest L with kv_cache_bytes(L) <= budget."""
    flash = _flash()
    if _unanswered(longest_context(flash, 2**30, "hybrid"),
                   "hybrid bytes(L) = rings + per_token_global x L once L >= 128; solve for L and floor."):
        return

    def brute(budget, layout):
        low, high = 0, 1
        while flash.kv_cache_bytes(high, "bfloat16", layout) <= budget:
            high *= 2
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if flash.kv_cache_bytes(mid, "bfloat16", layout) <= budget else (low, mid)
        return low

    per_token = 9 * 4 * 320 * 2
    rings = 39 * 8 * 320 * 2 * 128
    for budget in [2**30, 4 * 2**30, 40 * 2**30, 10**7]:
        for layout in ("hybrid", "all-global"):
            right = brute(budget, layout)
            got = _integer(longest_context(flash, budget, layout), f"longest_context(flash, {budget:,d}, {layout!r})")
            if got == right:
                continue
            if layout == "hybrid" and got == budget // per_token:
                _wrong(f"budget {budget:,d}: {got:,d} tokens ignores the 39 rings ({rings:,d} B, fixed): subtract them first.")
            if budget < rings and layout == "hybrid":
                _wrong(f"budget {budget:,d} B is smaller than the rings; below the window every layer still grows "
                       f"with L (min(L, 128) tokens per ring): expected {right:,d}, got {got:,d}.")
            if got == right + 1:
                _wrong(f"{layout}, budget {budget:,d}: {got:,d} tokens need {flash.kv_cache_bytes(got, 'bfloat16', layout):,d} B, "
                       "one token over the budget; floor, do not round up.")
            _wrong(f"{layout}, budget {budget:,d} B: expected {right:,d} tokens, got {got:,d}.")
    return _correct(f"hybrid fits {brute(40 * 2**30, 'hybrid'):,d} tokens in 40 GiB, all-global "
                    f"{brute(40 * 2**30, 'all-global'):,d}: the window buys 5.3x the context in the same memory.")


# --- notebooks 04-08 ---
# (course helper B's section: exercises of notebooks 04 to 08; keep new checks of 00-03 above this line)


# --------------------------------------------------------------------------- notebook 04
def check_ex_04_1(answer):
    """Expected active experts for 32 decode tokens, 256 experts, top-8, balanced routing."""
    if _unanswered(answer, "e (1 - (1 - k/e)^n) with e = 256, k = 8, n = 32."):
        return False
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        _wrong(f"give a number, got {type(answer).__name__}")
    e, k, n = 256, 8, 32
    right = e * (1 - (1 - k / e) ** n)
    if abs(answer - right) <= 1.5:
        return _correct(f"about {right:.0f} of 256 experts ({right / e:.0%}): 32 tokens already touch most of the "
                        "layer, so batching decode steps quickly makes the expert weights a full read again.")
    if abs(answer - k * n) < 0.5:
        _wrong("8 x 32 = 256 counts every (token, expert) pair as a different expert; tokens share experts. The chance "
               "that one expert gets none of the 32 tokens is (1 - 8/256)^32.")
    if abs(answer - k) < 0.5:
        _wrong("8 is one token's experts; 32 tokens each pick their own 8.")
    if abs(answer - e * (1 - k / e) ** n) <= 1.5:
        _wrong(f"{answer:.0f} is the expected number of *idle* experts; the question asks how many run.")
    _wrong(f"not {answer}: e (1 - (1 - k/e)^n) = 256 (1 - (248/256)^32).")


def _softmax_reference(x, weight, bias, top_k):
    import torch
    probs = torch.softmax(x.float() @ weight.float().T, dim=-1)
    ids = (probs + bias.float()).topk(top_k, dim=-1).indices
    weights = probs.gather(1, ids)
    return weights / weights.sum(-1, keepdim=True), ids


def check_ex_04_2(softmax_route):
    """softmax scores, bias for the choice only, weights = unbiased probabilities normalised over the k."""
    import torch
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(256, 32, generator=gen), torch.randn(16, 32, generator=gen) / 32 ** 0.5
    bias = 0.02 * torch.randn(16, generator=gen)
    try:
        got = softmax_route(x, weight, bias, 4)
    except NotImplementedError:
        print("not answered yet. Hint: probs = softmax(x @ W^T) in float32; ids = top-k of probs + bias; "
              "weights = probs of the chosen experts divided by their sum.")
        return False
    try:
        weights, ids = got
    except (TypeError, ValueError):
        _wrong("return a pair (gate_weights [n, k], expert_ids [n, k])")
    want_w, want_i = _softmax_reference(x, weight, bias, 4)
    if tuple(ids.shape) != (256, 4) or tuple(weights.shape) != (256, 4):
        _wrong(f"expected [256, 4] weights and ids, got {list(weights.shape)} and {list(ids.shape)}")
    same_sets = torch.equal(ids.sort(-1).values, want_i.sort(-1).values)
    if not same_sets:
        with_bias_in_logits = torch.softmax(x @ weight.T + bias, -1).topk(4, -1).indices
        if torch.equal(ids.sort(-1).values, with_bias_in_logits.sort(-1).values):
            _wrong("you added the bias to the logits before the softmax. The rule adds it to the *scores* (the "
                   "probabilities), like the sigmoid router adds it to the sigmoid scores.")
        no_bias = torch.softmax(x @ weight.T, -1).topk(4, -1).indices
        if torch.equal(ids.sort(-1).values, no_bias.sort(-1).values):
            _wrong("the bias did not take part in the choice: rank experts by probability + bias.")
        _wrong(f"{int((ids.sort(-1).values != want_i.sort(-1).values).any(-1).sum())} of 256 tokens chose other experts "
               "than probability + bias would.")
    order, want_order = ids.argsort(-1), want_i.argsort(-1)
    w, ww = weights.float().gather(1, order), want_w.gather(1, want_order)
    if torch.allclose(w, ww, atol=1e-5):
        return _correct("softmax scores, the bias only in the choice, weights normalised over the chosen experts.")
    biased = (torch.softmax(x @ weight.T, -1) + bias).gather(1, want_i)
    if torch.allclose(w, (biased / biased.sum(-1, keepdim=True)).gather(1, want_order), atol=1e-5):
        _wrong("the weights include the bias; the bias only chooses, the weights come from the unbiased probabilities.")
    if torch.allclose(w, torch.softmax(x @ weight.T, -1).gather(1, want_i).gather(1, want_order), atol=1e-5):
        _wrong("the weights are the raw probabilities; normalise them over the k chosen experts (they sum to one).")
    _wrong("the experts are right but the weights are not: probs of the chosen experts divided by their sum.")


def check_ex_04_3(answer):
    """Without a bias, softmax and sigmoid routers choose the same experts."""
    if _unanswered(answer, "both the sigmoid and the softmax are increasing functions of an expert's logit."):
        return False
    if isinstance(answer, bool) or not isinstance(answer, (int, float)) or not 0 <= answer <= 1:
        _wrong(f"give a fraction between 0 and 1, got {answer!r}")
    if answer == 0:
        return _correct("none: sigmoid(z) and softmax(z) rank the experts of a token exactly as the logits z do, so the "
                        "top-k without a bias is the same set (only the weights differ). With the learned bias the "
                        "choice changes for many tokens: a bias of a few hundredths is small next to sigmoid scores in "
                        "(0, 1) but large next to softmax probabilities of about 1/256.")
    _wrong(f"{answer} is not what happens: both functions are increasing in the logit, so for one token they rank the "
           "experts in the same order. Measure it (bias = zeros) if you are not convinced; ties aside the answer is exact.")


# --------------------------------------------------------------------------- notebook 05
def check_ex_05_1(answer):
    """Expected tokens per cycle with 3 drafts and a_j = 0.9."""
    if _unanswered(answer, "tau = 1 + a0 + a0 a1 + a0 a1 a2: the bonus token always comes, draft j only if all before it did."):
        return False
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        _wrong(f"give a number, got {type(answer).__name__}")
    right = 1 + 0.9 + 0.9 ** 2 + 0.9 ** 3
    if abs(answer - right) < 0.01:
        return _correct(f"tau = 1 + 0.9 + 0.81 + 0.729 = {right:.3f}: close to the paper's 3.6 at k = 3, which needs "
                        "a little more than 90% agreement per block.")
    if abs(answer - (right - 1)) < 0.01:
        _wrong("you left out the bonus token: every cycle ends with one token of the main model's own, accepted or not.")
    if abs(answer - (1 + 3 * 0.9)) < 0.01:
        _wrong("3.7 counts each draft with probability 0.9 on its own; draft j is only kept if every draft before it was "
               "kept, so its term is 0.9^j.")
    if abs(answer - 0.9 ** 3 * 4) < 0.01:
        _wrong("that is 4 tokens times the chance that all three drafts pass; cycles that stop early still yield tokens.")
    _wrong(f"not {answer}: sum the chance of keeping each draft (0.9, 0.9^2, 0.9^3) and add 1 for the bonus token.")


def check_ex_05_2(accept):
    """accept(drafts [k], target [k+1]) -> new tokens: the agreeing prefix + the main model's next token."""
    import torch
    cases = [([5, 6, 7], [5, 6, 9, 1], [5, 6, 9], "two drafts agree, the third does not"),
             ([5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8], "every draft agrees"),
             ([5, 6, 7], [4, 6, 7, 8], [4], "the first draft is wrong (the later ones agree by chance)"),
             ([3], [3, 2], [3, 2], "k = 1")]
    for drafts, target, want, label in cases:
        try:
            got = accept(torch.tensor(drafts), torch.tensor(target))
        except NotImplementedError:
            print("not answered yet. Hint: count the leading positions where drafts == target[:k] (a cumulative "
                  "product of the matches), keep that many drafts, then append target[count].")
            return False
        got = [int(x) for x in (got.tolist() if isinstance(got, torch.Tensor) else got)]
        if got == want:
            continue
        if got == want[:-1]:
            _wrong(f"{label}: drafts {drafts}, target {target}: you returned {got} without the main model's own next "
                   f"token {want[-1]}; a cycle always ends with it (that is why it yields at least one token).")
        if len(got) > len(want):
            _wrong(f"{label}: drafts {drafts}, target {target}: you returned {got}. Drafts after the first disagreement "
                   "were guessed from a wrong prefix and must be dropped, even when they happen to match.")
        _wrong(f"{label}: drafts {drafts}, target {target}: expected {want}, got {got}.")
    return _correct("the longest agreeing prefix of the drafts, then the main model's token at the first "
                    "disagreement (or after the last draft): 1 to k + 1 tokens, all the main model's own choices.")


def check_ex_05_3(still_greedy, tokens_per_cycle, correct_tokens_per_cycle):
    """A drafter fed the wrong token: output unchanged, acceptance down."""
    if _unanswered(still_greedy, "run the broken cycle 20 times, compare with minimimo.generate(model, prompt, n)."):
        return False
    if still_greedy is not True and still_greedy is not False:
        _wrong(f"still_greedy should be True or False, got {still_greedy!r}")
    if still_greedy is False:
        _wrong("a wrong drafter cannot change the output: every kept token is the main model's argmax. If your tokens "
               "differ, compare the same number of new tokens, starting from the same prompt.")
    if not isinstance(tokens_per_cycle, (int, float)) or not 1 <= tokens_per_cycle <= 4:
        _wrong(f"tokens per cycle is between 1 and k + 1 = 4, got {tokens_per_cycle!r}")
    if tokens_per_cycle >= correct_tokens_per_cycle:
        _wrong(f"{tokens_per_cycle:.2f} tokens per cycle is not below the correct drafter's "
               f"{correct_tokens_per_cycle:.2f}: check that your copy of `cycle` really feeds chain[:, j:j + 1 + last].")
    return _correct(f"still plain greedy, but {tokens_per_cycle:.2f} instead of {correct_tokens_per_cycle:.2f} tokens per "
                    "cycle: a drafter off by one position guesses the wrong token, which costs speed, never correctness.")


# --------------------------------------------------------------------------- notebook 06
def check_ex_06_1(answer):
    """Tensor names in the index of MiMo-V2-Flash (main model + 3 MTP blocks), without _scale_inv."""
    if _unanswered(answer, "per layer: 2 norms + q, k, v, o (+ a sink in sliding layers); layer 0: a dense MLP of 3; "
                           "MoE layers: router weight and bias + 256 x 3 expert matrices; then embedding, final norm, "
                           "head, and 14 tensors per MTP block."):
        return
    answer = _integer(answer, "the number of tensor names")
    from minimimo.hub import tensor_specs
    flash = _flash()
    specs = tensor_specs(flash)
    right = len(specs)
    n_layers, n_moe = flash.num_hidden_layers, sum(flash.moe_layer_freq)
    n_sliding = sum(flash.is_sliding(i) for i in range(n_layers))
    experts = n_moe * flash.n_routed_experts * 3
    mtp = sum(name.startswith("model.mtp.") for name in specs)
    scales = sum(spec.quantizable for spec in specs.values())
    if answer == right:
        return _correct(f"{right:,d} names: {experts:,d} expert matrices (47 x 256 x 3), {n_moe * 2} router tensors, "
                        f"{n_layers * 6 + n_sliding} attention and norm tensors ({n_sliding} sinks), 3 for the dense MLP, "
                        f"3 for embedding, final norm and head, and {mtp} in the MTP blocks. The experts are 99% of the names.")
    if answer == right + scales:
        _wrong(f"that counts the {scales:,d} `_scale_inv` tensors too; the question leaves them out.")
    if answer == right - mtp:
        _wrong(f"{mtp} short: the three MTP blocks have 14 tensors each (enorm, hnorm, eh_proj, input_layernorm, "
               "q/k/v/o, the sink, pre_mlp_layernorm, gate/up/down, final_layernorm).")
    if answer == right + (n_layers - n_sliding):
        _wrong(f"{n_layers - n_sliding} too many: the global layers have no sink (`add_full_attention_sink_bias` is false).")
    if answer == right - n_sliding:
        _wrong(f"{n_sliding} short: each of the {n_sliding} sliding-window layers has an `attention_sink_bias`.")
    if answer == right - experts + n_moe * flash.num_experts_per_tok * 3:
        _wrong("you counted the 8 experts a token uses; the file stores all 256 of every MoE layer.")
    _wrong(f"off by {answer - right:+,d}. The experts alone are {n_moe} x {flash.n_routed_experts} x 3 = {experts:,d} names; "
           "add the router (2 per MoE layer), the attention and norms of every layer, layer 0's dense MLP, "
           f"embedding + final norm + head, and {mtp} MTP tensors.")


def check_ex_06_2(answer):
    """Swapped norms in layer 2: the first hidden state that moves."""
    if _unanswered(answer, "hidden_states.0 is the embedding and hidden_states.K the output of layer K - 1."):
        return
    answer = _integer(answer, "K")
    right = 3
    if answer == right:
        return _correct("hidden_states.3, the output of layer 2: everything before it is untouched, and every state "
                        "after it is wrong by whole units. Per-layer hidden states locate a bug to its layer.")
    if answer == 2:
        _wrong("hidden_states.2 is the output of layer 1, computed before layer 2 runs: it cannot move. "
               "Index 0 is the embedding, so layer i's output is hidden_states.(i + 1).")
    if answer < 2:
        _wrong(f"hidden_states.{answer} comes before layer 2 in the stack; a bug in layer 2 cannot reach it.")
    _wrong(f"hidden_states.{answer} moves, but an earlier one already does. Compare every state with `expected` "
           "and take the first index over 1e-4.")


def _chat_batch(tokenizer):
    import datetime
    import torch
    date = datetime.date(2025, 12, 16)
    rows = [tokenizer.encode_chat([{"role": "user", "content": text}], date=date)
            for text in ("Sort a list.", "Write a class that keeps a running mean of numbers, with add() and "
                                         "mean() methods and a docstring for each.")]
    width = max(len(r) for r in rows)
    pad = tokenizer.encode(" self")[0]     # any id: a correct loop never looks at the padding, so make it visible
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def check_ex_06_3(greedy_batch, weights, config, new_tokens=8):
    """greedy_batch(W, config, ids, mask, n) on two left-padded chat prompts == minimimo.generate."""
    import torch
    import minimimo
    directory = minimimo.default_checkpoint()
    tokenizer = minimimo.Tokenizer.from_pretrained(directory)
    ids, mask = _chat_batch(tokenizer)
    try:
        with torch.no_grad():
            got = greedy_batch(weights, config, ids, mask, new_tokens)
    except NotImplementedError:
        print("not answered yet. Hint: positions = torch.where(mask.bool(), mask.cumsum(-1) - 1, -1); caches for "
              "batch 2; after each step, row r's next position is its last position + 1.")
        return
    model = minimimo.load(directory, dtype=torch.float32, progress=False)
    want = minimimo.generate(model, ids, new_tokens, attention_mask=mask)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        _wrong(f"expected a tensor of shape {list(want.shape)} (the prompts followed by {new_tokens} new tokens), got "
               f"{type(got).__name__} {list(got.shape) if isinstance(got, torch.Tensor) else ''}")
    if not torch.equal(got[:, :ids.shape[1]], ids):
        _wrong("the first columns must be the prompts, unchanged.")
    if torch.equal(got, want):
        return _correct(f"both rows equal minimimo.generate with the attention mask ({new_tokens} tokens each): the "
                        f"padded row (padding {int((mask[0] == 0).sum())}) behaves as if it had no padding at all.")
    differs = (got != want)[:, ids.shape[1]:]
    row = int(differs.any(1).nonzero()[0])
    step = int(differs[row].nonzero()[0])
    if row == 0 and not differs[1].any():
        _wrong(f"the padded row 0 differs from new token {step} on, the unpadded row 1 is right: the padding is still "
               "visible or shifts the positions. Pads need position -1 (no query sees them) and real tokens "
               "cumsum(mask) - 1, in the prefill and in every step after it.")
    if step > 0:
        _wrong(f"row {row} is right for {step} token(s), then differs: the prefill is fine, the decode steps are not. "
               "Each new token's position is its row's previous position + 1 (not the padded width), and the caches "
               "must be the ones the prefill filled.")
    _wrong(f"row {row} differs at the very first new token: check the prefill (positions from the mask, caches for "
           "batch 2) and that the next token is the argmax of each row's last logits.")


# --------------------------------------------------------------------------- notebook 07
def check_ex_07_1(answer):
    """Scale rows of Flash's global k_proj [768, 4096], 128 x 128 blocks, per head of 192 rows."""
    if _unanswered(answer, "each head of 192 rows starts its own blocks: how many 128-row blocks does 192 rows need?"):
        return False
    answer = _integer(answer, "the number of scale rows")
    if answer == 8:
        return _correct("4 heads x ceil(192 / 128) = 4 x 2 = 8 rows: each head is one 128-row block and one 64-row block.")
    if answer == 6:
        _wrong("6 = ceil(768 / 128) is the uniform grid, blocks running across head boundaries. The checkpoint "
               "was quantized per kv head: the blocks restart at rows 0, 192, 384, 576.")
    if answer == 4:
        _wrong("one scale row per head would need 192-row blocks; the blocks are 128 rows, so a head needs two.")
    if answer == 32:
        _wrong("32 = 4096 / 128 is the number of scale *columns* (the input side).")
    _wrong("count per head: ceil(D / b) scale rows for each of the 4 heads.")


def _hub_fp8_k_proj(layer):
    import json
    from pathlib import Path
    from safetensors import safe_open
    folder = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hub-fp8"
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = f"model.layers.{layer}.self_attn.k_proj.weight"
    out = []
    for tensor in (name, name + "_scale_inv"):
        with safe_open(folder / weight_map[tensor], framework="pt") as f:
            out.append(f.get_tensor(tensor))
    return out


def check_ex_07_2(answer):
    """Blocks without a 448 in layer 0's global k_proj of hub-fp8 under the 12-row grid."""
    if _unanswered(answer, "course_fp8.blocks_without_448(fp8, course_fp8.uniform_row_index(48, 12), 16)"):
        return False
    answer = _integer(answer, "the number of blocks")
    from .fp8 import blocks_without_448, per_head_row_index, uniform_row_index
    fp8, scale = _hub_fp8_k_proj(0)
    rows = fp8.shape[0]
    right = blocks_without_448(fp8, uniform_row_index(rows, rows // scale.shape[0]), 16)
    true_grid = blocks_without_448(fp8, per_head_row_index(rows, 16, 24), 16)
    if answer == right:
        return _correct(f"blocks without a 448 in the 12-row grid: {right} of 16, so the amax test rejects it, while "
                        f"the per-head grid has {true_grid}. The dequantized weight was wrong by a factor of the "
                        "neighbouring block's scale in the rows that took the wrong scale row.")
    if answer == true_grid:
        _wrong(f"{true_grid} is the count for the true per-head grid (r // 24 * 2 + r % 24 // 16). The exercise asks "
               "about the 12-row grid, r // 12.")
    _wrong("count again with blocks_without_448(fp8, uniform_row_index(48, 12), 16) on layer 0's k_proj: "
           "4 row blocks x 4 column blocks, each either reaching 448 or not.")


def check_ex_07_3(quantize):
    """quantize(weight, block, head_size) -> (fp8, scale_inv): right grid shape, round trip, amax property."""
    import torch
    from .fp8 import FP8_MAX, blocks_without_448, dequantize, per_head_row_index, uniform_row_index
    gen = torch.Generator().manual_seed(0)
    cases = [("uniform, partial edge blocks", torch.randn(40, 72, generator=gen), (16, 16), None),
             ("per head (2 heads of 24 rows)", torch.randn(48, 64, generator=gen) * 3, (16, 16), 24)]
    for label, weight, block, head_size in cases:
        try:
            fp8, scale = quantize(weight, block, head_size)
        except NotImplementedError:
            print("not answered yet. Hint: row index per head or uniform (course.fp8), column index c // b, "
                  "amax per block with scatter_reduce, scale = amax / 448, fp8 = (weight / scale[row][:, col]).to(FP8).")
            return False
        rows, cols = weight.shape
        heads = rows // head_size if head_size else 1
        d = head_size or rows
        want_shape = (heads * -(-d // block[0]), -(-cols // block[1]))
        if fp8.dtype != torch.float8_e4m3fn:
            _wrong(f"{label}: fp8 must be torch.float8_e4m3fn, got {fp8.dtype}")
        if tuple(scale.shape) != want_shape:
            hint = " The blocks restart at every head: heads x ceil(D / b) rows." if head_size else ""
            _wrong(f"{label}: scale_inv has shape {list(scale.shape)}, expected {list(want_shape)}.{hint}")
        index = per_head_row_index(rows, block[0], head_size) if head_size else uniform_row_index(rows, block[0])
        missing = blocks_without_448(fp8, index, block[1])
        if missing:
            _wrong(f"{label}: {missing} block(s) have no |fp8| = 448. With scale_inv = amax / 448 the largest entry of "
                   "every block is exactly 448; did you divide by 448, and use the same grid for amax and for the division?")
        error = (dequantize(fp8, scale, block, head_size) - weight).abs() / weight.abs().clamp_min(1e-3)
        if error.max() > 2 ** -3:
            _wrong(f"{label}: the round trip is off by up to {error.max():.0%} of a weight; e4m3 keeps 3 mantissa bits, "
                   "so a correct quantizer is within 1/16 relative error.")
        if not torch.all(scale.float() > 0) or fp8.float().abs().max() > FP8_MAX:
            _wrong(f"{label}: scales must be positive and |fp8| at most 448.")
    return _correct("both grids: right scale shapes, every block reaches 448, and dequantize(quantize(w)) is within "
                    "e4m3's rounding of w.")


# --------------------------------------------------------------------------- notebook 08
def _flash_plan(devices, memory):
    from minimimo.plan import plan
    return plan(_flash(), devices=devices, device_memory=memory, weight_dtype="fp8")


def check_ex_08_1(answer):
    """Does FP8 Flash fit on 4 x 80 GiB / 4 x 141 GB with layer placement and 10% headroom?"""
    if _unanswered(answer, "291.6 GiB of FP8 weights against 4 x 90% of each device's memory; then plan(flash, devices=4, ...)."):
        return False
    if not isinstance(answer, dict) or set(answer) != {"4 x 80GiB", "4 x 141GB"}:
        _wrong('give a dict {"4 x 80GiB": True/False, "4 x 141GB": True/False}')
    right = {"4 x 80GiB": _flash_plan(4, "80GiB").fits, "4 x 141GB": _flash_plan(4, "141GB").fits}
    if answer == right:
        return _correct("4 x 80 GiB does not fit (291.6 GiB of weights > 4 x 72 GiB usable, before whole-layer "
                        "granularity even matters); 4 x 141 GB fits with room for the KV cache.")
    if answer["4 x 80GiB"] and not right["4 x 80GiB"]:
        _wrong("4 x 80 GiB = 320 GiB looks enough for 291.6 GiB, but the plan keeps 10% of each device free for "
               "activations: 4 x 72 GiB = 288 GiB usable. Run plan(flash, devices=4, device_memory='80GiB', "
               "weight_dtype='fp8') and read its table.")
    _wrong(f"the planner says {right}. 4 x 141 GB is 525 GiB, 472 GiB usable: plenty for 291.6 GiB.")


def check_ex_08_2(answer):
    """The 4 x 141 GB FP8 plan: device of the MTP blocks, fill of the fullest device."""
    if _unanswered(answer, "p = plan(...); p.placement['mtp.0'] and max(row['total'] / row['capacity'] for row in p.per_device())."):
        return False
    try:
        device, fraction = answer
    except (TypeError, ValueError):
        _wrong(f"give a pair (device index, fraction), got {answer!r}")
    p = _flash_plan(4, "141GB")
    right_device = p.placement["mtp.0"]
    right_fill = max(row["total"] / row["capacity"] for row in p.per_device())
    if device != right_device:
        _wrong(f"device {device} does not hold them: the units run in forward order (embedding, layers, head, MTP), so "
               f"the MTP blocks come last, on device {right_device}.")
    if fraction > 1.5:
        _wrong(f"{fraction} looks like a percentage or GiB; give the fraction total / memory (e.g. 0.5).")
    if abs(fraction - right_fill) > 0.01:
        _wrong(f"the fullest device is {right_fill:.2f} full, not {fraction:.2f}: total (weights + KV) over its memory, "
               "not over the 90% usable part.")
    return _correct(f"device {right_device}, and the fullest device is {right_fill:.0%} full: half of the FP8 model per "
                    "device leaves room for many long KV caches.")


def check_ex_08_3(kv_copies):
    """kv_copies(H, G, world) -> ranks holding each kv head, vs parallel.head_shard."""
    from minimimo.parallel import head_shard
    cases = [(64, 4, world) for world in (2, 4, 8, 16)] + [(64, 8, world) for world in (2, 4, 8, 16)]
    for heads, kv, world in cases:
        shards = [head_shard(heads, kv, r, world, "layer") for r in range(world)]
        right = [sum(s.k0 <= g < s.k1 for s in shards) for g in range(kv)]
        try:
            got = kv_copies(heads, kv, world)
        except NotImplementedError:
            print("not answered yet. Hint: for each rank take owned_heads(...)[1] (its kv heads) and count, per kv head, "
                  "the ranks that hold it.")
            return False
        got = list(got)
        if got != right:
            if all(c == 1 for c in got) and world > kv:
                _wrong(f"{heads} q / {kv} kv heads on {world} ranks: with fewer kv heads than ranks, each kv head is read "
                       f"by the query heads of {world // kv} ranks, and each of them needs its own copy. Expected {right}.")
            _wrong(f"{heads} q / {kv} kv heads on {world} ranks: expected {right}, got {got}.")
    return _correct("kv heads are split while there are at least as many as ranks, and replicated world / kv times "
                    "when there are fewer (Flash's global layers on 8 ranks: every kv head twice).")
