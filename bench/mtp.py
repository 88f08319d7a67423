"""MTP speculative decoding on the bundled trained model: acceptance length and decode speed-up.

    python bench/mtp.py            # full run (a few minutes on 2 cores)
    python bench/mtp.py --quick    # smoke run
    python bench/mtp.py --cycle    # only what one cycle costs, in plain decode steps, by part,
                                   # and what a main forward of 1 .. 4 tokens costs (the verify)
    python bench/mtp.py --cpu-time # CPU seconds instead of wall clock (on a busy, shared machine)
    python bench/mtp.py --device cuda   # on a GPU (bench/gpu_check.py runs this)

For k = 1, 2, 3 drafted tokens per cycle, on held-out Python (`bench/heldout_code.py`, ordinary
code written for this repository; the model was trained on the interpreter's standard library),
greedy, batch 1:
  * mean acceptance length (tokens produced per main-model forward; k + 1 at most),
  * decode tokens/s of plain decoding and of speculative decoding, measured interleaved in one
    run, and their ratio (the wall-clock speed-up),
  * what a cycle costs in plain decode steps (prefill subtracted from both: the decode-only
    speed-up is about the acceptance length / the cycle cost),
  * the same token ids as plain greedy (asserted),
  * what one draft-verify cycle costs in plain decode steps, split into its parts (`--cycle`):
    the MTP drafts, the (k+1)-token verify forward, and the bookkeeping around them (accept,
    commit, roll back, the loop). A cycle that costs c plain steps and yields L tokens on average
    is a speed-up of about L / c. With it, a main forward of t = 1 .. 4 tokens (the verify of a
    k = t - 1 cycle) in one-token forwards, and the distinct experts each MoE layer runs for them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's minimimo, installed or not

import minimimo  # noqa: E402
import minimimo.speculative as speculative  # noqa: E402
from minimimo.model import prefill  # noqa: E402
from minimimo.speculative import SpeculativeStats  # noqa: E402

CLOCK = {"clock": time.perf_counter, "sync": lambda: None}  # --cpu-time: time.process_time, steadier on a
# shared machine; on CUDA, sync waits for the GPU's queued work before the clock is read


def held_out_prompts(tokenizer, n_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """Prompts cut at evenly spaced places of bench/heldout_code.py (written here, never trained on)."""
    ids = tokenizer.encode((REPO / "bench" / "heldout_code.py").read_text())
    usable = len(ids) - prompt_tokens - 64
    starts = [usable * i // max(1, n_prompts - 1) for i in range(n_prompts)]
    return [ids[s:s + prompt_tokens] for s in starts]


def timed(fn):
    clock, sync = CLOCK["clock"], CLOCK["sync"]
    sync()
    start = clock()
    out = fn()
    sync()
    return out, clock() - start


class PartTimer:
    """Wraps the parts of `speculative.py`'s loop with wall-clock timers while it is entered."""

    PARTS = ("draft", "verify", "accept_greedy", "commit", "roll_back")

    def __init__(self):
        self.seconds = dict.fromkeys(self.PARTS, 0.0)

    def __enter__(self):
        self.saved = {name: getattr(speculative, name) for name in self.PARTS}
        for name, fn in self.saved.items():
            setattr(speculative, name, self.timed(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(speculative, name, fn)

    def timed(self, name, fn):
        def wrapper(*args, **kwargs):
            out, seconds = timed(lambda: fn(*args, **kwargs))
            self.seconds[name] += seconds
            return out
        return wrapper


def cycle_costs(model, prompts, new_tokens: int, rounds: int) -> None:
    """Per k: what a cycle costs in plain decode steps, in all and by part (prefill subtracted)."""
    gen = minimimo.generate
    plain_step_s, decode_s, n_cycles = [], dict.fromkeys(range(1, 4), 0.0), dict.fromkeys(range(1, 4), 0)
    n_tokens = dict.fromkeys(range(1, 4), 0)
    parts = {k: PartTimer() for k in range(1, 4)}
    for _ in range(rounds):
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen(model, ids, 4)  # warm-up
            _, prefill_s = timed(lambda: gen(model, ids, 1))  # the prompt and the first token, no decode step
            _, plain_s = timed(lambda: gen(model, ids, new_tokens))
            plain_step_s.append((plain_s - prefill_s) / (new_tokens - 1))
            for k in range(1, 4):
                with parts[k]:
                    (_, st), spec_s = timed(lambda: gen(model, ids, new_tokens, mtp_steps=k, return_stats=True))
                decode_s[k] += spec_s - prefill_s
                n_cycles[k] += len(st.accept_lengths)  # batch 1: one entry per cycle
                n_tokens[k] += sum(st.accept_lengths)
    step = statistics.mean(plain_step_s)
    print(f"\nplain decode step: {1e3 * step:.2f} ms (mean of {len(plain_step_s)} runs, prefill subtracted)")
    print("one cycle, in plain decode steps:")
    print(f"{'k':>3} {'cycle':>7} {'draft':>7} {'verify':>7} {'accept':>7} {'commit':>7} {'rollback':>8} {'rest':>7}"
          f" {'tokens':>7} {'bound':>7}")
    for k in range(1, 4):
        cycle = decode_s[k] / n_cycles[k] / step
        by_part = [parts[k].seconds[name] / n_cycles[k] / step for name in PartTimer.PARTS]
        tokens = n_tokens[k] / n_cycles[k]
        print(f"{k:>3} {cycle:>7.2f} " + " ".join(f"{x:>7.2f}" for x in by_part[:4])
              + f" {by_part[4]:>8.2f} {cycle - sum(by_part):>7.2f} {tokens:>7.2f} {tokens / sum(by_part[:2]):>6.2f}x")
    print("(draft: the k MTP blocks, one pass each; rest: the loop itself, the stats, the output;\n"
          " tokens: per cycle (the acceptance length); bound: tokens / (draft + verify), the speed-up over\n"
          " plain decoding if accepting, committing, rolling back and the loop cost nothing)")
    forward_costs(model, prompts, rounds)


def forward_costs(model, prompts, rounds: int, widest: int = 4) -> None:
    """Why the verify costs more than a plain step: a main forward of t = 1 .. `widest` tokens
    after each prompt (its greedy continuation, so the routing is the real one), in one-token
    forwards, and the distinct experts each MoE layer runs for those t tokens. A k-draft cycle's
    verify is t = k + 1; the speed-up is at most the acceptance length / (verify + drafts)."""
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    seconds = {t: [] for t in range(1, widest + 1)}
    experts = {t: [] for t in range(1, widest + 1)}
    for prompt in prompts:
        ids = minimimo.generate(model, torch.tensor([prompt]), widest)
        start = len(prompt)
        cache = minimimo.HybridCache(model.config, 1, dtype=model.dtype, device=model.layer_devices(),
                                     max_length=start + widest, reserve=widest - 1)
        prefill(model, ids[:, :start], cache)
        keep = torch.tensor([start], device=ids.device)

        def forward(t):
            positions = torch.arange(start, start + t, device=ids.device)[None]
            model.logits(model.trunk(ids[:, start:start + t], positions=positions, cache=cache)[-1])
            cache.truncate(keep)

        with torch.no_grad():
            for t in seconds:  # distinct experts per MoE layer (hooks off while timing)
                counted = []
                hooks = [r.register_forward_hook(lambda m, a, out: counted.append(out[1].unique().numel()))
                         for r in routers]
                forward(t)
                for hook in hooks:
                    hook.remove()
                experts[t].append(statistics.mean(counted))
            for _ in range(rounds):
                for t in seconds:  # interleaved, one-token forward first
                    forward(t)  # warm
                    runs = [timed(lambda: forward(t))[1] for _ in range(10)]
                    seconds[t].append(statistics.median(runs))
    one = statistics.mean(seconds[1])
    print(f"\nmain forward of t tokens after the prompt (t = k + 1 is a verify), {len(prompts)} prompts:")
    print(f"{'t':>3} {'ms':>7} {'1-token forwards':>17} {'experts run per MoE layer':>26}")
    for t in seconds:
        print(f"{t:>3} {1e3 * statistics.mean(seconds[t]):>7.2f} {statistics.mean(seconds[t]) / one:>17.2f} "
              f"{statistics.mean(experts[t]):>26.2f}")
    print(f"({model.config.n_routed_experts} experts, top-{model.config.num_experts_per_tok}: each later token "
          "brings experts no earlier token chose, and each expert is its own read of three matrices\n"
          " and its own products)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled trained one)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1, ...)")
    p.add_argument("--cycle", action="store_true", help="only the cost of one cycle, in plain steps, by part")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with this process's CPU seconds instead of the wall clock (a busy, shared machine)")
    args = p.parse_args(argv)
    if args.cpu_time:
        CLOCK["clock"] = time.process_time
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"bench/mtp.py: --device {args.device}, but torch sees no CUDA device (torch.cuda.is_available() is False)")
        return 2
    directory = Path(args.model) if args.model else minimimo.default_checkpoint()
    model = minimimo.load(directory, dtype=torch.float32, device=args.device, progress=False)
    if model.device.type == "cuda":
        CLOCK["sync"] = torch.cuda.synchronize
    tokenizer = minimimo.Tokenizer.from_pretrained(directory)
    n_prompts, new_tokens, rounds = (2, 48, 1) if args.quick else (6, args.new_tokens or 128, 3)
    prompts = held_out_prompts(tokenizer, n_prompts, 96)
    print(f"minimimo {minimimo.__version__} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"device {model.device} | "
          f"checkpoint {directory.name} | {model.config.num_mtp_layers} MTP blocks")
    print(f"{len(prompts)} held-out prompts of 96 tokens (bench/heldout_code.py), {new_tokens} new tokens, greedy, "
          f"batch 1, {rounds} interleaved rounds")
    if args.cycle:
        cycle_costs(model, prompts, new_tokens, rounds)
        return 0

    times = {k: [] for k in range(4)}
    stats = {k: SpeculativeStats(k) for k in range(1, 4)}
    cycle_steps = {k: [] for k in range(1, 4)}  # per run: decode time per cycle / decode time per plain step
    for _ in range(rounds):
        for prompt in prompts:
            ids = torch.tensor([prompt])
            minimimo.generate(model, ids, 4)  # warm-up
            _, prefill_s = timed(lambda: minimimo.generate(model, ids, 1))  # the prompt and the first token
            plain, dt = timed(lambda: minimimo.generate(model, ids, new_tokens))
            times[0].append(dt)
            step_s = (dt - prefill_s) / (new_tokens - 1)
            for k in range(1, 4):
                (spec, st), dt = timed(lambda: minimimo.generate(model, ids, new_tokens, mtp_steps=k,
                                                                 return_stats=True))
                assert torch.equal(spec, plain), f"k={k}: speculative output differs from plain greedy"
                times[k].append(dt)
                stats[k].accept_lengths += st.accept_lengths
                cycle_steps[k].append((dt - prefill_s) / len(st.accept_lengths) / step_s)

    base = statistics.median(times[0])
    print(f"\n{'k':>3} {'accept len':>11} {'histogram (1..k+1)':>24} {'median s':>9} {'tokens/s':>9} {'speed-up':>9}"
          f" {'cycle':>6}")
    print(f"{0:>3} {1.0:>11.2f} {'-':>24} {base:>9.3f} {new_tokens / base:>9.1f} {1.0:>8.2f}x {1.0:>6.2f}")
    for k in range(1, 4):
        t = statistics.median(times[k])
        hist = " ".join(str(c) for c in stats[k].histogram().values())
        print(f"{k:>3} {stats[k].mean_accept_length:>11.2f} {hist:>24} {t:>9.3f} {new_tokens / t:>9.1f} "
              f"{base / t:>8.2f}x {statistics.median(cycle_steps[k]):>6.2f}")
    print("(times and speed-up include the prefill of the 96-token prompt; cycle: median decode time per cycle\n"
          " in plain decode steps, prefill subtracted, split by part with --cycle; every speculative output\n"
          " equals plain greedy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
