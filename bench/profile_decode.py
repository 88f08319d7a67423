"""Where a decode step goes: torch.profiler over minimimo's greedy decode steps, as one table.

    python bench/profile_decode.py                       # this checkout's minimimo
    python bench/profile_decode.py --code OTHER_CHECKOUT # another checkout's minimimo (before/after)

The model is the benchmark model of `bench/common.py` (MEDIUM: hidden 512, 8 layers, 16 experts
top-2) with random weights (seed 0), saved in float32 and loaded with `minimimo.load`, so that
whatever the loader does (fusing, swapping modules) is in the profile. A prompt of `--prompt`
random tokens goes through `minimimo.stream` (prefill, outside the profile), then `--steps` decode
steps are profiled, each one `model(token, positions, cache)` plus the greedy argmax.

Printed per batch size, per decode step:
  ms/step           wall time of an unprofiled run of the same steps (median of --runs runs)
  aten ops          every aten operator the profiler records, nested ones included
                    (aten::linear -> aten::matmul -> aten::mm counts 3)
  from Python       aten operators with no aten operator above them: the calls Python issues,
                    each one a trip through the dispatcher
  matmuls           mm, bmm, addmm, baddbmm and grouped_mm kernels
then the top operators by self CPU time. One torch thread by default: a decode step is many small
ops, and on a busy machine a second thread mostly waits.

`--code DIR` profiles the minimimo package found in DIR (e.g. a `git worktree` of an older commit)
with this checkout's benchmark model, so the two tables compare the same work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm", "aten::grouped_mm"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--code", type=Path, default=HERE.parent,
                   help="checkout whose minimimo package is profiled (default: this one)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens before the profiled steps")
    p.add_argument("--steps", type=int, default=16, help="decode steps profiled (and timed)")
    p.add_argument("--runs", type=int, default=5, help="unprofiled timing runs (median)")
    p.add_argument("--rows", type=int, default=15, help="operators in the top table")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    return p.parse_args(argv)


def aten_counts(events) -> tuple[Counter, int]:
    """-> (count of every aten operator by name, how many of them have no aten operator above them)."""
    by_name, top_level = Counter(), 0
    for ev in events:
        if not ev.name.startswith("aten::"):
            continue
        by_name[ev.name] += 1
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        top_level += parent is None
    return by_name, top_level


def main(argv=None) -> None:
    args = parse(argv)
    sys.path.insert(0, str(args.code.resolve()))  # the minimimo to profile
    sys.path.insert(1, str(HERE))  # bench/common.py of this checkout: the benchmark model
    import torch
    from torch.profiler import ProfilerActivity, profile

    import minimimo
    from common import MEDIUM, write_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    config = minimimo.MiMoConfig.tiny(**MEDIUM)
    with tempfile.TemporaryDirectory(prefix="minimimo-profile-") as tmp:
        write_checkpoint(config, tmp)
        model = minimimo.load(tmp, dtype=torch.float32, progress=False)
    print(f"minimimo from {Path(minimimo.__file__).parent} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | float32 | MEDIUM model: {config.num_hidden_layers} layers, hidden "
          f"{config.hidden_size}, {config.n_routed_experts} experts top-{config.num_experts_per_tok} | "
          f"prompt {args.prompt}, {args.steps} decode steps")

    for batch in args.batches:
        ids = torch.randint(config.vocab_size, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))

        def started():
            tokens = minimimo.stream(model, ids, args.steps + 2)
            next(tokens)  # the prefill, outside what is measured
            next(tokens)  # the first decode step: warm (allocator, lazy inits)
            return tokens

        with torch.inference_mode():
            times = []
            for _ in range(args.runs):
                tokens = started()
                t0 = time.perf_counter()
                for _ in tokens:
                    pass
                times.append((time.perf_counter() - t0) / args.steps)
            tokens = started()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in tokens:
                    pass
        by_name, top_level = aten_counts(prof.events())
        per_step = lambda count: count / args.steps  # noqa: E731
        matmuls = sum(c for name, c in by_name.items() if name in MATMULS)
        print(f"\n== batch {batch}: {statistics.median(times) * 1e3:.2f} ms/step unprofiled (median of {args.runs}) "
              f"| per step: {per_step(sum(by_name.values())):.0f} aten ops, {per_step(top_level):.0f} from Python, "
              f"{per_step(matmuls):.0f} matmuls ==")
        print("matmuls per step: " + ", ".join(f"{name} {per_step(c):.0f}" for name, c in sorted(by_name.items())
                                                if name in MATMULS))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
