"""What the benchmarks share: timing helpers, the header, and the official-model config rules."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import platform
import time
from pathlib import Path

import torch

import minimimo
from minimimo import MiMoConfig, MiMoForCausalLM
from minimimo.hub import save_checkpoint
from minimimo.verify import official_rule_warnings


def check_official_rules(c: MiMoConfig) -> None:
    """Fail early if the config says something the transformers model would silently not do."""
    problems = official_rule_warnings(c)
    assert not problems, problems
    assert int(c.head_dim * c.partial_rotary_factor) % 2 == 0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:9.3f}" if ms < 10 else f"{ms:9.1f}"


def load_average() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def header(args, busy_hint: str) -> None:
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    print(f"minimimo {minimimo.__version__} | torch {torch.__version__} | transformers {transformers.__version__} "
          f"| python {platform.python_version()}")
    print(f"cpu: {cpu}, {os.cpu_count()} logical cores | torch threads: {torch.get_num_threads()} "
          f"| dtype float32 | mode: {'quick' if args.quick else 'full'} | {load_average()}")
    with contextlib.suppress(OSError):
        if os.getloadavg()[0] > 0.75 * (os.cpu_count() or 1):
            print(f"WARNING: other processes keep this machine busy: {busy_hint}")


def official_and_ours(config: MiMoConfig, layout: str = "hub"):
    """Random weights written once (float32); loaded by minimimo and by transformers, which must
    report no loading problem. -> (minimimo model, transformers model)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="minimimo-bench-") as tmp:
        save_checkpoint(MiMoForCausalLM(config).init_weights(seed=0), tmp, dtype=torch.float32, layout=layout)
        ours = minimimo.load(tmp, dtype=torch.float32, progress=False)
        with contextlib.redirect_stderr(io.StringIO()):
            theirs, info = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        theirs.eval()
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers reported loading problems: {problems}"
    return ours, theirs
