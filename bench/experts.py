"""The expert dispatch and FP8 dequantization, each measured beside the way it was done before.

    python bench/experts.py            # about a minute on 2 busy cores
    python bench/experts.py --quick    # smoke run

1. MoE dispatch paths (float32, CPU). `Experts.weighted_sum` runs torch's `grouped_mm` only when
   the (token, expert) pairs are at least as many as the experts, and otherwise loops over the
   experts that received tokens. Timed side by side on the same routed tokens, as the model runs
   them (the few-pairs path up to 64 pairs): "before" (the previous rule: grouped_mm once a
   quarter of the experts received tokens; its CPU kernel runs a matmul for every expert, empty
   or not), "now" (the rule above) and "loop" (the readable reference, always), on a layer of the
   bundled default's shape, the medium benchmark model's and a Flash-like router. Same outputs
   asserted.
2. FP8 dequantization. `apply_scales` scales each [row, column block] by its one scale; before,
   it gathered a full [rows, cols] scale element by element. `FP8Linear` (a 2048 x 2048 weight,
   one strip of 1024 rows at a time) and `FP8Experts` (16 experts of 512 x 256, top-2) forwards
   timed with each, on 1 and 8 tokens, float32 and bfloat16 activations; with --flash-experts
   also one token through 8 experts of Flash's size (hidden 4096, 2048), as the real-dimension
   slice decodes. Outputs asserted equal, bit for bit.

One torch thread by default (`--threads 0`: torch's default). Timings are minima of interleaved
rounds (A B A B ...), so a slow patch of a busy machine hits both alike. Ratios > 1: now is faster.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import MEDIUM, fmt_ms, load_average, timed  # noqa: E402
from forward import FLASH_ROUTER, random_moe  # noqa: E402
from minimimo import MiMoConfig, fp8  # noqa: E402
from minimimo.moe import Experts  # noqa: E402


def race(fns: dict, *, budget_s: float, min_reps: int) -> dict:
    """Minimum seconds of each function over interleaved rounds (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    start, reps = time.perf_counter(), 0
    while reps < min_reps or time.perf_counter() - start < budget_s:
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn))
        reps += 1
    return best


# ------------------------------------------------------------------------------------------- 1. dispatch


def quarter_rule(experts: Experts, active_experts: int):
    """The previous rule: grouped_mm once a quarter of the experts received tokens."""
    num_experts = experts.gate_proj.shape[0]

    def ok(x: torch.Tensor, pairs: int) -> bool:  # the dtype and device checks of now, then the old count
        return Experts.grouped_mm_ok(experts, x, num_experts) and 4 * active_experts >= num_experts
    return ok


def dispatch(experts: Experts, rule: str, active_experts: int):
    """The stack's forward under `rule`: "before" (the quarter rule), "now" or "loop" (the reference).
    The few-pairs path is on, as in the model: decoding runs it."""
    def run(x, gate_weights, expert_ids):
        experts.__dict__.pop("grouped_mm_ok", None)  # the class's rule...
        if rule == "before":  # ...or the previous one, for this call
            experts.grouped_mm_ok = quarter_rule(experts, active_experts)
        experts.use_grouped_mm = rule != "loop"
        return experts(x, gate_weights, expert_ids)
    return run


BUNDLED_MOE = dict(hidden_size=128, moe_intermediate_size=192, n_routed_experts=8, num_experts_per_tok=2)


def bench_dispatch(args) -> None:
    print("\n== 1. MoE dispatch: grouped_mm from a quarter of the experts busy (before) vs from as many "
          "(token, expert) pairs as experts (now) ==")
    print(f"{'layer':42s} {'tokens':>6s} {'active':>6s} {'before ms':>9s} {'now ms':>9s} {'loop ms':>9s} "
          f"{'before/now':>10s}")
    for label, overrides, seed in (("bundled default (8 experts, top-2, m=192)", BUNDLED_MOE, 1),
                                   ("medium (16 experts, top-2, m=256)", MEDIUM, 2),
                                   ("flash-like (256 experts, top-8)", FLASH_ROUTER, 3)):
        config = MiMoConfig.tiny(**overrides)
        moe = random_moe(config, seed)
        for n in args.tokens:
            x = torch.randn(n, config.hidden_size, generator=torch.Generator().manual_seed(n))
            with torch.inference_mode():
                gate_weights, expert_ids = moe.gate(x)
                active = int(expert_ids.unique().numel())
                paths = {rule: functools.partial(dispatch(moe.experts, rule, active), x, gate_weights, expert_ids)
                         for rule in ("before", "now", "loop")}
                outs = {rule: fn() for rule, fn in paths.items()}
                for rule in ("before", "now"):
                    torch.testing.assert_close(outs[rule], outs["loop"], atol=1e-5, rtol=1e-5)
                t = race(paths, budget_s=args.budget, min_reps=args.min_reps)
            print(f"{label:42s} {n:6d} {active:6d} {fmt_ms(t['before'])} {fmt_ms(t['now'])} {fmt_ms(t['loop'])} "
                  f"{t['before'] / t['now']:9.2f}x")
        moe.experts.__dict__.pop("grouped_mm_ok", None)


# ------------------------------------------------------------------------------------------- 2. FP8


def scales_gathered_elementwise(fp8_weight, scale_inv, row_block, col_block_size, dtype=torch.float32, first_col=0):
    """apply_scales before: a full [rows, cols] scale gathered element by element."""
    cols = torch.arange(first_col, first_col + fp8_weight.shape[1], device=scale_inv.device)
    col_block = cols // col_block_size - first_col // col_block_size
    scale = scale_inv[row_block.to(scale_inv.device)][:, col_block]  # [rows, cols]
    return (fp8_weight.float() * scale).to(dtype)


def fp8_linear(rows: int, cols: int, block=(128, 128)) -> fp8.FP8Linear:
    weight, scale = fp8.quantize(torch.randn(rows, cols) / cols ** 0.5, block)
    linear = fp8.FP8Linear(cols, rows, scale.shape, block)
    linear.weight.copy_(weight)
    linear.weight_scale_inv.copy_(scale)
    linear.weight_row_block.copy_(fp8.uniform_rows(rows, block[0]))
    return linear


def fp8_experts(num_experts: int, hidden: int, inter: int, block=(128, 128)) -> fp8.FP8Experts:
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    stack = fp8.FP8Experts(num_experts, hidden, inter, {k: fp8.scale_shape(s, block) for k, s in shapes.items()}, block)
    for name, shape in shapes.items():
        for e in range(num_experts):
            weight, scale = fp8.quantize(torch.randn(shape) / shape[1] ** 0.5, block)
            getattr(stack, name)[e], getattr(stack, name + "_scale_inv")[e] = weight, scale
        getattr(stack, name + fp8.ROW_BLOCK_SUFFIX).copy_(fp8.uniform_rows(shape[0], block[0]))
    return stack


def with_gathered_scales(run):
    """`run` with apply_scales as it was before (what FP8Linear and FP8Experts call)."""
    def before():
        fp8.apply_scales, now = scales_gathered_elementwise, fp8.apply_scales
        try:
            return run()
        finally:
            fp8.apply_scales = now
    return before


def bench_fp8(args) -> None:
    print("\n== 2. FP8 kept on the device: scale gathered per element (before) vs per block (now) ==")
    print(f"{'module':38s} {'dtype':>8s} {'tokens':>6s} {'before ms':>9s} {'now ms':>9s} {'before/now':>10s}")
    linear, experts = fp8_linear(2048, 2048), fp8_experts(16, 512, 256)
    gen = torch.Generator().manual_seed(0)
    if args.flash_experts:  # one decode token through 8 experts of Flash's size: 24 matrices of 2048 x 4096
        flash, token = fp8_experts(8, 4096, 2048), torch.randn(1, 4096, generator=gen).to(torch.bfloat16)
        top8 = torch.arange(8)[None]
        run = lambda: flash(token, torch.full((1, 8), 1 / 8), top8)  # noqa: E731
        before = with_gathered_scales(run)
        with torch.inference_mode():
            assert torch.equal(before(), run()), "Flash-sized experts: outputs differ"
            t = race({"before": before, "now": run}, budget_s=args.budget, min_reps=args.min_reps)
        print(f"{'FP8Experts 8 x (4096 x 2048) (Flash)':38s} {'bfloat16':>8s} {1:6d} {fmt_ms(t['before'])} "
              f"{fmt_ms(t['now'])} {t['before'] / t['now']:9.2f}x")
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 8):
            x = torch.randn(n, 2048, generator=gen).to(dtype)
            tokens = torch.randn(n, 512, generator=gen).to(dtype)
            gate_weights = torch.rand(n, 2, generator=gen)
            expert_ids = torch.stack([torch.arange(n) % 16, (torch.arange(n) * 5 + 3) % 16], dim=1)
            cases = (("FP8Linear 2048 x 2048", lambda: linear(x)),
                     ("FP8Experts 16 x (512 x 256), top-2", lambda: experts(tokens, gate_weights, expert_ids)))
            for label, run in cases:
                before = with_gathered_scales(run)
                with torch.inference_mode():
                    assert torch.equal(before(), run()), f"{label}: outputs differ"
                    t = race({"before": before, "now": run}, budget_s=args.budget, min_reps=args.min_reps)
                print(f"{label:42s} {str(dtype).removeprefix('torch.'):>8s} {n:6d} {fmt_ms(t['before'])} "
                      f"{fmt_ms(t['now'])} {t['before'] / t['now']:9.2f}x")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer rounds and token counts")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--skip-dispatch", action="store_true")
    p.add_argument("--skip-fp8", action="store_true")
    p.add_argument("--flash-experts", action="store_true",
                   help="also 8 FP8 experts of Flash's size on one token (600 MB of FP8, slow)")
    args = p.parse_args(argv)
    args.tokens = (1, 4, 8, 128) if args.quick else (1, 2, 4, 8, 32, 512)
    args.budget, args.min_reps = (0.2, 3) if args.quick else (1.5, 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | {load_average()}")
    if not args.skip_dispatch:
        bench_dispatch(args)
    if not args.skip_fp8:
        bench_fp8(args)
    print(f"\n{load_average()}")


if __name__ == "__main__":
    main()
