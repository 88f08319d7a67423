"""CPU forward benchmarks: minimimo against the official transformers implementation, and the MoE dispatch.

    python bench/forward.py            # full run (about 1-2 minutes on 2 cores)
    python bench/forward.py --quick    # smoke run (< 30 s)

1. Prefill. A medium random model (hidden 512, 8 layers with Flash's layer rule, 16 experts) is
   written with `save_checkpoint` (float32) and loaded twice: `minimimo.load` and transformers
   `AutoModelForCausalLM.from_pretrained(..., attn_implementation="eager")` with its default
   experts implementation. Both must give the same logits on the prompt (asserted), then a
   batch-1 prefill is timed, the two models interleaved (A B A B ...), median of each.
2. MoE dispatch. One MoE layer (the medium config's, and a Flash-shaped router: 256 experts,
   top-8): minimimo's sorted dispatch (`minimimo.moe.MoE`) against a naive loop that visits every
   expert. Same outputs asserted, ratio printed.

Everything runs in float32 under `torch.inference_mode()` with torch's default thread count.
Ratios > 1 mean minimimo is faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import minimimo  # noqa: E402
from common import MEDIUM, check_official_rules, official_and_ours, fmt_ms, header, load_average, timed  # noqa: E402
from minimimo import MiMoConfig  # noqa: E402
from minimimo.moe import MoE  # noqa: E402

# ------------------------------------------------------------------------------------------- configs

# A Flash-shaped router (256 experts, top-8) with a narrow hidden size, for the dispatch benchmark.
FLASH_ROUTER = dict(hidden_size=512, n_routed_experts=256, num_experts_per_tok=8, moe_intermediate_size=128)


# ------------------------------------------------------------------------------------------- timing


def race(fns: dict, *, warmup: int, budget_s: float, min_reps: int = 5, max_reps: int = 2000) -> dict:
    """Median (key `name`) and minimum (`name_min`) seconds of each function, called interleaved
    (A B A B ...) after `warmup` calls each, so that a slow patch of the machine hits both alike.

    Rounds continue until `budget_s` seconds have passed (at least `min_reps`, at most `max_reps`).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    start, reps = time.perf_counter(), 0
    while reps < min_reps or (reps < max_reps and time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            samples[name].append(timed(fn))
        reps += 1
    out = {name: statistics.median(s) for name, s in samples.items()}
    return out | {f"{name}_min": min(s) for name, s in samples.items()} | {"_reps": reps}


# ------------------------------------------------------------------------------------------- naive MoE


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The textbook dispatch: for EVERY expert, find the (token, slot) pairs routed to it, run the
    expert on those tokens, accumulate the weighted result. Same router as minimimo's MoE."""
    b = x.shape[0]
    tokens = x.reshape(-1, x.shape[-1])
    gate_weights, expert_ids = moe.gate(tokens)  # [n, k] float32, [n, k]
    out = torch.zeros(tokens.shape, dtype=torch.float32)
    for e in range(moe.experts.gate_proj.shape[0]):  # every expert, even those with no token
        token_idx, slot = torch.where(expert_ids == e)
        y = moe.experts.expert(e, tokens[token_idx])
        out.index_add_(0, token_idx, y.float() * gate_weights[token_idx, slot, None])
    return out.to(x.dtype).reshape(b, -1, x.shape[-1])


def random_moe(config: MiMoConfig, seed: int) -> MoE:
    """One MoE layer with minimimo's init_weights distributions (router bias included)."""
    moe = MoE(config).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return moe


# ------------------------------------------------------------------------------------------- main


def bench_prefill(args) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    config = MiMoConfig.tiny(**MEDIUM)
    check_official_rules(config)
    counts = config.parameter_counts()
    print(f"\n== 1. prefill, batch 1, {args.seq} tokens ==")
    global_layers = [i for i in range(config.num_hidden_layers) if not config.is_sliding(i)]
    print(f"config: {config.num_hidden_layers} layers (global at {global_layers}, window {config.sliding_window_size}), "
          f"hidden {config.hidden_size}, heads {config.num_attention_heads} "
          f"(kv {config.num_key_value_heads} global / {config.swa_num_key_value_heads} swa), head_dim {config.head_dim}/"
          f"v {config.v_head_dim}, {config.n_routed_experts} experts top-{config.num_experts_per_tok} "
          f"(moe_intermediate {config.moe_intermediate_size}), vocab {config.vocab_size}; "
          f"{minimimo.config.human(counts['total'])} params, {minimimo.config.human(counts['active'])} active")

    ours, theirs = official_and_ours(config, layout="hub")
    print(f"transformers: {type(theirs).__name__}, attn_implementation={theirs.config._attn_implementation!r}, "
          f"experts implementation (its default) = {theirs.config._experts_implementation!r}")

    ids = torch.randint(config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a = ours(ids)
        b = theirs(ids, use_cache=False).logits
        diff = (a - b).abs().max().item()
    print(f"parity: max |logits diff| = {diff:.2e} (must be < 1e-3)")
    assert diff < 1e-3, f"minimimo and transformers disagree: max abs logits diff {diff}"

    fns = {
        "minimimo": lambda: ours(ids),
        "transformers use_cache=False": lambda: theirs(ids, use_cache=False),
        "transformers (default, builds a cache)": lambda: theirs(ids),
    }
    with torch.inference_mode():
        t = race(fns, warmup=args.warmup, budget_s=args.prefill_budget, min_reps=3, max_reps=args.prefill_reps)
    base = t["minimimo"]
    print(f"{'':40s} {'median ms':>9s} {'min ms':>9s} {'tokens/s':>9s} {'time / minimimo':>15s}   "
          f"({t['_reps']} interleaved rounds)")
    for name in fns:
        print(f"{name:40s} {fmt_ms(t[name])} {fmt_ms(t[name + '_min'])} {args.seq / t[name]:9.0f} "
              f"{t[name] / base:14.2f}x")
    hf = "transformers use_cache=False"
    print(f"ratio transformers/minimimo (use_cache=False): {t[hf] / base:.2f} median, "
          f"{t[hf + '_min'] / t['minimimo_min']:.2f} min  (> 1: minimimo is faster)")


def bench_moe(args) -> None:
    medium = MiMoConfig.tiny(**MEDIUM)
    flash = MiMoConfig.tiny(**FLASH_ROUTER)
    print("\n== 2. MoE dispatch: minimimo sorted dispatch vs naive loop over every expert ==")
    print(f"{'layer':38s} {'tokens':>6s} {'sorted ms':>9s} {'naive ms':>9s} {'naive/sorted':>12s} "
          f"{'(min ratio)':>11s} {'max diff':>9s} {'rounds':>6s}")
    for label, config, seed in (("medium (16 experts, top-2, m=256)", medium, 2),
                                ("flash-like (256 experts, top-8, m=128)", flash, 3)):
        moe = random_moe(config, seed)
        for n in args.moe_tokens:
            x = torch.randn(1, n, config.hidden_size, generator=torch.Generator().manual_seed(n))
            with torch.inference_mode():
                fast, slow = moe(x), naive_moe(moe, x)
                diff = (fast - slow).abs().max().item()
                assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5), f"{label}, {n} tokens: max diff {diff}"
                t = race({"sorted": lambda: moe(x), "naive": lambda: naive_moe(moe, x)},
                         warmup=args.warmup, budget_s=args.moe_budget, min_reps=args.min_reps)
            print(f"{label:38s} {n:6d} {fmt_ms(t['sorted'])} {fmt_ms(t['naive'])} "
                  f"{t['naive'] / t['sorted']:11.2f}x {t['naive_min'] / t['sorted_min']:10.2f}x "
                  f"{diff:9.1e} {t['_reps']:6d}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 128 tokens, few repetitions (< 30 s)")
    p.add_argument("--seq", type=int, default=None, help="prefill length (default 512, quick 128)")
    p.add_argument("--reps", type=int, default=None, dest="prefill_reps",
                   help="at most this many interleaved prefill rounds (default 15, quick 3); fewer (not under 3) "
                        "when the rounds would take more than 60 s (quick 8 s) on a slow or busy machine")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own default, i.e. the cores it sees)")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--skip-moe", action="store_true")
    args = p.parse_args(argv)
    args.seq = args.seq or (128 if args.quick else 512)
    args.prefill_reps = args.prefill_reps or (3 if args.quick else 15)
    args.warmup = 1 if args.quick else 2
    args.prefill_budget = 8.0 if args.quick else 60.0  # seconds of timed prefill rounds
    args.moe_budget = 0.3 if args.quick else 2.0  # seconds of timed rounds per (layer, tokens) case
    args.min_reps = 3 if args.quick else 5
    args.moe_tokens = (1, 16, 128) if args.quick else (1, 16, 512)

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    header(args, 'with several torch threads a descheduled thread stalls every parallel op, so timings (medians most) are inflated and noisy. Compare ratios and minima, or rerun with --threads 1 or on an idle machine.')
    if not args.skip_prefill:
        bench_prefill(args)
    if not args.skip_moe:
        bench_moe(args)
    print(f"\ntotal {time.perf_counter() - start:.1f} s | {load_average()}")


if __name__ == "__main__":
    main()
