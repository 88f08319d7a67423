"""The bundled model's quality, old checkpoint against new, side by side in one run.

    python bench/quality.py                      # old: the default before retraining (from git), new: the bundled one
    python bench/quality.py --old DIR --new DIR  # any two checkpoints
    python bench/quality.py --quick              # fewer prompts and tokens

Three measures, the same code and settings for both models, float32:

1. **Bits per byte** on `bench/heldout_code.py` (ordinary code written for this repository, in no
   training corpus), every token scored with a context of `--context` tokens (sliding windows,
   `minimimo.train.bits_per_byte`). Bits per byte, not loss per token, because the two models
   may have different tokenizers: the same text has the same bytes.
2. **Header continuations.** Greedy continuations of simple function and class headers (bare,
   and again with a one-line docstring written for them), and whether they parse as Python. The rule (printed by the script): header + continuation, cut
   before the first non-blank line that starts at column 0 (the block has ended); if the
   generation ran out of tokens instead, its last, possibly unfinished, line is dropped; then
   `ast.parse`; the kept part must add at least one non-blank line to the prompt (so an empty body,
   or a docstring prompt alone, fails).
3. **MTP acceptance** at k = 1..3 (`minimimo.generate(..., mtp_steps=k)`): mean tokens produced
   per main-model forward and the histogram of 1..k+1, on prompts cut from the held-out file.
   Every speculative output is checked to equal plain greedy.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's minimimo, installed or not

import minimimo  # noqa: E402
from minimimo.train import bits_per_byte  # noqa: E402

HELDOUT = REPO / "bench" / "heldout_code.py"
BUNDLED = "minimimo/checkpoints/mimo-tiny-python"
OLD_REVISION = "9cc0675"  # the last commit of the default trained for 24 + 9 minutes (before issue 13)
HEADERS = ["def is_even(n):", "def fibonacci(n):", "def reverse_string(s):", "def factorial(n):",
           "def read_lines(path):", "class Stack:", "class Point:", "def main():"]
DOCUMENTED = ['def is_even(n):\n    """Return True if n is even."""',
              'def fibonacci(n):\n    """Return the n-th Fibonacci number."""',
              'def reverse_string(s):\n    """Return s reversed."""',
              'def factorial(n):\n    """Return n factorial."""',
              'def read_lines(path):\n    """Return the lines of the file at path."""',
              'class Stack:\n    """A stack of items."""',
              'class Point:\n    """A point in the plane."""',
              'def main():\n    """Parse the command line and run."""']
PARSE_RULE = ("header + greedy continuation, cut before the first non-blank line at column 0 (the block "
              "ended); if generation stopped inside the block, its last line is dropped; then ast.parse, and the "
              "kept part must have at least one non-blank generated line (a prompt's docstring alone does not count)")


def checkpoint_from_git(revision: str, into: Path) -> Path:
    """The bundled checkpoint folder as it was at `revision`, extracted with `git archive`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, BUNDLED], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"git archive {revision} {BUNDLED}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / BUNDLED


def block_of(header: str, continuation: str, finished: bool) -> str:
    """The text that must parse (see PARSE_RULE)."""
    lines = continuation.split("\n")
    body = []
    for i, line in enumerate(lines):
        if i > 0 and line.strip() and not line[0].isspace():
            finished = True  # the block ended at this line
            break
        body.append(line)
    else:
        if not finished:
            body = body[:-1]
    return header + "\n".join(body)


def parses(header: str, block: str) -> bool:
    """Whether `block` parses and adds a non-blank line to `header` (see PARSE_RULE)."""
    if not block[len(header):].strip():
        return False
    try:
        ast.parse(block)
        return True
    except SyntaxError:  # IndentationError included
        return False


def continuations(model, tokenizer, eot: int, headers: list[str], max_new_tokens: int) -> list[tuple]:
    """(header, greedy continuation, the block that must parse, whether it parses) per header."""
    continuations = []
    for header in headers:
        prompt = torch.tensor([[eot] + tokenizer.encode(header + "\n")])
        out = minimimo.generate(model, prompt, max_new_tokens, stop_token_ids=[eot])
        new = out[0, prompt.shape[1]:].tolist()
        finished = eot in new
        continuation = "\n" + tokenizer.decode([t for t in new if t != eot])
        block = block_of(header, continuation, finished)
        continuations.append((header, continuation, block, parses(header, block)))
    return continuations


def held_out_prompts(tokenizer, n_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """Prompts cut at evenly spaced places of the held-out file (as bench/mtp.py does)."""
    ids = tokenizer.encode(HELDOUT.read_text())
    usable = len(ids) - prompt_tokens - 64
    return [ids[usable * i // max(1, n_prompts - 1):][:prompt_tokens] for i in range(n_prompts)]


def measure(name: str, directory: Path, args) -> dict:
    model = minimimo.load(directory, dtype=torch.float32, progress=False)
    tokenizer = minimimo.Tokenizer.from_pretrained(directory)
    eot = tokenizer.token_id("<|endoftext|>")
    text = HELDOUT.read_text()
    result = {"name": name, "folder": directory, "params": model.config.parameter_counts()["total"],
              "vocab": model.config.vocab_size,
              "bpb": bits_per_byte(model, [eot] + tokenizer.encode(text), len(text.encode()), args.context),
              "bytes_per_token": len(text.encode()) / len(tokenizer.encode(text))}

    result["continuations"] = continuations(model, tokenizer, eot, HEADERS[:args.headers], args.header_tokens)
    result["documented"] = continuations(model, tokenizer, eot, DOCUMENTED[:args.headers], args.header_tokens)

    stats = {}
    for k in range(1, 4):
        lengths = []
        for prompt in held_out_prompts(tokenizer, args.prompts, 96):
            ids = torch.tensor([prompt])
            plain = minimimo.generate(model, ids, args.new_tokens)
            spec, st = minimimo.generate(model, ids, args.new_tokens, mtp_steps=k, return_stats=True)
            if not torch.equal(spec, plain):
                raise AssertionError(f"{name}, k={k}: speculative output differs from plain greedy")
            lengths += st.accept_lengths
        stats[k] = (sum(lengths) / len(lengths), [lengths.count(n) for n in range(1, k + 2)])
    result["accept"] = stats
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", default=None, help=f"old checkpoint folder (default: {BUNDLED} at git {OLD_REVISION})")
    p.add_argument("--new", default=None, help="new checkpoint folder (default: the bundled one)")
    p.add_argument("--context", type=int, default=128, help="tokens of context for bits per byte")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.headers, args.header_tokens, args.prompts, args.new_tokens = (
        (3, 48, 2, 48) if args.quick else (len(HEADERS), 96, 6, 128))
    print(f"minimimo {minimimo.__version__} | torch {torch.__version__} | threads {torch.get_num_threads()} | float32")
    with tempfile.TemporaryDirectory() as tmp:
        old_dir = Path(args.old) if args.old else checkpoint_from_git(OLD_REVISION, Path(tmp))
        new_dir = Path(args.new) if args.new else minimimo.default_checkpoint()
        old, new = measure("old", old_dir, args), measure("new", new_dir, args)

    print(f"\n1. bits per byte on bench/heldout_code.py ({len(HELDOUT.read_bytes()):,} bytes), context {args.context} tokens")
    for r in (old, new):
        print(f"   {r['name']}: {r['bpb']:.3f} bits/byte  ({r['params']:,} parameters, vocab {r['vocab']}, "
              f"{r['bytes_per_token']:.2f} bytes/token)")
    print(f"   new / old: {new['bpb'] / old['bpb']:.3f}  ({100 * (1 - new['bpb'] / old['bpb']):.1f}% fewer bits per byte)")

    for n, key, what in ((2, "continuations", "headers"), (3, "documented", "headers with a one-line docstring")):
        print(f"\n{n}. greedy continuations of {args.headers} {what}, up to {args.header_tokens} tokens; "
              f"parse rule: {PARSE_RULE}")
        for r in (old, new):
            print(f"   {r['name']}: {sum(ok for *_, ok in r[key])} / {len(r[key])} parse")
        for (header, _, old_block, old_ok), (_, _, new_block, new_ok) in zip(old[key], new[key]):
            for name, block, ok in (("old", old_block, old_ok), ("new", new_block, new_ok)):
                print(f"\n   --- {name} {'parses' if ok else 'does NOT parse'}: {header.splitlines()[0]}")
                print("\n".join("   | " + line for line in block.split("\n")))

    print(f"\n4. MTP acceptance (tokens per main forward), {args.prompts} held-out prompts of 96 tokens, "
          f"{args.new_tokens} new tokens, greedy; speculative == plain greedy checked")
    for r in (old, new):
        for k, (mean, hist) in r["accept"].items():
            print(f"   {r['name']} k={k}: {mean:.2f}  histogram 1..{k + 1}: {hist}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
