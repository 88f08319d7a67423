"""Command line: `minimimo COMMAND [options]`, or `python -m minimimo ...`.

    minimimo                              # = minimimo demo: load the embedded default, show it, generate
    minimimo demo --model PATH            # the same for any hub-layout checkpoint
    minimimo info --flash                 # the real 309B configuration, parameters, KV memory table
    minimimo generate --prompt "def fib"  # stream a continuation, decode tokens/s at the end
    minimimo generate --prompt "import os" --mtp-steps 3   # MTP drafting: acceptance length, histogram
    minimimo chat                         # interactive chat in the official ChatML format
    minimimo plan --flash --gpus 8 --gpu-memory 80GiB      # memory plan per device: does it fit?
    minimimo plan --flash --tensor-parallel 8 --gpu-memory 80GiB   # the same per tensor-parallel rank
    minimimo verify --model PATH          # minimimo vs the official implementation (transformers)
    torchrun --nproc-per-node N -m minimimo generate --model PATH --prompt ...   # tensor parallel

`minimimo COMMAND --help` lists a command's options with their defaults. `--model PATH` picks a
checkpoint directory; without it, the embedded default (`minimimo.default_checkpoint()`).

Bad input (a number out of range, a size without a unit, a folder that is not a checkpoint) ends
with one line that names it and exit status 2, never a traceback. Output piped into a reader that
stops early (`| head`) ends quietly.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from .chat import ContextFull, Conversation
from .checkpoint import load, resolve
from .config import MiMoConfig, human
from .defaults import default_checkpoint
from .generate import stream
from .parallel import end_process_group, init_from_env
from .speculative import SpeculativeStats
from .static_decode import CompileError
from .tokenizer import Tokenizer

# Decode threads. A small model decodes a token as a few dozen small matrix products: shared over
# threads, each product waits for its slowest thread, and when another process holds a core that
# wait is a whole scheduler time slice. `bench/threads.py` measures it (its docstring has the
# figures): on the embedded default, one thread beats torch's default of one per core, alone and
# beside a busy process. A large model on an idle machine gains from more: `--threads`.
DEFAULT_THREADS = 1


# ---------------------------------------------------------------------- printing
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


# ---------------------------------------------------------------------- loading
def load_model(directory: Path, args):
    """Load for this process: a tensor-parallel shard under torchrun (only rank 0 prints), else placed
    over --devices (with --weight-dtype), else on one device."""
    if init_from_env():
        import torch.distributed as dist

        if dist.get_rank() != 0:
            sys.stdout = sys.stderr = open(os.devnull, "w")  # every rank computes, rank 0 speaks
    kept = "fp8" if args.weight_dtype == "fp8" else None  # --weight-dtype bf16/fp32: dequantized into that dtype
    dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(args.weight_dtype, None if kept else args.dtype)
    if torch.distributed.is_initialized():  # each rank keeps its slice (in FP8 with --weight-dtype fp8)
        return load(directory, dtype=dtype, weight_dtype=kept, tensor_parallel=True, progress=False)
    return load(directory, dtype=dtype, devices=args.devices, weight_dtype=kept)


def load_with_tokenizer(args):
    directory = resolve(args.model) if args.model else default_checkpoint()  # a folder or a hub id
    model = load_model(directory, args)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory}: no tokenizer.json, so text cannot be encoded (`minimimo demo` "
                                "runs without one)")
    return directory, model, Tokenizer.from_pretrained(directory)


# ---------------------------------------------------------------------- generating
def stream_text(model, tokenizer, prompt_ids, args, stop_ids, *, interruptible: bool = False, stats=None):
    """Prints the continuation as it comes; returns (new ids, decode tokens/s, tokens/s including
    the prefill, interrupted). The decode rate starts when the prefill has chosen the first token,
    with or without MTP drafting (`args.mtp_steps`, acceptance lengths into `stats`).

    interruptible: Ctrl-C ends this continuation (interrupted=True) instead of the program.
    """
    decoder = tokenizer.incremental_decoder(skip_special_tokens=True)
    ids = torch.tensor([prompt_ids])
    new, start, first, interrupted = [], time.perf_counter(), None, False
    try:
        for token in stream(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_token_ids=stop_ids,
                            mtp_steps=getattr(args, "mtp_steps", 0) or 0, stats=stats,
                            compile=getattr(args, "compile", False)):
            if first is None:
                first = time.perf_counter()  # prefill done, first token chosen
            token_id = int(token[0])
            new.append(token_id)
            if token_id in stop_ids:
                break
            print(decoder.push(token_id), end="", flush=True)
    except KeyboardInterrupt:
        if not interruptible:
            raise
        interrupted = True
    print(decoder.flush(), flush=True)
    end = time.perf_counter()
    decode = (len(new) - 1) / (end - first) if len(new) > 1 and end > first else float("nan")
    overall = len(new) / (end - start) if new else float("nan")
    return new, decode, overall, interrupted


def cmd_generate(args) -> int:
    _, model, tokenizer = load_with_tokenizer(args)
    prompt_ids = tokenizer.encode(args.prompt)
    print(args.prompt, end="", flush=True)
    stop_ids = tokenizer.eos_token_ids if args.stop_at_eos else []
    if args.mtp_steps:
        return generate_speculative(model, tokenizer, prompt_ids, args, stop_ids)
    new, decode, overall, _ = stream_text(model, tokenizer, prompt_ids, args, stop_ids)
    print(f"\n[{len(prompt_ids)} prompt tokens, {len(new)} new tokens, decode {decode:.1f} tokens/s, "
          f"{overall:.1f} tokens/s with the prefill]", file=sys.stderr)
    return 0


def generate_speculative(model, tokenizer, prompt_ids, args, stop_ids) -> int:
    """MTP drafting: the text as it is accepted, then the rates (comparable with plain `generate`'s)
    and the acceptance length with its histogram."""
    stats = SpeculativeStats(args.mtp_steps)
    new, decode, overall, _ = stream_text(model, tokenizer, prompt_ids, args, stop_ids, stats=stats)
    print(f"\n[{len(prompt_ids)} prompt tokens, {len(new)} new tokens, decode {decode:.1f} tokens/s, "
          f"{overall:.1f} tokens/s with the prefill, mtp_steps={args.mtp_steps}, "
          f"mean acceptance length {stats.mean_accept_length:.2f}]", file=sys.stderr)
    histogram = stats.histogram()
    for n, count in histogram.items():
        bar = "#" * round(40 * count / max(1, max(histogram.values())))
        print(f"  {n} token{'s' if n > 1 else ' '} per forward: {count:4d} {bar}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- chat
def read_line(prompt: str) -> str | None:
    """One line from the user; None at the end of input or on Ctrl-C at the prompt."""
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return None


def cmd_chat(args) -> int:
    _, model, tokenizer = load_with_tokenizer(args)
    context = model.config.max_position_embeddings
    if args.max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
                         f"{context}-token context of this model")
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is refused, not fatal
    conversation = Conversation()
    print("chat with the model; an empty line, /exit or Ctrl-D ends it; Ctrl-C stops a reply", file=sys.stderr)
    while (line := read_line("you> ")) is not None:
        line = line.strip()
        if not line or line == "/exit":
            break
        if (problem := not_utf8(line)) is not None:
            print(f"[that line is not UTF-8 text ({problem}); not sent]", file=sys.stderr)
            continue
        conversation.add_user(line)
        before = len(conversation.messages)
        try:
            prompt_ids = conversation.prompt_ids(tokenizer, enable_thinking=args.think,
                                                 max_tokens=context - args.max_new_tokens)
        except ContextFull as err:
            print(f"[not sent: {err} ({context} tokens, less --max-new-tokens {args.max_new_tokens} for the "
                  "reply); the conversation goes on without it]", file=sys.stderr)
            continue
        if len(conversation.messages) < before:
            print(f"[context full: the {before - len(conversation.messages)} oldest messages are forgotten]",
                  file=sys.stderr)
        print("mimo> ", end="", flush=True)
        new, decode, _, interrupted = stream_text(model, tokenizer, prompt_ids, args, tokenizer.eos_token_ids,
                                                  interruptible=True)
        reply = new[:-1] if new and new[-1] in tokenizer.eos_token_ids else new
        conversation.add_assistant(tokenizer.decode(reply))
        print("[reply stopped]" if interrupted else f"[{decode:.1f} tokens/s]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- the other commands
def cmd_demo(args) -> int:
    directory = resolve(args.model) if args.model else default_checkpoint()  # a folder or a hub id
    print(f"checkpoint   {directory}")
    t0 = time.perf_counter()
    model = load_model(directory, args)
    report = model.load_report
    print(f"loaded       {report.tensors} tensors from {report.files} files in {time.perf_counter() - t0:.2f}s "
          f"({report.fp8_tensors} FP8, grids {report.grids}, {report.mtp_blocks} MTP blocks)")
    print_config(model.config)
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_pretrained(directory)
        # a module-level function after an import: where the 5M-parameter default writes its most
        # Python-like code (bench/quality.py measures how often its continuations parse; with a
        # class skeleton it soon repeats one attribute line)
        prompt = "import sys\n\n\ndef main(argv):\n"
        print(f"generate     greedy continuation of {prompt!r}:\n")
        print(prompt, end="")
        args.temperature, args.top_k, args.top_p, args.seed = 0.0, 0, 1.0, None
        new, decode, _, _ = stream_text(model, tokenizer, tokenizer.encode(prompt), args, tokenizer.eos_token_ids)
        print(f"\n[{len(new)} new tokens, decode {decode:.1f} tokens/s]")
    return 0


def cmd_info(args) -> int:
    config = MiMoConfig.flash() if args.flash else MiMoConfig.from_pretrained(args.model or default_checkpoint())
    print_config(config)
    print_memory_table(config)
    return 0


def cmd_plan(args) -> int:
    from .plan import PlanError, plan, tensor_parallel_plan

    source = MiMoConfig.flash() if args.flash or not args.model else args.model
    if args.tensor_parallel:
        the_plan = tensor_parallel_plan(source, world=args.tensor_parallel, device_memory=args.gpu_memory,
                                        weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype, context=args.context,
                                        batch=args.batch)
    else:
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

    report = verify(args.model, dtype=args.dtype, devices=args.devices, weight_dtype=args.weight_dtype,
                    tokens=args.tokens)
    print(report.summary())
    return 0 if report.ok(args.atol) else 1


# ---------------------------------------------------------------------- argument types
# Each turns one command-line string into a value or refuses it with a message that argparse
# prints after the option's name ("argument --seed: must be ...").
def integer(low: int, high: int | None = None):
    """An int in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


def real(low: float, high: float | None = None, *, low_open: bool = False):
    """A finite float in [low, high] (or (low, high] with low_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            interval = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text!r}")
        return value
    return parse


def not_utf8(text: str) -> str | None:
    """None for text that is valid UTF-8; else where it is not. Python keeps undecodable bytes of
    the command line and of stdin as lone surrogates (U+DC80..U+DCFF), which cannot be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character {bad!r}"
        return f"{byte} at character {err.start}"
    return None


def prompt_text(text: str) -> str:
    if (problem := not_utf8(text)) is not None:
        raise argparse.ArgumentTypeError(f"not UTF-8 text: {problem}")
    if not text:
        raise argparse.ArgumentTypeError("empty prompt")
    return text


def device_list(text: str) -> list[str]:
    """"cuda:0,cuda:1" -> ["cuda:0", "cuda:1"]; each must be a torch device name."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} does not name a device in every place: give a comma-separated "
                                         "list such as cuda:0,cuda:1 or cpu")
    for name in names:
        try:
            torch.device(name)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"{name!r} is not a device name (cpu, cuda:0, ...)") from None
    return names


def memory_size(text: str) -> str:
    """"80GiB" or "141GB", checked here and read by `plan.parse_memory`. A unit is required: a bare
    "80" would be 80 bytes, which nobody means."""
    from .plan import parse_memory

    if text.strip().replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"give a unit: {text.strip()}GiB (2**30 bytes) or {text.strip()}GB (10**9)")
    try:
        size = parse_memory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return text


# ---------------------------------------------------------------------- the parser
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks; shows each option's default, unless it has none or is a
    switch (an option without a value, nargs == 0)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line: `minimimo plan: error: argument --gpus: ... (see --help)`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model(p, *, required: bool = False) -> None:
    p.add_argument("--model", required=required,
                   help="checkpoint directory in the hub layout" + ("" if required else "; default: the embedded one"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the weights and activations")
    p.add_argument("--devices", type=device_list,
                   help="place the layers over these devices, e.g. cuda:0,cuda:1 (or cpu,cpu); default: one device")
    p.add_argument("--weight-dtype", choices=["fp8", "bf16", "fp32"],
                   help="how to keep the weights on the devices; fp8 keeps FP8 weights in FP8 (the rest bf16); "
                        "default: all in --dtype")
    p.add_argument("--threads", type=integer(1), default=DEFAULT_THREADS,
                   help="CPU threads for torch; few suit a small model (see bench/threads.py)")


def add_sampling(p, max_new_tokens: int) -> None:
    add_model(p)
    p.add_argument("--max-new-tokens", type=integer(1), default=max_new_tokens, help="most tokens to generate")
    p.add_argument("--temperature", type=real(0), default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=integer(0), default=0, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=real(0, 1, low_open=True), default=1.0,
                   help="sample among the most likely tokens whose probabilities add up to p; 1 = all")
    p.add_argument("--seed", type=integer(0, 2**64 - 1), help="random seed of the sampling; default: fresh each run")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="minimimo", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"minimimo {_version()}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    def command(name: str, summary: str, func, **defaults):
        p = sub.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
        p.set_defaults(func=func, **defaults)
        return p

    p = command("demo", "load a checkpoint (default: the embedded one), show it, and generate greedily (the "
                "command when none is given)", cmd_demo)
    add_sampling(p, max_new_tokens=56)
    p = command("info", "configuration, parameter counts and KV-cache memory of a checkpoint", cmd_info)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="checkpoint directory or config.json; default: the embedded checkpoint")
    g.add_argument("--flash", action="store_true", help="the real MiMo-V2-Flash configuration instead")
    p = command("generate", "stream a continuation of --prompt, then the prompt and new token counts and tokens/s",
                cmd_generate)
    p.add_argument("--prompt", required=True, type=prompt_text, help="the text to continue (UTF-8)")
    p.add_argument("--no-stop", dest="stop_at_eos", action="store_false",
                   help="keep generating past end-of-text tokens")
    p.add_argument("--mtp-steps", type=integer(0), default=0,
                   help="draft this many tokens per step with the MTP blocks (1 to the checkpoint's number of "
                        "blocks) and print the acceptance histogram; 0 = plain decoding")
    p.add_argument("--compile", action="store_true",
                   help="decode with torch.compile (static_decode.py): compiling takes tens of seconds, "
                        "each step is then faster; pays off for long outputs (not with --mtp-steps)")
    add_sampling(p, max_new_tokens=64)
    p = command("chat", "interactive chat in the ChatML format (thinking off unless --think); when the context "
                "fills, the oldest turns are forgotten", cmd_chat)
    p.add_argument("--think", action="store_true", help="let the model open a <think> block before answering")
    add_sampling(p, max_new_tokens=256)
    p = command("plan", "memory plan: which device holds which layers, and whether it fits", cmd_plan)
    p.add_argument("--model", help="checkpoint directory or config.json; default: the real MiMo-V2-Flash (--flash)")
    p.add_argument("--flash", action="store_true", help="the real MiMo-V2-Flash configuration")
    p.add_argument("--gpus", type=integer(1), default=8, help="number of devices (layer placement)")
    p.add_argument("--tensor-parallel", type=integer(1), metavar="N", default=None,
                   help="plan tensor + expert parallelism over N ranks (torchrun) instead of layer placement")
    p.add_argument("--gpu-memory", type=memory_size, default="80GiB",
                   help="memory per device with its unit: 80GiB (2**30 bytes), 141GB (10**9 bytes)")
    p.add_argument("--weight-dtype", default="fp8", choices=["fp8", "bf16", "fp32"], help="how weights are kept")
    p.add_argument("--kv-dtype", default="bf16", help="dtype of the KV cache: bf16, fp16, fp32 or fp8")
    p.add_argument("--context", type=integer(1), default=4096, help="tokens per sequence the KV cache holds")
    p.add_argument("--batch", type=integer(1), default=1, help="sequences decoded at once")
    p = command("verify", "compare minimimo with the official implementation on a checkpoint (needs transformers)",
                cmd_verify)
    add_model(p, required=True)
    p.add_argument("--tokens", type=integer(1), default=32, help="prompt tokens run through both models")
    p.add_argument("--atol", type=real(0), default=1e-3, help="largest logit difference accepted")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["demo", *argv]  # `minimimo` alone, or with demo's options, is the demo
    args = build_parser().parse_args(argv)
    if hasattr(args, "threads"):
        torch.set_num_threads(args.threads)
    try:
        status = args.func(args)
        sys.stdout.flush()  # inside the try: a reader gone early is noticed here, not at exit
        return status
    except (ValueError, OSError, CompileError) as err:  # bad input (or no compiler), named: one line, no traceback
        if isinstance(err, BrokenPipeError):
            return closed_pipe()
        print(f"minimimo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130  # the shell's status for a program ended by Ctrl-C (128 + SIGINT)
    finally:
        end_process_group()


def closed_pipe() -> int:
    """The reader of our output went away (`minimimo info --flash | head -3`): stop quietly. Output
    still buffered would fail again at exit, so stdout is pointed at /dev/null first."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # what a program killed by SIGPIPE reports (128 + 13)
