"""CPU generation benchmarks: minimimo's greedy decoding and KV cache against the official transformers model.

    python bench/generate.py            # full run (about 1.5-2 minutes on 2 busy cores)
    python bench/generate.py --quick    # smoke run (< 40 s)
    python bench/generate.py --profile  # also profile minimimo decode steps (torch.profiler + cProfile)

1. Decode throughput. A small random model (hidden 256, 8 layers with Flash's layer rule, 16
   experts top-4, window 32, vocab 2048) is written with `save_checkpoint` (float32) and loaded
   twice: `minimimo.load` and transformers `AutoModelForCausalLM.from_pretrained(...,
   attn_implementation="eager")`, transformers' defaults otherwise (its default experts
   implementation and its default cache: a DynamicCache with sliding-window layers). Prompts of
   64 tokens, 128 new tokens, greedy, batch 1 and batch 8 (rows of different lengths, left
   padded, attention_mask given to both). Both must produce the same token ids (asserted).

   Three timings per model, in interleaved rounds (minimimo, transformers, minimimo, ...):
     ttft   time to the first new token: prefill + one argmax. minimimo: the first token that
            `minimimo.stream` yields; transformers: `generate(max_new_tokens=1)`.
     total  the whole `generate(max_new_tokens=128)` call, what a user waits for.
     decode total - ttft, measured within the same round: the time the other 127 tokens took.
   Throughput = batch x tokens / time (tokens of every row count). The table shows medians over
   the rounds; "paired" ratios are medians of the per-round ratios.

2. KV cache bytes at prompt + new tokens (192): minimimo's `HybridCache.nbytes()` (built as
   `generate` builds it, `max_length` = prompt + new, and filled by a forward over the sequence:
   the global buffers grow as tokens arrive, up to `max_length`),
   transformers' `past_key_values` after a `use_cache=True` forward over the same sequence
   (bytes of its key/value tensors, and the bytes of the storage those tensors keep alive), and
   `MiMoConfig.kv_cache_bytes`. Then the formula for the real MiMo-V2-Flash at 4K-256K tokens.

Everything runs in float32 under `torch.inference_mode()`. By default on ONE torch thread: a
decode step of this model is a few hundred small ops, a second thread gains little on an idle
machine and, on a busy one, every op waits for a descheduled thread (steps 10-50x slower). Use
`--threads 0` for torch's default. Ratios > 1 mean minimimo is faster.
"""

from __future__ import annotations

import argparse
import io
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import minimimo  # noqa: E402
from common import check_official_rules, official_and_ours, fmt_ms, header, load_average, timed  # noqa: E402
from minimimo import HybridCache, MiMoConfig  # noqa: E402
from minimimo.config import human  # noqa: E402

# ------------------------------------------------------------------------------------------- config

# The official transformers model ignores hybrid_layer_pattern, swa_* keys, thetas, the rotary
# factor and eps and hard-codes them: layer i is global iff i == 0 or (i + 1) % 6 == 0, layer 0 is
# dense, swa kv heads = 2 * num_key_value_heads, swa q heads = num_attention_heads, same head dims,
# thetas 5e6 / 1e4, factor 0.334, eps 1e-5. The config below satisfies all of it (checked below).
SMALL = dict(
    num_hidden_layers=8, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, vocab_size=2048,
    num_attention_heads=8, num_key_value_heads=2, head_dim=48, v_head_dim=32,  # int(48 * 0.334) = 16 rotary
    swa_num_attention_heads=8, swa_num_key_value_heads=4, swa_head_dim=48, swa_v_head_dim=32,
    sliding_window_size=32,  # < prompt + new, so the ring buffers wrap several times
    n_routed_experts=16, num_experts_per_tok=4,
    max_position_embeddings=4096,
)
PAD = 0


def prompts(batch: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts [batch, length], left padded: row r has length - r * step real tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    step = max(1, length // (2 * batch)) if batch > 1 else 0  # batch 8, 64 tokens: 64, 60, ..., 36
    for r in range(batch):
        pad = r * step
        ids[r, :pad], mask[r, :pad] = PAD, 0
    return ids, mask


# ------------------------------------------------------------------------------------------- timing


# ------------------------------------------------------------------------------------------- models


def build_models(config: MiMoConfig):
    """Random weights -> save_checkpoint (float32) -> (minimimo model, transformers model)."""
    ours, theirs = official_and_ours(config, layout="single")
    return ours, theirs


def ours_generate(model, ids, mask, new, compile=False):
    return minimimo.generate(model, ids, new, attention_mask=mask, compile=compile)


def ours_first_token(model, ids, mask, compile=False):
    """Prefill + the first greedy token, as `stream` delivers it (generate would also run the
    forward that feeds that token back)."""
    tokens = minimimo.stream(model, ids, 1, attention_mask=mask, compile=compile)
    first = next(tokens)
    tokens.close()
    return first


def theirs_generate(model, ids, mask, new):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                          eos_token_id=None, pad_token_id=PAD)


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    r, c = (a != b).nonzero()[0].tolist()
    return f"row {r}, position {c}: minimimo {a[r, c].item()} vs transformers {b[r, c].item()}"


# ------------------------------------------------------------------------------------------- 1. decode


def bench_decode(args, config, ours, theirs) -> None:
    p, n = args.prompt, args.new
    print(f"\n== 1. greedy generation: prompt {p} tokens, {n} new tokens ==")
    print("ttft = prefill + first token; decode = total - ttft (the other "
          f"{n - 1} tokens, per round); tok/s = batch x tokens / time; medians over interleaved rounds")
    names = {"mm": "minimimo", "hf": "transformers"}
    if args.compile:
        names["mc"] = "compiled"
        print("compiled = minimimo.generate(..., compile=True): the decode steps under torch.compile "
              "(static_decode.py); its compile time is measured apart, on the first call of each batch size")
    runs = {"mm": (lambda ids, mask, new: ours_generate(ours, ids, mask, new),
                   lambda ids, mask: ours_first_token(ours, ids, mask)),
            "hf": (lambda ids, mask, new: theirs_generate(theirs, ids, mask, new),
                   lambda ids, mask: theirs_generate(theirs, ids, mask, 1)),
            "mc": (lambda ids, mask, new: ours_generate(ours, ids, mask, new, compile=True),
                   lambda ids, mask: ours_first_token(ours, ids, mask, compile=True))}
    print(f"{'batch':>5s} {'model':12s} {'ttft ms':>9s} {'total ms':>9s} {'decode ms':>9s} {'ms/step':>8s} "
          f"{'decode tok/s':>12s} {'e2e tok/s':>10s}")
    summary = []
    for batch in args.batches:
        ids, mask = prompts(batch, p, config.vocab_size, seed=batch)
        with torch.inference_mode():
            a = ours_generate(ours, ids, mask, n)  # the parity runs are also the warm-ups
            b = theirs_generate(theirs, ids, mask, n)
            assert torch.equal(a, b), f"batch {batch}: token ids differ at {first_mismatch(a, b)}"
            assert torch.equal(ours_first_token(ours, ids, mask), a[:, p])
            if args.compile:
                first_call = time.perf_counter()
                c = ours_generate(ours, ids, mask, n, compile=True)  # compiles for this batch size
                first_call = time.perf_counter() - first_call
                assert torch.equal(c, a), f"batch {batch}: compiled ids differ at {first_mismatch(c, a)}"
            t = {f"{m}_{k}": [] for m in names for k in ("ttft", "total")}
            start, rounds = time.perf_counter(), 0
            while rounds < args.min_rounds or (rounds < args.max_rounds and time.perf_counter() - start < args.budget):
                for m in names:
                    t[f"{m}_ttft"].append(timed(lambda: runs[m][1](ids, mask)))
                for m in names:
                    t[f"{m}_total"].append(timed(lambda: runs[m][0](ids, mask, n)))
                rounds += 1
        dec = {m: [tot - ttft for tot, ttft in zip(t[f"{m}_total"], t[f"{m}_ttft"])] for m in names}
        med = {k: statistics.median(v) for k, v in (t | {f"{m}_decode": d for m, d in dec.items()}).items()}
        for m, name in names.items():
            d = med[f"{m}_decode"]
            print(f"{batch:5d} {name:12s} {fmt_ms(med[m + '_ttft'])} {fmt_ms(med[m + '_total'])} {fmt_ms(d)} "
                  f"{d / (n - 1) * 1e3:8.2f} {batch * (n - 1) / d:12.1f} {batch * n / med[m + '_total']:10.1f}")
        rows = "" if batch == 1 else f", real lengths {mask.sum(1).tolist()}"
        ratios = {}
        for m in [m for m in names if m != "hf"]:
            decode_ratio = med["hf_decode"] / med[f"{m}_decode"]
            paired = statistics.median(h / o for h, o in zip(dec["hf"], dec[m]))
            total_ratio = med["hf_total"] / med[f"{m}_total"]
            ttft_ratio = med["hf_ttft"] / med[f"{m}_ttft"]
            print(f"{'':5s} {names[m]}/transformers speed: decode {decode_ratio:.2f}x (paired {paired:.2f}x), "
                  f"total {total_ratio:.2f}x, ttft {ttft_ratio:.2f}x | ids equal | {rounds} rounds{rows}")
            ratios[m] = (decode_ratio, paired)
        if args.compile:
            compile_s = first_call - med["mc_total"]
            saved = (med["mm_decode"] - med["mc_decode"]) / (n - 1)  # seconds per step
            even = f"{compile_s / saved:,.0f} steps ({batch * compile_s / saved:,.0f} tokens)" if saved > 0 else "never"
            print(f"{'':5s} compile: first call {first_call:.1f} s, of which compiling ~{compile_s:.1f} s; "
                  f"compiled/eager decode {med['mm_decode'] / med['mc_decode']:.2f}x; pays for itself after {even}")
        summary.append((batch, ratios))
    for m in [m for m in names if m != "hf"]:
        print(f"decode speed ratio {names[m]}/transformers (> 1: faster; goal >= 1.5): "
              + ", ".join(f"batch {b}: {r[m][0]:.2f}x (paired {r[m][1]:.2f}x)" for b, r in summary))


# ------------------------------------------------------------------------------------------- 2. cache


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def theirs_cache_bytes(cache) -> dict:
    """Bytes of the key/value tensors of a transformers Cache, by layer kind, and of the storage
    behind them (a slice of a larger tensor keeps the whole storage alive)."""
    out = {"global": 0, "sliding": 0, "storage": 0, "kinds": set(), "tokens": set()}
    seen = set()
    for layer in cache.layers:
        kind = "sliding" if getattr(layer, "is_sliding", False) else "global"
        out["kinds"].add(f"{type(layer).__name__}")
        for t in (layer.keys, layer.values):
            out[kind] += tensor_bytes(t)
            out["tokens"].add((kind, t.shape[-2]))
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                out["storage"] += s.nbytes()
    return out


def bench_cache(args, config, ours, theirs) -> None:
    length = args.prompt + args.new
    batch = 1
    print(f"\n== 2. KV cache bytes at {length} tokens (prompt {args.prompt} + {args.new} new), batch {batch}, "
          f"float32 ==")
    ids = torch.randint(1, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        cache = HybridCache(config, batch, dtype=ours.dtype, device=ours.device, max_length=length)  # as generate
        ours(ids, positions=torch.arange(length).expand(batch, length), cache=cache)  # the global buffers grow here
        mm = {"global": 0, "sliding": 0}
        for i, layer in enumerate(cache.layers):
            mm["sliding" if config.is_sliding(i) else "global"] += layer.nbytes()
        assert cache.nbytes() == mm["global"] + mm["sliding"]
        hf = theirs_cache_bytes(theirs(ids, use_cache=True).past_key_values)
        gen = theirs.generate(input_ids=ids[:, :args.prompt], attention_mask=torch.ones(batch, args.prompt, dtype=torch.long),
                              do_sample=False, max_new_tokens=args.new, eos_token_id=None, pad_token_id=PAD,
                              return_dict_in_generate=True)
        hf_gen = theirs_cache_bytes(gen.past_key_values)
    formula_total = config.kv_cache_bytes(length, "float32", "hybrid", batch=batch)
    formula = {"global": 0, "sliding": 0}  # the formula's sum, split by layer kind
    for i in range(config.num_hidden_layers):
        g = config.attention(i)
        tokens = min(length, g.window) if g.window is not None else length
        formula["sliding" if g.window is not None else "global"] += (
            batch * tokens * g.num_kv_heads * (g.head_dim + g.v_head_dim) * 4)
    assert formula["global"] + formula["sliding"] == formula_total

    def row(name, glob, slid, total=None, note=""):
        total = glob + slid if total is None else total
        g = f"{glob:>12,d}" if glob is not None else f"{'':>12s}"
        s = f"{slid:>12,d}" if slid is not None else f"{'':>12s}"
        print(f"{name:46s} {g} {s} {total:>12,d} {total / formula_total:9.2f}x  {note}")

    print(f"{'':46s} {'global B':>12s} {'sliding B':>12s} {'total B':>12s} {'/ formula':>10s}")
    row("formula  MiMoConfig.kv_cache_bytes (hybrid)", formula["global"], formula["sliding"])
    row("minimimo HybridCache.nbytes()", mm["global"], mm["sliding"],
        note=f"ring {config.sliding_window_size} slots, global preallocated to {length}")
    hf_tokens = ", ".join(f"{k} {v}" for k, v in sorted(hf["tokens"]))
    row("transformers past_key_values: k/v tensors", hf["global"], hf["sliding"],
        note=f"tokens kept: {hf_tokens}; {', '.join(sorted(hf['kinds']))}")
    row("transformers past_key_values: storage held", None, None, hf["storage"],
        note="the sliding k/v are slices of the full-length tensors of the prompt forward")
    gen_tokens = ", ".join(f"{k} {v}" for k, v in sorted(hf_gen["tokens"]))
    row("transformers after generate(): k/v tensors", hf_gen["global"], hf_gen["sliding"],
        note=f"tokens kept: {gen_tokens} (the last new token is never fed back)")
    row("transformers after generate(): storage held", None, None, hf_gen["storage"])
    mm_total = mm["global"] + mm["sliding"]
    print(f"ratios: minimimo / formula = {mm_total / formula_total:.3f}, transformers tensors / minimimo = "
          f"{(hf['global'] + hf['sliding']) / mm_total:.3f}, transformers storage / minimimo = "
          f"{hf['storage'] / mm_total:.3f} (after prefill), {hf_gen['storage'] / mm_total:.3f} (after generate)")
    for layout in ("all-global", "no-window"):
        b = config.kv_cache_bytes(length, "float32", layout, batch=batch)
        print(f"  for comparison, formula {layout:10s}: {b:>12,d} B = {b / formula_total:.2f}x hybrid")

    flash = MiMoConfig.flash()
    lengths = (4096, 32768, 131072, 262144)
    print("\nMiMo-V2-Flash, formula (MiMoConfig.flash().kv_cache_bytes), bf16, one sequence:")
    print(f"{'layout':11s}" + "".join(f"{f'{n // 1024}K tokens':>22s}" for n in lengths))
    hybrid = {n: flash.kv_cache_bytes(n, "bfloat16", "hybrid") for n in lengths}
    for layout in ("hybrid", "all-global", "no-window"):
        cells = []
        for n in lengths:
            b = flash.kv_cache_bytes(n, "bfloat16", layout)
            cells.append(f"{gib(b)} ({b / hybrid[n]:4.1f}x)")
        print(f"{layout:11s}" + "".join(f"{c:>22s}" for c in cells))


def gib(b: int) -> str:
    return f"{b / 2**30:7.2f} GiB" if b >= 2**30 else f"{b / 2**20:7.1f} MiB"


# ------------------------------------------------------------------------------------------- profile


def profile_decode(args, config, ours) -> None:
    """torch.profiler and cProfile over minimimo decode steps (no prefill)."""
    from torch.profiler import ProfilerActivity, profile

    steps = 32
    for batch in args.batches:
        ids, mask = prompts(batch, args.prompt, config.vocab_size, seed=batch)

        def decode():
            tokens = minimimo.stream(ours, ids, steps + 1, attention_mask=mask)
            next(tokens)  # prefill happens here, before the clock of the caller starts
            return tokens

        with torch.inference_mode():
            tokens = decode()
            t0 = time.perf_counter()
            for _ in tokens:
                pass
            step = (time.perf_counter() - t0) / steps
            tokens = decode()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in tokens:
                    pass
            tokens = decode()
            pr = cProfile.Profile()
            pr.enable()
            for _ in tokens:
                pass
            pr.disable()
        print(f"\n== profile: minimimo decode, batch {batch}, {steps} steps, {step * 1e3:.2f} ms/step unprofiled ==")
        aten = [e for e in prof.events() if e.name.startswith("aten::")]
        from_python = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
        matmuls = [e for e in aten if e.name in ("aten::mm", "aten::addmm", "aten::bmm")]
        in_grouped = [e for e in matmuls if e.cpu_parent is not None and e.cpu_parent.name == "aten::_grouped_mm"]
        print(f"per step: {len(aten) / steps:.0f} aten ops ({len(from_python) / steps:.0f} issued from Python), "
              f"{len(matmuls) / steps:.0f} matmuls ({len(in_grouped) / steps:.0f} of them inside _grouped_mm, "
              f"which on a CPU runs one mm per expert, empty ones included)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(args.profile_rows)
        print("\n".join(line for line in s.getvalue().splitlines() if line.strip()))


# ------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: prompt 16, 16 new tokens, 2 rounds (< 40 s)")
    p.add_argument("--prompt", type=int, default=None, help="prompt length (default 64, quick 16)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 128, quick 16)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="also time generate(..., compile=True), with its compile time (about a minute per batch size)")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-cache", action="store_true")
    p.add_argument("--profile", action="store_true", help="profile minimimo decode steps afterwards")
    p.add_argument("--profile-rows", type=int, default=20)
    args = p.parse_args(argv)
    args.prompt = args.prompt or (16 if args.quick else 64)
    args.new = args.new or (16 if args.quick else 128)
    assert args.new >= 2, "--new must be >= 2 (decode = tokens after the first)"
    args.min_rounds = 2 if args.quick else 3
    args.max_rounds = 2 if args.quick else 9
    args.budget = 0.0 if args.quick else 40.0  # seconds of timed rounds per batch size (past min_rounds)

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    start = time.perf_counter()
    header(args, 'timings are inflated and noisy. Compare the ratios (paired ones most), not the absolute figures.')
    config = MiMoConfig.tiny(**SMALL)
    check_official_rules(config)
    counts = config.parameter_counts()
    glob = [i for i in range(config.num_hidden_layers) if not config.is_sliding(i)]
    print(f"config: {config.num_hidden_layers} layers (global at {glob}, window {config.sliding_window_size}), "
          f"hidden {config.hidden_size}, heads {config.num_attention_heads} (kv {config.num_key_value_heads} global / "
          f"{config.swa_num_key_value_heads} swa), head_dim {config.head_dim}/v {config.v_head_dim}, "
          f"{config.n_routed_experts} experts top-{config.num_experts_per_tok} (moe_intermediate "
          f"{config.moe_intermediate_size}), dense intermediate {config.intermediate_size}, vocab {config.vocab_size}; "
          f"{human(counts['total'])} params, {human(counts['active'])} active")
    ours, theirs = build_models(config)
    print(f"transformers: {type(theirs).__name__}, attn_implementation={theirs.config._attn_implementation!r}, "
          f"experts implementation (its default) = {getattr(theirs.config, '_experts_implementation', None)!r}, "
          f"sliding_window={theirs.config.sliding_window} (keys kept: {theirs.config.sliding_window - 1})")
    if not args.skip_decode:
        bench_decode(args, config, ours, theirs)
    if not args.skip_cache:
        bench_cache(args, config, ours, theirs)
    if args.profile:
        profile_decode(args, config, ours)
    print(f"\ntotal {time.perf_counter() - start:.1f} s | {load_average()}")


if __name__ == "__main__":
    main()
