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


# The benchmark model of bench/forward.py and bench/prefill.py (hidden 512, 8 layers, 16 experts).
# The official transformers model ignores hybrid_layer_pattern, swa_* keys, thetas, the rotary
# factor and eps and hard-codes them: layer i is global iff i == 0 or (i + 1) % 6 == 0, layer 0 is
# dense, swa kv heads = 2 * num_key_value_heads, swa q heads = num_attention_heads, same head dims,
# thetas 5e6 / 1e4, factor 0.334, eps 1e-5. The config below satisfies all of it (MiMoConfig.tiny
# already uses Flash's layer rule and those thetas/factor/eps).
MEDIUM = dict(
    num_hidden_layers=8, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, vocab_size=4096,
    num_attention_heads=8, num_key_value_heads=2, head_dim=96, v_head_dim=64,  # int(96 * 0.334) = 32 rotary
    swa_num_attention_heads=8, swa_num_key_value_heads=4, swa_head_dim=96, swa_v_head_dim=64,
    sliding_window_size=128,
    # 16 experts, top-2: 1/8 of the experts per token. Flash is 8/256 = 1/32; top-4 would be 1/4.
    # top-2 is the nearer fraction and gives ~64 tokens per expert at 512 tokens (Flash: ~16).
    n_routed_experts=16, num_experts_per_tok=2,
    max_position_embeddings=4096,
)


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
    with tempfile.TemporaryDirectory(prefix="minimimo-bench-") as tmp:
        write_checkpoint(config, tmp, layout)
        return minimimo.load(tmp, dtype=torch.float32, progress=False), load_transformers(tmp)


def write_checkpoint(config: MiMoConfig, path, layout: str = "hub") -> None:
    """The random benchmark weights (seed 0), saved in float32 in the hub's layout."""
    save_checkpoint(MiMoForCausalLM(config).init_weights(seed=0), path, dtype=torch.float32, layout=layout)


def load_transformers(path):
    """The official model (eager attention, float32), failing on any loading problem it reports."""
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):
        theirs, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers reported loading problems: {problems}"
    return theirs.eval()
