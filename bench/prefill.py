"""Long-prompt prefill: time and peak memory, chunked against one pass against transformers.

    python bench/prefill.py                      # T = 1K, 2K, 4K, 8K, 16K (several minutes)
    python bench/prefill.py --quick              # T = 256, 512 (< 1 minute)
    python bench/prefill.py --lengths 8192 --one-pass-max 8192

The benchmark model (bench/common.py's MEDIUM: hidden 512, 8 layers, global at 0 and 5, window
128, 16 experts) is written once with random weights (float32). Each measurement runs in its own
Python process, so that one run's freed memory cannot hide the next run's peak:

    chunked      minimimo.model.prefill(model, ids, cache, chunk=256): the prompt in chunks; a
                 sliding layer scores chunk x (128 + chunk) keys, a global layer chunk x (so far)
    one pass     the same function with chunk = T: every layer scores T x T
    transformers the official model, attn_implementation="eager", one forward with use_cache=True
                 and logits_to_keep=1 (what its `generate` runs for the prompt)

All three compute the LM head on the last position only. Batch 1, float32, torch's default thread
count. "peak MB" is the process's resident memory at its highest during the prefill minus just
before it (sampled every 2 ms: the model's weights and the interpreter are not counted). The one-pass
runs grow as T^2 (about 1.8 GB at 4K); they run up to --one-pass-max (default 4096, so that this
shared machine is not pushed out of memory) and each run stops after --time-limit seconds. Every
run's last-position logits are compared with the chunked run's (max |diff| printed; asserted < 1e-3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import MEDIUM, check_official_rules, header, load_average, write_checkpoint  # noqa: E402
from minimimo import MiMoConfig  # noqa: E402
from minimimo.model import PREFILL_CHUNK  # noqa: E402

IMPLS = ("chunked", "one pass", "transformers")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread while the block runs; .peak = highest - before."""

    def __enter__(self):
        self.before = self.highest = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.highest = max(self.highest, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.highest = max(self.highest, rss_bytes())
        self.peak = self.highest - self.before


def worker(args) -> None:
    """One measurement in this process; prints one JSON line, saves the last logits to args.out."""
    import gc

    if args.threads:
        torch.set_num_threads(args.threads)
    config = MiMoConfig.tiny(**{**MEDIUM, "max_position_embeddings": args.max_positions})
    ids = torch.randint(config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(1))
    if args.worker == "transformers":
        from common import load_transformers

        model = load_transformers(args.checkpoint)

        def run(prompt):
            return model(prompt, use_cache=True, logits_to_keep=1).logits[:, -1]
    else:
        import minimimo
        from minimimo import HybridCache
        from minimimo.model import prefill

        model = minimimo.load(args.checkpoint, dtype=torch.float32, progress=False)
        chunk = args.chunk if args.worker == "chunked" else args.length

        def run(prompt):
            cache = HybridCache(config, 1, dtype=model.dtype, max_length=prompt.shape[1])
            return model.logits(prefill(model, prompt, cache, chunk=min(chunk, prompt.shape[1]))[:, -1])
    with torch.inference_mode():
        run(ids[:, :64])  # warm-up: first-call allocations and lazy imports
        gc.collect()
        with PeakRSS() as memory:
            start = time.perf_counter()
            logits = run(ids)
            seconds = time.perf_counter() - start
    torch.save(logits.clone(), args.out)
    print(json.dumps({"seconds": seconds, "peak": memory.peak}))


def measure(args, impl: str, length: int, checkpoint: str, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", impl, "--length", str(length), "--checkpoint", checkpoint,
               "--out", str(out), "--chunk", str(args.chunk), "--max-positions", str(max(args.lengths)),
               "--threads", str(args.threads or 0)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.time_limit)
    except subprocess.TimeoutExpired:
        return {"stopped": f"> {args.time_limit:.0f} s (stopped)"}
    if done.returncode != 0:
        raise RuntimeError(f"{impl} at T={length} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["logits"] = torch.load(out)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T = 256 and 512 only")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths (default 1K..16K)")
    p.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help=f"prefill chunk (default {PREFILL_CHUNK})")
    p.add_argument("--one-pass-max", type=int, default=4096,
                   help="longest T for the one-pass and transformers runs, whose memory grows as T^2 (default 4096)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds before a run is stopped (default 300)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--max-positions", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    args.lengths = args.lengths or ([256, 512] if args.quick else [1024, 2048, 4096, 8192, 16384])
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    header(args, "other processes share the cores: times are inflated, ratios within one T are what to compare.")
    config = MiMoConfig.tiny(**{**MEDIUM, "max_position_embeddings": max(args.lengths)})
    check_official_rules(config)
    print(f"benchmark model: {config.num_hidden_layers} layers (global at "
          f"{[i for i in range(config.num_hidden_layers) if not config.is_sliding(i)]}, window "
          f"{config.sliding_window_size}), hidden {config.hidden_size}, {config.n_routed_experts} experts; batch 1; "
          f"chunk {args.chunk}; one pass and transformers up to T = {args.one_pass_max}, each run stopped after "
          f"{args.time_limit:.0f} s")
    print(f"{'T':>6} | {'':12} | {'seconds':>8} | {'tokens/s':>8} | {'peak MB':>8} | {'time / chunked':>14} | "
          f"{'memory / chunked':>16} | max |logits - chunked|")
    stopped = set()
    with tempfile.TemporaryDirectory(prefix="minimimo-prefill-") as tmp:
        write_checkpoint(config, tmp)
        for length in args.lengths:
            base = None
            for impl in IMPLS:
                if impl != "chunked" and length > args.one_pass_max:
                    print(f"{length:>6} | {impl:12} | not run: T > --one-pass-max ({args.one_pass_max}), memory grows as T^2")
                    continue
                if impl in stopped:
                    print(f"{length:>6} | {impl:12} | not run: a shorter prompt already ran past the time limit")
                    continue
                r = measure(args, impl, length, tmp, Path(tmp) / f"{impl}-{length}.pt")
                if "stopped" in r:
                    stopped.add(impl)
                    print(f"{length:>6} | {impl:12} | {r['stopped']}")
                    continue
                base = base or r
                diff = (r["logits"] - base["logits"]).abs().max().item()
                assert diff < 1e-3, f"{impl} at T={length}: last logits differ from chunked by {diff}"
                print(f"{length:>6} | {impl:12} | {r['seconds']:8.2f} | {length / r['seconds']:8.0f} | "
                      f"{r['peak'] / 2**20:8.0f} | {r['seconds'] / base['seconds']:13.2f}x | "
                      f"{r['peak'] / max(base['peak'], 1):15.2f}x | {diff:.1e}", flush=True)
    print(f"(time / chunked > 1: the chunked prefill is faster)\ntotal {time.perf_counter() - started:.0f} s | "
          f"{load_average()}")


if __name__ == "__main__":
    main()
