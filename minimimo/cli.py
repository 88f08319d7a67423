"""Command line: `python -m minimimo [demo|info|generate|chat] ...` (also installed as `minimimo`).

    minimimo                              # demo: load the default checkpoint, show it, generate
    minimimo info --flash                 # the real 309B configuration, parameters, KV memory table
    minimimo generate --prompt "def fib"  # stream a continuation, tokens/s at the end
    minimimo chat                         # interactive chat in the official ChatML format
    minimimo plan --flash --gpus 8 --gpu-memory 80GiB   # memory plan per device
    minimimo verify --model PATH          # minimimo vs the official implementation (transformers)
    torchrun --nproc-per-node N -m minimimo generate --model PATH --prompt ...   # tensor parallel

`--model PATH` picks any hub-layout checkpoint directory; without it, the embedded default
(`minimimo.default_checkpoint()`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from .chat import Conversation
from .checkpoint import load
from .config import MiMoConfig, human
from .defaults import default_checkpoint
from .generate import generate, stream
from .tokenizer import Tokenizer


def print_config(config: MiMoConfig) -> None:
    pattern = "".join("S" if s else "G" for s in config.hybrid_layer_pattern)
    ffn = "".join("E" if m else "D" for m in config.moe_layer_freq)
    print(f"layers       {config.num_hidden_layers}  attention {pattern}  (G global, S sliding window "
          f"{config.sliding_window_size}+1)")
    print(f"             ffn       {ffn}  (D dense, E {config.n_routed_experts} experts, top-{config.num_experts_per_tok})")
    for name, kind in (("global", 0), ("sliding", 1)):
        if kind in config.hybrid_layer_pattern:
            g = config.attention(config.hybrid_layer_pattern.index(kind))
            print(f"{name:<13}q heads {g.num_heads}, kv heads {g.num_kv_heads}, head dim {g.head_dim}/{g.v_head_dim}, "
                  f"rotary {g.rotary_dim}, theta {g.rope_theta:g}, sink {g.has_sink}")
    counts = config.parameter_counts()
    print(f"parameters   total {counts['total']:,} ({human(counts['total'])}), active per token "
          f"{counts['active']:,} ({human(counts['active'])}); MTP {config.num_mtp_layers} x "
          f"{human(counts['mtp_per_block'])}")


def print_memory_table(config: MiMoConfig, dtype: str = "bfloat16") -> None:
    print(f"KV cache per sequence ({dtype}):   hybrid   all-global   no-window   all-global/hybrid")
    for n in (4096, 32768, 131072, 262144):
        h, a, w = (config.kv_cache_bytes(n, dtype, layout) for layout in ("hybrid", "all-global", "no-window"))
        print(f"  {n // 1024:>4}K tokens            {h / 2**30:8.3f} GiB {a / 2**30:8.3f} GiB {w / 2**30:8.3f} GiB"
              f"   {a / h:5.2f}x")


def cmd_info(args) -> int:
    config = MiMoConfig.flash() if args.flash else MiMoConfig.from_pretrained(args.model or default_checkpoint())
    print_config(config)
    print_memory_table(config)
    return 0


def load_model(directory: Path, args):
    """Load for this process: a tensor-parallel shard under torchrun (only rank 0 prints), else placed
    over --devices (with --weight-dtype), else on one device."""
    from .parallel import init_from_env

    if init_from_env():
        import torch.distributed as dist

        if dist.get_rank() != 0:
            sys.stdout = sys.stderr = open(os.devnull, "w")  # every rank computes, rank 0 speaks
        return load(directory, dtype=args.dtype, tensor_parallel=True, progress=False)
    devices = args.devices.split(",") if getattr(args, "devices", None) else None
    return load(directory, dtype=None if getattr(args, "weight_dtype", None) == "fp8" else args.dtype,
                devices=devices, weight_dtype=getattr(args, "weight_dtype", None))


def load_with_tokenizer(args):
    directory = Path(args.model) if args.model else default_checkpoint()
    model = load_model(directory, args)
    if not (directory / "tokenizer.json").is_file():
        raise SystemExit(f"{directory}: no tokenizer.json, so text cannot be encoded (use `minimimo demo`)")
    return directory, model, Tokenizer.from_pretrained(directory)


def stream_text(model, tokenizer, prompt_ids, args, stop_ids) -> tuple[list[int], float]:
    """Prints the continuation as it comes; returns the new ids and the decode tokens/s."""
    decoder = tokenizer.incremental_decoder(skip_special_tokens=True)
    ids = torch.tensor([prompt_ids])
    new, start, first = [], time.perf_counter(), None
    for token in stream(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stop_token_ids=stop_ids):
        if first is None:
            first = time.perf_counter()  # prefill done, first token chosen
        token_id = int(token[0])
        new.append(token_id)
        if token_id in stop_ids:
            break
        print(decoder.push(token_id), end="", flush=True)
    print(decoder.flush(), flush=True)
    decode_time = time.perf_counter() - (first or start)
    rate = (len(new) - 1) / decode_time if len(new) > 1 and decode_time > 0 else float("nan")
    return new, rate


def cmd_generate(args) -> int:
    _, model, tokenizer = load_with_tokenizer(args)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise SystemExit("empty prompt")
    print(args.prompt, end="", flush=True)
    stop_ids = tokenizer.eos_token_ids if args.stop_at_eos else []
    if args.mtp_steps:
        return generate_speculative(model, tokenizer, prompt_ids, args, stop_ids)
    new, rate = stream_text(model, tokenizer, prompt_ids, args, stop_ids)
    print(f"\n[{len(prompt_ids)} prompt tokens, {len(new)} new tokens, decode {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def generate_speculative(model, tokenizer, prompt_ids, args, stop_ids) -> int:
    """MTP drafting: the text, then the acceptance length and its histogram."""
    start = time.perf_counter()
    ids, stats = generate(model, torch.tensor([prompt_ids]), args.max_new_tokens, mtp_steps=args.mtp_steps,
                          return_stats=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, stop_token_ids=stop_ids)
    elapsed = time.perf_counter() - start
    new = ids[0, len(prompt_ids):].tolist()
    print(tokenizer.decode(new, skip_special_tokens=True), flush=True)
    print(f"\n[{len(new)} new tokens in {elapsed:.2f}s ({len(new) / elapsed:.1f} tokens/s incl. prefill), "
          f"mtp_steps={args.mtp_steps}, mean acceptance length {stats.mean_accept_length:.2f}]", file=sys.stderr)
    histogram = stats.histogram()
    for n, count in histogram.items():
        bar = "#" * round(40 * count / max(1, max(histogram.values())))
        print(f"  {n} token{'s' if n > 1 else ' '} per forward: {count:4d} {bar}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    _, model, tokenizer = load_with_tokenizer(args)
    conversation = Conversation()
    print("chat with the model; an empty line or /exit ends it", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line or line == "/exit":
            break
        conversation.add_user(line)
        prompt_ids = tokenizer.encode(conversation.prompt(enable_thinking=args.think))
        print("mimo> ", end="", flush=True)
        new, rate = stream_text(model, tokenizer, prompt_ids, args, tokenizer.eos_token_ids)
        conversation.add_assistant(tokenizer.decode(new))
        print(f"[{rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    directory = Path(args.model) if args.model else default_checkpoint()
    print(f"checkpoint   {directory}")
    t0 = time.perf_counter()
    model = load_model(directory, args)
    report = model.load_report
    print(f"loaded       {report.tensors} tensors from {report.files} files in {time.perf_counter() - t0:.2f}s "
          f"({report.fp8_tensors} FP8, grids {report.grids}, {report.mtp_blocks} MTP blocks)")
    print_config(model.config)
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_pretrained(directory)
        prompt = "def fibonacci(n):\n"
        print(f"generate     greedy continuation of {prompt!r}:\n")
        print(prompt, end="")
        args.temperature, args.top_k, args.top_p, args.seed = 0.0, 0, 1.0, None
        new, rate = stream_text(model, tokenizer, tokenizer.encode(prompt), args, tokenizer.eos_token_ids)
        print(f"\n[{len(new)} new tokens, decode {rate:.1f} tokens/s]")
    return 0


def cmd_plan(args) -> int:
    from .plan import PlanError, plan

    source = MiMoConfig.flash() if args.flash or not args.model else args.model
    the_plan = plan(source, devices=args.gpus, device_memory=args.gpu_memory, weight_dtype=args.weight_dtype,
                    kv_dtype=args.kv_dtype, context=args.context, batch=args.batch)
    print(the_plan.table())
    try:
        the_plan.check()
    except PlanError as err:
        print(f"\n{err}", file=sys.stderr)
        return 1
    return 0


def cmd_verify(args) -> int:
    """minimimo against the official implementation (transformers) on the same checkpoint."""
    from .verify import verify

    report = verify(args.model, dtype=args.dtype, devices=args.devices.split(",") if args.devices else None,
                    weight_dtype=args.weight_dtype, tokens=args.tokens)
    print(report.summary())
    return 0 if report.ok(args.atol) else 1


def add_model(p) -> None:
    p.add_argument("--model", help="checkpoint directory (hub layout); default: the embedded checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--devices", help="place the layers over these devices, e.g. cuda:0,cuda:1 (or cpu,cpu)")
    p.add_argument("--weight-dtype", choices=["fp8", "bf16", "fp32"],
                   help="fp8: keep FP8 weights in FP8 on the device (other tensors bf16)")


def add_sampling(p) -> None:
    add_model(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minimimo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo", help="load a checkpoint (default: the embedded one), show it, generate")
    add_sampling(p)
    p.set_defaults(func=cmd_demo, max_new_tokens=48)
    p = sub.add_parser("info", help="configuration, parameter counts and KV-cache memory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="checkpoint directory or config.json")
    g.add_argument("--flash", action="store_true", help="the real MiMo-V2-Flash configuration")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("generate", help="stream a continuation of --prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--no-stop", dest="stop_at_eos", action="store_false", help="do not stop at end-of-text tokens")
    p.add_argument("--mtp-steps", type=int, default=0, help="draft k tokens per cycle with the MTP blocks (1..3)")
    add_sampling(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat (ChatML, thinking off unless --think)")
    p.add_argument("--think", action="store_true", help="let the model open a <think> block")
    add_sampling(p)
    p.set_defaults(func=cmd_chat, max_new_tokens=256)
    p = sub.add_parser("plan", help="memory plan: which device holds what, and does it fit")
    p.add_argument("--model", help="checkpoint directory or config.json (default: --flash)")
    p.add_argument("--flash", action="store_true", help="the real MiMo-V2-Flash configuration")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-memory", default="80GiB", help="per device, e.g. 80GiB, 141GB")
    p.add_argument("--weight-dtype", default="fp8", choices=["fp8", "bf16", "fp32"])
    p.add_argument("--kv-dtype", default="bf16")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("verify", help="compare with the official implementation (needs transformers)")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--devices")
    p.add_argument("--weight-dtype", choices=["fp8", "bf16", "fp32"])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--atol", type=float, default=1e-3, help="largest logit difference accepted")
    p.set_defaults(func=cmd_verify)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    return args.func(args)
