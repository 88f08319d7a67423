"""Cold start: `python -m minimimo` end to end, in fresh processes, beside another checkout.

    python bench/cold_start.py                      # this checkout only
    python bench/cold_start.py --base OTHER_CHECKOUT # side by side (e.g. a `git worktree` of an older commit)

Each checkout's package is put first on PYTHONPATH of a fresh interpreter started in an empty
folder (so the working directory shadows nothing), and three things are timed, the checkouts
interleaved (A B A B ...) so that a slow patch of a busy machine hits both alike:

  import    `import minimimo` (torch included: most of it)
  meta      `import minimimo` and building the embedded default's model on the meta device, the
            loader's build step (before, nn.Embedding's initializer imported torch._dynamo there)
  run       `python -m minimimo`: the demo of the embedded default (load, show, generate), what a
            user runs first

Medians of `--runs` runs, wall-clock seconds of the whole process. The environment is passed on
unchanged (threads included): this is what a user waits for. Ratios > 1: this checkout is faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

STEPS = {
    "import": ["-c", "import minimimo"],
    "meta": ["-c", "import torch, minimimo\n"
                   "config = minimimo.MiMoConfig.from_pretrained(minimimo.default_checkpoint())\n"
                   "with torch.device('meta'): minimimo.MiMoForCausalLM(config)"],
    "run": ["-m", "minimimo"],
}


def timed_process(code: Path, args: list[str], cwd: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(code))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{code}: python {' '.join(args[:1])} ... failed (exit {done.returncode}):\n{done.stderr}")
    return seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=None, help="another checkout to time beside this one")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    args = p.parse_args(argv)
    checkouts = {"this": HERE} | ({"base": args.base.resolve()} if args.base else {})
    print(f"python {sys.version.split()[0]} | {', '.join(f'{k}: {v}' for k, v in checkouts.items())} | "
          f"{args.runs} runs each, interleaved | load average %.2f %.2f %.2f" % os.getloadavg())
    times = {(step, name): [] for step in args.steps for name in checkouts}
    with tempfile.TemporaryDirectory(prefix="minimimo-cold-") as empty:
        for _ in range(args.runs):
            for step in args.steps:
                for name, code in checkouts.items():
                    times[step, name].append(timed_process(code, STEPS[step], empty))
    print(f"{'step':8s} " + " ".join(f"{name + ' s':>9s}" for name in checkouts) + ("  base/this" if args.base else ""))
    for step in args.steps:
        medians = {name: statistics.median(times[step, name]) for name in checkouts}
        ratio = f"  {medians['base'] / medians['this']:8.2f}x" if args.base else ""
        print(f"{step:8s} " + " ".join(f"{m:9.2f}" for m in medians.values()) + ratio)
    print("load average %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
