"""Command line: `python -m minimimo [demo|info] ...` (also installed as `minimimo`).

    minimimo                      # demo: write the small demo checkpoint, load it strictly, run it
    minimimo info --flash         # the real 309B configuration: layers, parameters
    minimimo info --model PATH    # any hub-layout checkpoint directory
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from .checkpoint import load
from .config import MiMoConfig, human


def demo_checkpoint() -> Path:
    """A small random MiMo in the official hub layout (FP8 blocks, per-layer files), written once.

    It stands in for a trained checkpoint: the weights are random, so its text is noise, but the
    loading path (index, shards, FP8 dequantization, strict accounting) is the real one.
    """
    from .hub import save_checkpoint
    from .model import MiMoForCausalLM

    home = Path(os.environ.get("MINIMIMO_HOME", Path.home() / ".cache" / "minimimo"))
    directory = home / "demo-random-v1"
    if not (directory / "config.json").is_file():
        model = MiMoForCausalLM(MiMoConfig.tiny()).init_weights(seed=0)
        save_checkpoint(model, directory, dtype=torch.bfloat16, fp8_block=16, layout="hub")
    return directory


def print_config(config: MiMoConfig) -> None:
    pattern = "".join("S" if s else "G" for s in config.hybrid_layer_pattern)
    ffn = "".join("E" if m else "D" for m in config.moe_layer_freq)
    print(f"layers       {config.num_hidden_layers}  attention {pattern}  (G global, S sliding window "
          f"{config.sliding_window_size}+1)")
    print(f"             ffn       {ffn}  (D dense, E {config.n_routed_experts} experts, top-{config.num_experts_per_tok})")
    for name, layer in (("global", config.hybrid_layer_pattern.index(0) if 0 in config.hybrid_layer_pattern else None),
                        ("sliding", config.hybrid_layer_pattern.index(1) if 1 in config.hybrid_layer_pattern else None)):
        if layer is None:
            continue
        g = config.attention(layer)
        print(f"{name:<13}q heads {g.num_heads}, kv heads {g.num_kv_heads}, head dim {g.head_dim}/{g.v_head_dim}, "
              f"rotary {g.rotary_dim}, theta {g.rope_theta:g}, sink {g.has_sink}")
    counts = config.parameter_counts()
    print(f"parameters   total {counts['total']:,} ({human(counts['total'])}), active per token "
          f"{counts['active']:,} ({human(counts['active'])}); MTP {config.num_mtp_layers} x "
          f"{human(counts['mtp_per_block'])}")


def cmd_info(args) -> int:
    config = MiMoConfig.flash() if args.flash else MiMoConfig.from_pretrained(args.model or demo_checkpoint())
    print_config(config)
    return 0


def cmd_demo(args) -> int:
    directory = Path(args.model) if args.model else demo_checkpoint()
    print(f"checkpoint   {directory}")
    t0 = time.perf_counter()
    model = load(directory, dtype=args.dtype)
    report = model.load_report
    print(f"loaded       {report.tensors} tensors from {report.files} files in {time.perf_counter() - t0:.2f}s "
          f"({report.fp8_tensors} FP8, grids {report.grids}, {report.skipped_mtp} MTP tensors skipped)")
    print_config(model.config)
    ids = torch.arange(args.tokens).remainder(model.config.vocab_size)[None]
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(ids)
    dt = time.perf_counter() - t0
    print(f"forward      {tuple(ids.shape)} -> logits {tuple(logits.shape)} {logits.dtype} in {dt * 1e3:.1f} ms")
    print(f"next-token argmax: {logits[0].argmax(-1).tolist()}")
    print("(random weights: the demo shows the machinery, not language; see README)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minimimo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo", help="load a checkpoint (default: the demo one) and run a forward pass")
    p.add_argument("--model", help="checkpoint directory (hub layout)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokens", type=int, default=16)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("info", help="configuration and parameter counts")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="checkpoint directory or config.json")
    g.add_argument("--flash", action="store_true", help="the real MiMo-V2-Flash configuration")
    p.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    return args.func(args)
