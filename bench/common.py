"""What the benchmarks share: timing helpers, the header, and the official-model config rules."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

import torch

import minimimo
from minimimo import MiMoConfig
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
