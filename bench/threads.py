"""Decode tokens/s of the bundled checkpoint against the number of torch threads, alone and beside
one busy process: the measurement behind the CLI's default `--threads`.

    python bench/threads.py [--threads 1 2] [--tokens 96] [--repeats 3]

A small model decodes one token as a few dozen tiny matrix products. Splitting each of them over
threads buys little, and every split waits for its slowest thread: when another process holds a
core, that wait is a scheduler time slice, and decoding collapses. Settings are interleaved and
each figure is the median of `--repeats` runs, so that load from elsewhere on the machine falls on
all settings alike.

Measured on a 2-core machine already running other work (load average about 10), 96 tokens,
3 runs each (median):

    beside             threads   decode tokens/s
    alone                    1               3.8
    alone                    2               0.4     (torch's default here: one per core)
    one busy process         1               3.6
    one busy process         2               0.3

The figures are low because the machine was shared; the ratio (about 10x in favour of one
thread) is the point, and it matches a first measurement on a quieter machine: 102.7 tokens/s
with one thread against 6.5 with the default, beside one other process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minimimo, installed or not

import minimimo  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before any set_num_threads


def decode_rate(model, prompt: torch.Tensor, tokens: int) -> float:
    """Greedy decode tokens/s after the prefill (the first token is chosen when the prefill ends)."""
    first = None
    for i, _ in enumerate(minimimo.stream(model, prompt, tokens)):
        if i == 0:
            first = time.perf_counter()
    return (tokens - 1) / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = minimimo.load(minimimo.default_checkpoint(), dtype=torch.float32, progress=False)
    tokenizer = minimimo.Tokenizer.from_pretrained(minimimo.default_checkpoint())
    prompt = torch.tensor([tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n")])
    rates: dict[tuple[str, int], list[float]] = {}
    for busy in (False, True):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for _ in range(args.repeats):
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    rate = decode_rate(model, prompt, args.tokens)
                    rates.setdefault(("one busy process" if busy else "alone", threads), []).append(rate)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    print(f"cores: {os.cpu_count()}, torch default threads here: {DEFAULT_THREADS}")
    print(f"{'beside':<18} {'threads':>7} {'decode tokens/s (median)':>26}   runs")
    for (beside, threads), values in rates.items():
        print(f"{beside:<18} {threads:>7} {statistics.median(values):>26.1f}   "
              + " ".join(f"{v:.1f}" for v in values))


if __name__ == "__main__":
    main()
