"""MTP speculative decoding on the bundled trained model: acceptance length and decode speed-up.

    python bench/mtp.py            # full run (a few minutes on 2 cores)
    python bench/mtp.py --quick    # smoke run

For k = 1, 2, 3 drafted tokens per cycle, on held-out Python (`bench/heldout_code.py`, ordinary
code written for this repository; the model was trained on the interpreter's standard library),
greedy, batch 1:
  * mean acceptance length (tokens produced per main-model forward; k + 1 at most),
  * decode tokens/s of plain decoding and of speculative decoding, measured interleaved in one
    run, and their ratio (the wall-clock speed-up),
  * the same token ids as plain greedy (asserted).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import minimimo
from minimimo.speculative import SpeculativeStats

REPO = Path(__file__).resolve().parents[1]


def held_out_prompts(tokenizer, n_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """Prompts cut at evenly spaced places of bench/heldout_code.py (written here, never trained on)."""
    ids = tokenizer.encode((REPO / "bench" / "heldout_code.py").read_text())
    usable = len(ids) - prompt_tokens - 64
    starts = [usable * i // max(1, n_prompts - 1) for i in range(n_prompts)]
    return [ids[s:s + prompt_tokens] for s in starts]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled trained one)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    directory = Path(args.model) if args.model else minimimo.default_checkpoint()
    model = minimimo.load(directory, dtype=torch.float32, progress=False)
    tokenizer = minimimo.Tokenizer.from_pretrained(directory)
    n_prompts, new_tokens, rounds = (2, 48, 1) if args.quick else (6, args.new_tokens or 128, 3)
    prompts = held_out_prompts(tokenizer, n_prompts, 96)
    print(f"minimimo {minimimo.__version__} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"checkpoint {directory.name} | {model.config.num_mtp_layers} MTP blocks")
    print(f"{len(prompts)} held-out prompts of 96 tokens (bench/heldout_code.py), {new_tokens} new tokens, greedy, "
          f"batch 1, {rounds} interleaved rounds")

    times = {k: [] for k in range(4)}
    stats = {k: SpeculativeStats(k) for k in range(1, 4)}
    for _ in range(rounds):
        for prompt in prompts:
            ids = torch.tensor([prompt])
            minimimo.generate(model, ids, 4)  # warm-up
            plain, dt = timed(lambda: minimimo.generate(model, ids, new_tokens))
            times[0].append(dt)
            for k in range(1, 4):
                (spec, st), dt = timed(lambda: minimimo.generate(model, ids, new_tokens, mtp_steps=k,
                                                                 return_stats=True))
                assert torch.equal(spec, plain), f"k={k}: speculative output differs from plain greedy"
                times[k].append(dt)
                stats[k].accept_lengths += st.accept_lengths

    base = statistics.median(times[0])
    print(f"\n{'k':>3} {'accept len':>11} {'histogram (1..k+1)':>24} {'median s':>9} {'tokens/s':>9} {'speed-up':>9}")
    print(f"{0:>3} {1.0:>11.2f} {'-':>24} {base:>9.3f} {new_tokens / base:>9.1f} {1.0:>8.2f}x")
    for k in range(1, 4):
        t = statistics.median(times[k])
        hist = " ".join(str(c) for c in stats[k].histogram().values())
        print(f"{k:>3} {stats[k].mean_accept_length:>11.2f} {hist:>24} {t:>9.3f} {new_tokens / t:>9.1f} "
              f"{base / t:>8.2f}x")
    print("(times include the prefill of the 96-token prompt; every speculative output equals plain greedy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
