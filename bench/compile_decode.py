"""Does torch.compile pay for a decode step? Eager against compiled, side by side, with the compile time.

    python bench/compile_decode.py                  # MEDIUM model, batch 1, step and static (4-7 minutes)
    python bench/compile_decode.py --variants static --skip-explain   # the static step only (about 2 minutes)
    python bench/compile_decode.py --model small    # the small model of bench/generate.py
    python bench/compile_decode.py --variants step --dynamic true

gpt-fast's lever: a decode step whose shapes never change, captured whole by `torch.compile`, so
that Python issues one call per step instead of thousands. A decode step of minimimo's benchmark
models is bound by per-op overhead (bench/profile_decode.py: ~1300 Python-issued ops per step),
which is exactly what a compiled graph removes. This script measures what compiling the step gives,
as the eager package is written and as the fixed-shape step:

  eager   `model(token, positions=..., cache=cache)` + argmax: the package's current fast paths.
  step    the same function under `torch.compile(step, dynamic=--dynamic)`: dynamo traces it,
          splits it at every graph break (data-dependent Python: `.tolist()`, `int(tensor)`, ...),
          and inductor compiles each piece to C++.
  ffn     only each decoder layer's FFN (`layer.mlp.forward`: the dense MLP, or the MoE router
          and experts) under `torch.compile`, the rest eager: the least invasive split (not run
          by default: `--variants ffn`).
  static  the package's break-free step, `minimimo.static_decode.static_decode_step` (what
          `generate(..., compile=True)` runs), on `StaticCache.from_hybrid` of the prefilled
          cache: fixed-size caches written in place and an MoE whose shapes do not depend on
          the routing. Timed both eager ("static eager") and under `torch.compile(dynamic=False)`
          ("static"). `bench/generate.py --compile` times it inside `generate` against transformers.

The model is the benchmark model of `bench/common.py` (MEDIUM: hidden 512, 8 layers, 16 experts
top-2; `--model small`: bench/generate.py's), random weights (seed 0) saved in float32 and loaded
with `minimimo.load`, on one torch thread. A prompt of `--prompt` random tokens is prefilled once;
every run then decodes `--steps` greedy tokens from its own copy of that cache.

Printed:
  graph breaks   `torch._dynamo.explain` of one step: how many graphs, how many breaks, and each
                 break's reason with the innermost line of minimimo it comes from.
  compile        per variant: the first call (trace + compile, with an empty inductor cache), every
                 later call that compiled new graphs (recompiles: dynamo guards on Python values,
                 which may differ between layers or steps), the functions that recompiled with the
                 first guard that failed, and whether the greedy ids of `--steps` steps equal
                 eager's (asserted).
  steady         ms/step of eager and of each variant: median over `--rounds` interleaved rounds
                 (eager, variant, eager, ... in alternating order), each round `--steps` steps.
  break-even     compile time / time saved per step: the decode steps a run must take before the
                 compile has paid for itself (each step makes `--batch` tokens; "never" when the
                 variant is not faster).

If compiling fails, the script says why in one line and exits 0 with what it measured: it is a
measurement, not a feature.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(1, str(HERE))

import torch  # noqa: E402

import minimimo  # noqa: E402
from common import MEDIUM, load_average, write_checkpoint  # noqa: E402
from minimimo import HybridCache  # noqa: E402
from minimimo.model import prefill  # noqa: E402
from minimimo.static_decode import StaticCache, static_decode_step  # noqa: E402

PACKAGE = Path(minimimo.__file__).resolve().parent


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("medium", "small"), default="medium")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens prefilled before the decode steps")
    p.add_argument("--steps", type=int, default=32, help="greedy decode steps per run (ids asserted equal)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    p.add_argument("--variants", nargs="+", choices=("step", "ffn", "static"), default=["step", "static"])
    p.add_argument("--dynamic", choices=("auto", "true", "false"), default="auto",
                   help="torch.compile(dynamic=) of step and ffn: auto = None (recompile once, then mark "
                        "changed sizes dynamic); static always compiles with dynamic=False")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--warm-cache", action="store_true",
                   help="keep inductor's on-disk cache (default: an empty one per variant, so the compile is cold)")
    p.add_argument("--skip-explain", action="store_true", help="do not list the graph breaks")
    return p.parse_args(argv)


def build(model_name: str):
    """The benchmark model, random weights saved in float32 and loaded with `minimimo.load`."""
    if model_name == "small":
        from generate import SMALL as sizes  # bench/generate.py's model
    else:
        sizes = MEDIUM
    config = minimimo.MiMoConfig.tiny(**sizes)
    with tempfile.TemporaryDirectory(prefix="minimimo-compile-") as tmp:
        write_checkpoint(config, tmp)
        return minimimo.load(tmp, dtype=torch.float32, progress=False)


class Runner:
    """One way to decode: `step(token, pos, state)`, and how to make the state a run starts from."""

    def __init__(self, step, fresh_state):
        self.step, self.fresh_state = step, fresh_state

    def decode(self, first_token, first_pos, steps: int) -> tuple[torch.Tensor, list[float], list[int]]:
        """`steps` greedy steps -> (ids [b, steps], seconds per step, graphs compiled per step)."""
        state = self.fresh_state()
        token, pos, ids, seconds, graphs = first_token, first_pos, [], [], []
        for _ in range(steps):
            before = unique_graphs()
            t0 = time.perf_counter()
            token = self.step(token, pos, state)
            seconds.append(time.perf_counter() - t0)
            graphs.append(unique_graphs() - before)
            ids.append(token)
            pos = pos + 1
        return torch.stack(ids, dim=1), seconds, graphs


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def innermost_package_line(user_stack) -> str:
    """The deepest frame of a break's user stack that lies in minimimo (file:line  code)."""
    for frame in reversed(user_stack or []):
        if Path(frame.filename).resolve().is_relative_to(PACKAGE):
            return f"{Path(frame.filename).name}:{frame.lineno}  {(frame.line or '').strip()}"
    return "(outside minimimo)"


def explain_breaks(name: str, step, args_of_one_step) -> None:
    """torch._dynamo.explain of one decode step: graphs, breaks, and where the breaks come from."""
    t0 = time.perf_counter()
    report = torch._dynamo.explain(step)(*args_of_one_step)
    print(f"\n== {name}: graph breaks of one decode step (torch._dynamo.explain, {time.perf_counter() - t0:.1f} s) ==")
    print(f"{report.graph_count} graphs, {report.graph_break_count} graph breaks, {report.op_count} ops captured; "
          "distinct reasons, with the innermost line of minimimo they come from:")
    by_place = Counter((reason.reason.strip().splitlines()[0][:100], innermost_package_line(reason.user_stack))
                       for reason in report.break_reasons)
    for (reason, place), count in by_place.most_common():
        print(f"  {count:3d} x  {place}\n         {reason}")
    torch._dynamo.reset()


class Recompiles(logging.Handler):
    """Collects dynamo's "Recompiling function ..." messages (and its recompile-limit warnings):
    per function, how often it recompiled, and the first guard that failed."""

    def __init__(self):
        super().__init__()
        self.reasons, self.limit_hits = Counter(), Counter()

    def emit(self, record):
        text = record.getMessage()
        if text.startswith("Recompiling function"):
            lines = text.splitlines()
            where = lines[0].removeprefix("Recompiling function ")
            guard = next((line.strip()[2:] for line in lines[1:] if line.strip().startswith("- ")), "?")
            self.reasons[short_path(where), guard[:150]] += 1
        elif "recompile_limit" in text:
            self.limit_hits[text.splitlines()[0][:200]] += 1

    def report(self) -> None:
        for (where, guard), count in self.reasons.most_common(8):
            print(f"  {count:3d} x recompiled {where}\n         first failed guard: {guard}")
        if len(self.reasons) > 8:
            print(f"  ... and {len(self.reasons) - 8} more (function, guard) pairs")
        if self.limit_hits:
            print(f"  recompile limit ({torch._dynamo.config.recompile_limit}) hit {sum(self.limit_hits.values())} "
                  "times: those frames run eagerly from then on")
        self.reasons.clear(), self.limit_hits.clear()


def short_path(text: str) -> str:
    """'forward in /x/y/minimimo/model.py:40' -> 'forward in minimimo/model.py:40'."""
    return text.replace(str(PACKAGE.parent) + os.sep, "")


@contextlib.contextmanager
def compiled_ffns(model, compiled):
    """Inside the block each decoder layer's FFN runs its compiled forward (an instance attribute
    that shadows the class's `forward`; removed on leaving)."""
    try:
        for layer, forward in zip(model.model.layers, compiled):
            layer.mlp.forward = forward
        yield
    finally:
        for layer in model.model.layers:
            layer.mlp.__dict__.pop("forward", None)


def main(argv=None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dynamic = {"auto": None, "true": True, "false": False}[args.dynamic]
    # rope.py's lru_caches (inverse frequencies, partner channels) hold constants of the geometry:
    # dynamo tracing through them instead of reading the cache changes nothing
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    recompiles = Recompiles()
    torch._logging.set_logs(recompiles=True)
    for name in ("torch._dynamo.guards.__recompiles", "torch._dynamo.convert_frame"):
        logging.getLogger(name).addHandler(recompiles)
    model = build(args.model)
    config = model.config
    print(f"minimimo | torch {torch.__version__} | threads {torch.get_num_threads()} | float32 | {args.model} "
          f"model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.n_routed_experts} experts "
          f"top-{config.num_experts_per_tok}, window {config.sliding_window_size} | batch {args.batch}, prompt "
          f"{args.prompt}, {args.steps} steps | inductor cache: {'warm' if args.warm_cache else 'cold'} | "
          f"{load_average()}")

    def step(token, pos, cache):
        """One greedy decode step of the package: token [b] at positions pos [b] -> the next token [b]."""
        return model(token[:, None], positions=pos[:, None], cache=cache)[:, -1].argmax(-1)

    b, t = args.batch, args.prompt
    max_length = t + args.steps + 1
    ids = torch.randint(config.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(t).expand(b, t)
    with torch.no_grad():
        prefilled = HybridCache(config, b, max_length=max_length)
        first = model.logits(prefill(model, ids, prefilled, positions=positions)[:, -1]).argmax(-1)
        first_pos = positions[:, -1] + 1

        def fresh_cache():
            import copy
            return copy.deepcopy(prefilled)

        runners = {"eager": Runner(step, fresh_cache)}
        eager_ids, _, _ = runners["eager"].decode(first, first_pos, args.steps)  # also warms lazy tables

        if "static" in args.variants:  # the package's fixed-shape step on a copy of the prefilled cache
            def fresh_static():
                return StaticCache.from_hybrid(model, prefilled, max_length)

            def static_step(token, pos, state):
                return static_decode_step(model, state, token, pos).argmax(-1)
            runners["static eager"] = Runner(static_step, fresh_static)
            got, _, _ = runners["static eager"].decode(first, first_pos, args.steps)
            print(f"static eager: greedy ids equal to eager over {args.steps} steps: {torch.equal(got, eager_ids)}")
            assert torch.equal(got, eager_ids), f"static eager: greedy ids differ\n{got}\n{eager_ids}"

        if not args.skip_explain:  # (the static step's count is in its compile line: 1 graph = no break)
            explain_breaks("eager step", step, (first, first_pos, fresh_cache()))

        compile_seconds = {}
        inductor_caches = contextlib.ExitStack()
        for variant in args.variants:  # (no torch._dynamo.reset() in between: it would drop the earlier variants)
            if not args.warm_cache:  # an empty on-disk cache: the compile a first run would see
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_caches.enter_context(
                    tempfile.TemporaryDirectory(prefix=f"minimimo-inductor-{variant}-"))
            try:
                if variant == "step":
                    runner = Runner(torch.compile(step, dynamic=dynamic), fresh_cache)
                elif variant == "ffn":  # each layer's FFN compiled, the rest eager
                    compiled = [torch.compile(layer.mlp.forward, dynamic=dynamic) for layer in model.model.layers]

                    def ffn_step(token, pos, cache, compiled=compiled):
                        with compiled_ffns(model, compiled):
                            return step(token, pos, cache)
                    runner = Runner(ffn_step, fresh_cache)
                else:
                    runner = Runner(torch.compile(static_step, dynamic=False), fresh_static)
                got, seconds, graphs = runner.decode(first, first_pos, args.steps)
            except Exception as error:  # a measurement, not a feature: say why and keep what was measured
                line = (str(error).strip().splitlines() or [""])[0][:200]
                print(f"\n{variant}: compiling failed: {type(error).__name__}: {line}")
                traceback.print_exc(limit=-3)  # the last frames, on stderr
                continue
            ok = bool(torch.equal(got, eager_ids))
            recompiled = [i for i, n in enumerate(graphs) if n and i > 0]
            compile_seconds[variant] = seconds[0] + sum(seconds[i] for i in recompiled)
            print(f"\n== {variant}: first call {seconds[0]:.1f} s ({graphs[0]} graphs); later calls that compiled "
                  f"graphs: {len(recompiled)}"
                  + (" (" + ", ".join(f"step {i}: {graphs[i]} in {seconds[i]:.1f} s" for i in recompiled) + ")"
                     if recompiled else "")
                  + f"; compile total {compile_seconds[variant]:.1f} s | greedy ids equal to eager over "
                  f"{args.steps} steps: {ok}")
            recompiles.report()
            assert ok, f"{variant}: greedy ids differ from eager:\n{got}\n{eager_ids}"
            runners[variant] = runner

        measured = {}  # runner -> median ms/step per round
        before = unique_graphs()
        for r in range(args.rounds):  # interleaved, the order alternating each round
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for name in order:
                _, seconds, _ = runners[name].decode(first, first_pos, args.steps)
                measured.setdefault(name, []).append(statistics.median(seconds))
        late = unique_graphs() - before
        inductor_caches.close()
        if late:
            print(f"\n== graphs compiled while timing (the same tokens as the first run, fresh caches): {late} ==")
            recompiles.report()

    eager_ms = statistics.median(measured["eager"]) * 1e3
    print(f"\n== steady decode, median of {args.rounds} interleaved rounds of {args.steps} steps "
          f"(median step of each) | graphs compiled while timing: {late} | {load_average()} ==")
    print(f"  {'variant':13s} {'ms/step':>9s} {'vs eager':>9s} {'compile s':>10s} {'break-even steps':>18s}")
    for name, samples in measured.items():
        ms = statistics.median(samples) * 1e3
        compile_s = compile_seconds.get(name)
        if compile_s is None:
            even = "-"
        elif ms < eager_ms:
            even = f"{compile_s * 1e3 / (eager_ms - ms):.0f}"
        else:
            even = "never (slower)"
        compile_text = "-" if compile_s is None else f"{compile_s:.1f}"
        print(f"  {name:13s} {ms:9.2f} {eager_ms / ms:8.2f}x {compile_text:>10s} {even:>18s}")
    print(f"break-even: compile s / (eager - variant) per step, against eager (x {b} tokens per step); "
          "'static' against 'static eager' is the compiler's own share")


if __name__ == "__main__":
    main()
