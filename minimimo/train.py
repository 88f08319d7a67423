"""Train the embedded default: a small MiMo on Python source, on the CPU, reproducibly, resumably.

    python -m minimimo.train --out minimimo/checkpoints/mimo-tiny-python --work <scratch folder>   # one core

The bundled run took 2 h 23 min: phase 1 83.5 min, phase 2 59.3 (its pool 14.1, the trunk's
states of the pool once, then 7,000 steps with the blocks under bfloat16 autocast).

It has the whole MiMo-V2-Flash architecture at laptop size: hybrid sliding/global attention with
sinks, a dense layer 0 then MoE layers with the sigmoid router, and three MTP blocks. The data is
the source code of the running interpreter's standard library, tests included (on every machine,
no download): every `.py` file that parses, with its docstrings cut to their first paragraph
(`summary_docstrings`). One file in 50, chosen by a hash of its path, is held out for validation;
`bench/heldout_code.py` (code in no corpus) is a second validation text. The tokenizer is a
byte-level BPE trained on the training files.

Phase 1, the main model:
* loss = CE(main next token), optionally + mtp_weight * mean_k CE(MTP block k predicts token
  q + k + 2) (the paper's joint MTP loss). The default weight is 0: at this size the MTP loss
  costs ~40% of a step and competes with the main loss for a few million parameters, while
  phase 2 trains the blocks for what drafting needs (measured on this machine: one thread, a
  step of 32 x 128 tokens takes 1.2 s without the MTP loss and 1.9 s with it);
* AdamW (betas 0.9 / 0.95, weight decay 0.1 on matrices), linear warm-up then cosine decay to
  10% of the peak learning rate;
* auxiliary-loss-free balancing: after every step each router's `e_score_correction_bias` moves
  by `bias_rate * sign(mean load - load)` - under-used experts become easier to choose. The
  bias never gets a gradient and never changes the expert weights, only the choice.

Phase 2 (`distill_mtp`) freezes the main model, read back from the phase-1 checkpoint, and trains
only the MTP blocks to match the main model's own next-token distributions (KL divergence): a
drafter is judged by agreement with the model it drafts for (self-distillation, as EAGLE-style
drafters are trained). By default every batch is text the main model wrote itself (greedy
continuations of corpus prompts), the inputs the blocks see when drafting. The pool of that text
must be large. Two more things raise acceptance: a block's draft counts only where the blocks
before it were accepted at the same position, so each block's loss weighs those positions 1 and the
others `--distill-chain-floor` (`chain_weights`); and a cross-entropy term on the main model's
argmax (`--distill-top1`), the one token a greedy draft must hit, joins the KL. Measured on this
default (`bench/quality.py`, acceptance at k = 3 on held-out code): 3,000 steps on half corpus text,
half its own reached 2.53; 6,000 steps on a pool of 4,096 continuations 2.76, the blocks having
learned the pool by heart (teacher-forced agreement 0.90 on its rows, 0.81 on fresh ones); 7,000
steps on a pool of 32,768 (3.4 passes) 2.90, and twice the steps 2.90 again; the same 7,000 steps
with floor 0.25 3.01, and with the top-1 term as well (the default) 3.05. Screened at 2,000 steps:
floors 1 / 0.5 / 0.25 / 0.05 gave 2.48 / 2.50 / 2.54 / 2.48 on 24 prompts; 0 would divide by zero
where no block agrees.

Every few minutes the whole training state (weights, optimizer, step, random generator, history)
goes to `<work>/state.pt`; `--resume` continues from it and ends where an uninterrupted run ends.
Validation bits per byte (held-out text, every `--eval-every` steps) are printed and recorded.
The checkpoint is written in the official hub layout (config.json, index, per-layer shards,
`model_mtp.safetensors`, tokenizer.json) in bfloat16, with a `training.json` of what was done.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import shlex
import sysconfig
import time
import warnings
import zlib
from pathlib import Path

import torch
from torch.nn import functional as F

from .checkpoint import load
from .config import MiMoConfig
from .hub import save_checkpoint
from .model import MiMoForCausalLM
from .moe import Router, update_correction_bias_
from .mtp import mtp_hidden_input, mtp_logits
from .tokenizer import ENDOFTEXT, save_tokenizer, train_bpe_tokenizer

SKIP_DIRS = {"site-packages", "__pycache__", "ensurepip"}  # installed packages, caches, bundled wheels
HELD_OUT_ONE_IN = 50
HELDOUT_CODE = Path(__file__).resolve().parents[1] / "bench" / "heldout_code.py"  # in a source checkout


# ---------------------------------------------------------------------------------------- data
def stdlib_files(summaries: bool = True):
    """Yields (path relative to the stdlib, text) of every standard-library .py file that parses,
    in path order, with its docstrings cut to their summaries (`summary_docstrings`) unless
    `summaries` is False.

    Parsing is the filter: the test suite ships deliberately broken files (bad syntax, bad
    encodings) that would teach the model non-Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIP_DIRS & set(relative.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences and the like
                tree = ast.parse(text)
                if summaries:
                    text = summary_docstrings(text, tree)
                    ast.parse(text)  # the cut file still parses (checked, never assumed)
        except (UnicodeDecodeError, SyntaxError, ValueError, OSError):
            continue
        yield relative.as_posix(), text


DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def summary_docstrings(text: str, tree: ast.Module) -> str:
    """`text` with every multi-paragraph docstring cut to its first paragraph (the summary).

    The standard library documents in long prose; a model of a few million parameters cannot hold
    a paragraph of English together, and greedily continuing `def f(x):` it writes the opening of
    a docstring and never closes it ("the string, and the string, ..."). Trained on summaries, it
    learns that a docstring is a sentence or two and that code follows. Code, comments and
    one-paragraph docstrings are untouched; a docstring whose cut would need escaping is kept."""
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def offset(line: int, col_bytes: int) -> int:  # ast columns count UTF-8 bytes
        begin = line_starts[line - 1]
        return begin + len(text[begin:line_starts[line]].encode()[:col_bytes].decode())

    cuts = []
    for node in ast.walk(tree):
        body = getattr(node, "body", None) if isinstance(node, DOCSTRING_OWNERS) else None
        if not (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            continue
        literal = body[0].value
        start, end = offset(literal.lineno, literal.col_offset), offset(literal.end_lineno, literal.end_col_offset)
        source = text[start:end]
        prefix = len(source) - len(source.lstrip("rRuU"))
        quote = source[prefix:prefix + 3]
        if quote not in ('"""', "'''") or not source.endswith(quote):
            continue
        paragraphs = re.split(r"\n[ \t]*\n", source[prefix + 3:-3].strip())
        summary = paragraphs[0].rstrip()
        if len(paragraphs) == 1 or not summary or summary.endswith((quote[0], "\\")):
            continue
        cuts.append((start, end, source[:prefix + 3] + summary + quote))
    for start, end, new in sorted(cuts, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def is_validation(relative_path: str) -> bool:
    """The held-out rule: one file in HELD_OUT_ONE_IN by a hash of its path (stable under any
    order or subset of files)."""
    return zlib.crc32(relative_path.encode()) % HELD_OUT_ONE_IN == 0


def split_corpus(files, max_chars: int) -> tuple[list[str], list[str]]:
    """Training texts (in path order, until max_chars is reached) and the held-out texts met on the
    way (all of them when the whole library fits in max_chars)."""
    train, held_out, total = [], [], 0
    for relative, text in files:
        if total >= max_chars:
            break
        if is_validation(relative):
            held_out.append(text)
        else:
            train.append(text)
            total += len(text)
    return train, held_out


def encode_documents(tokenizer, texts: list[str], eot: int) -> torch.Tensor:
    """All texts as one token stream, each document followed by the end-of-text token."""
    ids = []
    for encoding in tokenizer.encode_batch(texts):
        ids += encoding.ids + [eot]
    return torch.tensor(ids, dtype=torch.long)


def random_batch(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    return torch.stack([data[s:s + seq] for s in starts.tolist()])


# ---------------------------------------------------------------------------------------- eval
@torch.no_grad()
def bits_per_byte(model, ids: list[int], n_bytes: int, context: int = 128) -> float:
    """Bits per byte of a text whose token ids are `ids` (first id: the end-of-text token that
    starts every document, so the first real token is scored too) and UTF-8 length `n_bytes`.

    Sliding windows of `context` tokens, stride context // 2: every token is scored once, with
    between context // 2 and context - 1 tokens before it (all of them near the start). Bits per
    byte compares models whatever their tokenizers: the same text, the same bytes."""
    if n_bytes <= 0 or len(ids) < 2:
        raise ValueError(f"bits_per_byte needs a non-empty text, got {n_bytes} bytes and {len(ids)} ids")
    was_training = model.training
    model.eval()
    stride, nats, scored = context // 2, 0.0, 1  # id 0 (end-of-text) is context, never a target
    for begin in range(0, len(ids) - 1, stride):
        window = torch.tensor(ids[begin:begin + context])[None]
        logits = model(window).float()[0, :-1]  # predicts window[1:]
        targets = window[0, 1:]
        first = scored - begin - 1  # skip targets an earlier window scored
        nats += F.cross_entropy(logits[first:], targets[first:], reduction="sum").item()
        scored = begin + window.shape[1]
        if scored >= len(ids):
            break
    model.train(was_training)
    return nats / math.log(2) / n_bytes


def validation_texts(held_out: list[str], max_chars: int) -> dict[str, str]:
    """Fixed validation texts: the first held-out stdlib files up to max_chars, and the repository's
    held-out code when this is a source checkout."""
    texts, stdlib = {}, ""
    for text in held_out:
        if len(stdlib) >= max_chars:
            break
        stdlib += text
    if stdlib:  # none when the corpus is cut before the first held-out file
        texts["stdlib_heldout"] = stdlib[:max_chars]
    if HELDOUT_CODE.is_file():
        texts["heldout_code"] = HELDOUT_CODE.read_text(encoding="utf-8")
    return texts


def evaluate(model, tokenizer, texts: dict[str, str], eot: int, context: int) -> dict[str, float]:
    return {name: round(bits_per_byte(model, [eot] + tokenizer.encode(text).ids, len(text.encode()), context), 4)
            for name, text in texts.items()}


# ---------------------------------------------------------------------------------------- model
def small_config(vocab_size: int, hidden_size: int = 128, window: int = 64) -> MiMoConfig:
    """The default's shape: 8 layers (GSSSSGSS), 8 experts top-2, 3 MTP blocks, heads of 48/32."""
    return MiMoConfig.tiny(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=3 * hidden_size,
        moe_intermediate_size=3 * hidden_size // 2, num_hidden_layers=8,
        num_attention_heads=hidden_size // 32, num_key_value_heads=1, head_dim=48, v_head_dim=32,
        swa_num_attention_heads=hidden_size // 32, swa_num_key_value_heads=2, swa_head_dim=48, swa_v_head_dim=32,
        sliding_window_size=window, n_routed_experts=8, num_experts_per_tok=2, num_mtp_layers=3,
        max_position_embeddings=4096, torch_dtype="bfloat16", attention_value_scale=0.707)


def mtp_loss(model, ids: torch.Tensor, h_last: torch.Tensor) -> torch.Tensor:
    """Per block k: CE(block k at position q -> token q + k + 2), teacher-forced."""
    b, t = ids.shape
    hidden = mtp_hidden_input(model, h_last)
    losses = []
    for k in range(model.config.num_mtp_layers):
        n = t - k - 2
        positions = torch.arange(n).expand(b, n)
        logits = mtp_logits(model, k, ids[:, k + 1:k + 1 + n], hidden[:, :n], positions)
        losses.append(F.cross_entropy(logits.flatten(0, 1), ids[:, k + 2:k + 2 + n].flatten()))
    return torch.stack(losses)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class Saver:
    """Writes the training state to `<work>/state.pt` every `minutes` (atomically: a kill during
    the write leaves the previous state)."""

    def __init__(self, work: Path, minutes: float):
        self.path, self.seconds, self.last = work / "state.pt", 60 * minutes, time.perf_counter()

    def maybe_save(self, state_fn, force: bool = False) -> None:
        if force or time.perf_counter() - self.last >= self.seconds:
            partial = self.path.with_suffix(".partial")
            torch.save(state_fn(), partial)
            partial.replace(self.path)
            self.last = time.perf_counter()

    def load(self, phase: str | None) -> dict | None:
        """The saved state if there is one of this phase (None: of any phase)."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=False)
        return state if phase is None or state["phase"] == phase else None


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# ---------------------------------------------------------------------------------------- phases
def train_main(args, work: Path, saver: Saver, resume: bool) -> dict:
    """Phase 1: writes the main model + MTP blocks to <work>/phase1; returns the summary."""
    start = time.perf_counter()
    train_texts, held_out = split_corpus(stdlib_files(args.docstrings == "summary"), args.corpus_chars)
    tokenizer_dir = work / "tokenizer"
    state = saver.load("main") if resume else None
    if state is not None:  # the same tokenizer (training it again would also give it, slower)
        import tokenizers
        tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    else:
        tokenizer = train_bpe_tokenizer(train_texts, vocab_size=args.vocab)
        save_tokenizer(tokenizer, tokenizer_dir)
    eot = tokenizer.token_to_id(ENDOFTEXT)
    data = encode_documents(tokenizer, train_texts, eot)
    val_texts = validation_texts(held_out, args.val_chars)
    log(f"corpus: {len(train_texts)} stdlib files, {sum(map(len, train_texts)):,} chars, {len(data):,} tokens "
        f"(vocab {tokenizer.get_vocab_size()}); held out: {len(held_out)} files")

    config = small_config(tokenizer.get_vocab_size(), args.hidden, args.window)
    model = MiMoForCausalLM(config).init_weights(args.seed).train()
    with torch.no_grad():  # start the biases at zero: balancing moves them
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                param.zero_()
    counts = config.parameter_counts()
    log(f"model: {counts['total']:,} parameters ({counts['active']:,} active) + MTP {counts['mtp']:,}")

    loads = {}
    for name, module in model.named_modules():
        if isinstance(module, Router):
            module.register_forward_hook(lambda m, inp, out, name=name: loads.__setitem__(name, out[1]))
    routers = {name: m for name, m in model.named_modules() if isinstance(m, Router)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and p.requires_grad]
    no_decay = [p for p in model.parameters() if p.dim() < 2 and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 50)
    gen = torch.Generator().manual_seed(args.seed)
    history, validation, first_step, elapsed = [], [], 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        history, validation, first_step, elapsed = state["history"], state["validation"], state["step"], state["seconds"]
        log(f"resumed phase 1 at step {first_step}")

    def snapshot(step):
        return {"phase": "main", "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": gen.get_state(), "history": history, "validation": validation,
                "seconds": elapsed + time.perf_counter() - start}

    for step in range(first_step, args.steps):
        if step % args.eval_every == 0:
            validation.append({"step": step, **evaluate(model, tokenizer, val_texts, eot, args.eval_context)})
            log(f"step {step} validation bits/byte {validation[-1]}")
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, warmup)
        batch = random_batch(data, args.batch, args.seq, gen)
        h_last = model.trunk(batch)[-1]
        logits = model.logits(h_last)
        main_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        loss = main_loss
        if args.mtp_weight:  # 0: the MTP blocks are left to phase 2 (their loss costs ~40% of a step)
            mtp = mtp_loss(model, batch, h_last)
            loss = loss + args.mtp_weight * mtp.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        for name, router in routers.items():  # auxiliary-loss-free balancing
            update_correction_bias_(router, loads[name], args.bias_rate)
        if step % 25 == 0 or step == args.steps - 1:
            history.append({"step": step, "loss": round(main_loss.item(), 4)})
            if args.mtp_weight:
                history[-1]["mtp"] = [round(x, 4) for x in mtp.tolist()]
            seconds = elapsed + time.perf_counter() - start
            log(f"step {step}/{args.steps} loss {history[-1]['loss']} mtp {history[-1].get('mtp', '-')} "
                f"lr {optimizer.param_groups[0]['lr']:.2e} {seconds / 60:.1f} min")
        saver.maybe_save(lambda: snapshot(step + 1), force=step + 1 == args.stop_at)
        if step + 1 == args.stop_at:
            raise SystemExit(f"stopped after step {args.stop_at} (--stop-at); continue with --resume")
    validation.append({"step": args.steps, **evaluate(model, tokenizer, val_texts, eot, args.eval_context)})
    log(f"final validation bits/byte {validation[-1]}")

    model.eval()
    save_checkpoint(model, work / "phase1", dtype=torch.bfloat16, layout="hub")
    save_tokenizer(tokenizer, work / "phase1")
    summary = {
        "corpus": {"source": "the interpreter's standard library: every .py file that parses, tests included, "
                             f"outside {sorted(SKIP_DIRS)}; sorted by path"
                             + ("; docstrings cut to their first paragraph" if args.docstrings == "summary" else ""),
                   "held_out_rule": f"crc32(path relative to the stdlib) % {HELD_OUT_ONE_IN} == 0",
                   "train_files": len(train_texts), "train_chars": sum(map(len, train_texts)),
                   "train_tokens": len(data), "held_out_files": len(held_out),
                   "validation_texts": {name: len(text) for name, text in val_texts.items()}},
        "parameters": counts, "history": history, "validation": validation,
        "validation_note": f"bits per byte, context {args.eval_context} tokens (bf16 export not applied)",
        "minutes_phase1": round((elapsed + time.perf_counter() - start) / 60, 1),
    }
    saver.maybe_save(lambda: {**snapshot(args.steps), "phase": "main_done", "summary": summary}, force=True)
    return summary


def distill_mtp(args, work: Path, saver: Saver, resume: bool) -> tuple[MiMoForCausalLM, dict]:
    """Phase 2: teach the MTP blocks to agree with the main model they draft for.

    The main model (frozen) is read back from the phase-1 checkpoint (bfloat16 weights, as
    shipped, computed in float32); block k at position q learns the main model's own next-token
    distribution at q + k + 1 (KL divergence) instead of the corpus token. Greedy drafting is
    judged by agreement with the main model, so this is the target that raises the acceptance
    length (self-distillation, as EAGLE-style drafters do). `agree` is the fraction of positions
    where block k's argmax equals the main model's.

    When drafting, block k's token input is the main model's own greedy choice (or the previous
    block's draft), not corpus text; so a fraction `distill_self` of every batch is text the main
    model wrote itself: a pool of greedy continuations of corpus prompts, generated once. Each
    block's loss may add a top-1 term and weigh positions by the earlier blocks' agreement
    (`--distill-top1`, `chain_weights`)."""
    from .tokenizer import Tokenizer

    start = time.perf_counter()
    model = load(work / "phase1", dtype=torch.float32, progress=False)
    tokenizer = Tokenizer.from_pretrained(work / "phase1")
    train_texts, _ = split_corpus(stdlib_files(args.docstrings == "summary"), args.corpus_chars)
    data = encode_documents(tokenizer.backend, train_texts, tokenizer.token_id(ENDOFTEXT))
    model.requires_grad_(False)
    mtp_params = list(model.model.mtp.parameters())
    for p in mtp_params:
        p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(mtp_params, lr=args.distill_lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    history, first_step, elapsed = [], 0, 0.0
    steps, seq, batch = args.distill_steps, args.seq, args.distill_batch
    n_self = round(batch * args.distill_self)
    state = saver.load("distill") if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        history, first_step, elapsed, pool = state["history"], state["step"], state["seconds"], state["pool"]
        log(f"resumed phase 2 at step {first_step}")
    elif n_self:
        model.eval()
        pool = self_written_pool(model, data, args.distill_pool, seq, args.seed + 2)
        model.train()
        log(f"self-written pool: {len(pool)} greedy continuations of {seq - seq // 4} tokens after "
            f"{seq // 4}-token corpus prompts, {(time.perf_counter() - start) / 60:.1f} min")
    else:
        pool = None
    pool_hidden = None
    if pool is not None:  # the frozen trunk's output on the pool, once (recomputed on resuming, not saved)
        pool_hidden = trunk_hidden(model, pool)
        log(f"the trunk's hidden states of the pool: {tuple(pool_hidden.shape)}, "
            f"{(elapsed + time.perf_counter() - start) / 60:.1f} min")
    autocast = dict(device_type=model.device.type, dtype=torch.bfloat16, enabled=args.distill_autocast == "bfloat16")

    def snapshot(step):
        return {"phase": "distill", "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": gen.get_state(), "history": history, "seconds": elapsed + time.perf_counter() - start,
                "summary": args.summary, "pool": pool}

    warmup = max(1, steps // 50)
    for step in range(first_step, steps):
        for group in optimizer.param_groups:
            group["lr"] = args.distill_lr * lr_factor(step, steps, warmup)
        with torch.no_grad():  # the frozen main model: its hidden states and next-token distributions
            rows = []  # (tokens, trunk hidden states): corpus rows, then rows of the pool
            if n_self < batch:
                corpus = random_batch(data, batch - n_self, seq, gen)
                rows.append((corpus, model.trunk(corpus)[-1]))
            if n_self:
                picked = torch.randint(0, len(pool), (n_self,), generator=gen)
                rows.append((pool[picked], pool_hidden[picked]))
            tokens, h_last = (torch.cat(parts) for parts in zip(*rows))
            teacher = model.logits(h_last).log_softmax(-1)  # [b, t, V]: main's next-token distribution
        hidden = mtp_hidden_input(model, h_last)
        losses, agree, right = [], [], []
        for k in range(model.config.num_mtp_layers):
            n = seq - k - 1
            positions = torch.arange(n).expand(batch, n)
            with torch.autocast(**autocast):  # the blocks' matmuls; weights, optimizer and loss in float32
                logits = mtp_logits(model, k, tokens[:, k + 1:k + 1 + n], hidden[:, :n], positions)
            student = logits.float().log_softmax(-1)
            target = teacher[:, k + 1:k + 1 + n]
            loss_at = F.kl_div(student, target, log_target=True, reduction="none").sum(-1)  # [b, n]
            if args.distill_top1:  # + CE on the main model's argmax, the token a greedy draft must hit
                loss_at = loss_at + args.distill_top1 * F.nll_loss(
                    student.flatten(0, 1), target.argmax(-1).flatten(), reduction="none").view(batch, n)
            weight = chain_weights(right, loss_at, args.distill_chain_floor)
            losses.append((weight * loss_at).sum() / weight.sum())
            right.append(student.argmax(-1) == target.argmax(-1))  # [b, n]
            agree.append(right[-1].float().mean().item())
        loss = torch.stack(losses).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            history.append({"step": step, "loss": [round(x.item(), 4) for x in losses], "agree": [round(a, 3) for a in agree]})
            seconds = elapsed + time.perf_counter() - start
            log(f"distill step {step}/{steps} loss {history[-1]['loss']} agree {history[-1]['agree']} {seconds / 60:.1f} min")
        saver.maybe_save(lambda: snapshot(step + 1))
    model.eval()
    summary = {"distill_args": {"steps": steps, "lr": args.distill_lr, "batch": batch, "seq": seq,
                                "seed": args.seed, "self_written_rows_per_batch": n_self,
                                "self_written_pool": 0 if pool is None else len(pool),
                                "autocast": args.distill_autocast, "chain_floor": args.distill_chain_floor,
                                "top1": args.distill_top1},
               "distill_history": history, "minutes_phase2": round((elapsed + time.perf_counter() - start) / 60, 1)}
    return model, summary


def chain_weights(right: list[torch.Tensor], loss_at: torch.Tensor, floor: float) -> torch.Tensor:
    """Weights [b, n] for the next block's loss at positions 0 .. n-1 (`loss_at`, [b, n]), from
    right[j] [b, >= n]: where block j's argmax equalled the main model's.

    In a drafting cycle every block predicts from the same position q (block k guesses token
    q + k + 2), and block k's draft counts only if blocks 0 .. k-1 were all accepted at that q.
    So the next block's loss at q weighs 1 where the blocks before it all agreed with the main
    model there and `floor` elsewhere: its few parameters go to the positions where its draft
    can be accepted. floor = 1 weighs every position alike (block 0 always does)."""
    if not right:
        return torch.ones_like(loss_at)
    n = loss_at.shape[1]
    chain = torch.stack([r[:, :n] for r in right]).all(0).to(loss_at.dtype)
    return floor + (1.0 - floor) * chain


@torch.no_grad()
def self_written_pool(model, data: torch.Tensor, rows: int, seq: int, seed: int, chunk: int = 128) -> torch.Tensor:
    """`rows` sequences [rows, seq] of the model's own text: random corpus prompts of seq // 4
    tokens, each continued greedily to seq tokens. Generated `chunk` rows at a time: on one thread
    a row costs 24 ms at 128 rows against 42 ms at 32 (the bundled model, 96 new tokens)."""
    from .generate import generate

    gen, prompt_len, pool = torch.Generator().manual_seed(seed), seq // 4, []
    for first in range(0, rows, chunk):
        prompts = random_batch(data, min(chunk, rows - first), prompt_len, gen)
        pool.append(generate(model, prompts, seq - prompt_len))
    return torch.cat(pool) if pool else torch.empty(0, seq, dtype=torch.long)


@torch.no_grad()
def trunk_hidden(model, rows: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """The trunk's last hidden states (before the final norm) of token rows [n, t] -> [n, t, c],
    float32, computed `chunk` rows at a time. Phase 2 never changes the trunk, so a pool row's
    hidden states are the same at every pass: computing them once saves the trunk's forward pass,
    about a third of a step (185 of 552 ms, one thread)."""
    was_training = model.training
    model.eval()
    hidden = torch.cat([model.trunk(rows[i:i + chunk])[-1].float() for i in range(0, len(rows), chunk)])
    model.train(was_training)
    return hidden


def command_line(args) -> str:
    """The command that repeats this run (output folder relative, no scratch paths)."""
    defaults = parser().parse_args([])
    parts = ["python -m minimimo.train", "--out minimimo/checkpoints/mimo-tiny-python", "--work <scratch folder>"]
    for key, value in vars(args).items():
        if key not in ("out", "work", "resume", "summary", "stop_at") and value != getattr(defaults, key):
            parts.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
    return " ".join(parts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "checkpoints" / "mimo-tiny-python"))
    p.add_argument("--work", required=False, default=None,
                   help="scratch folder for the training state, the phase-1 checkpoint and the tokenizer")
    p.add_argument("--resume", action="store_true", help="continue from <work>/state.pt")
    p.add_argument("--steps", type=int, default=3800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--window", type=int, default=64, help="sliding-window size of the local layers")
    p.add_argument("--corpus-chars", type=int, default=100_000_000, help="cap on training text (default: all)")
    p.add_argument("--docstrings", choices=["summary", "full"], default="summary",
                   help="cut the corpus's docstrings to their first paragraph (summary_docstrings) or keep them")
    p.add_argument("--val-chars", type=int, default=30_000, help="held-out stdlib text validated on")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-context", type=int, default=128)
    p.add_argument("--mtp-weight", type=float, default=0.0,
                   help="phase-1 MTP loss weight (0: the MTP blocks learn only in phase 2, by distillation)")
    p.add_argument("--bias-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)  # one thread: steady on a shared machine
    p.add_argument("--save-minutes", type=float, default=4.0, help="write the training state this often")
    p.add_argument("--stop-at", type=int, default=None,
                   help="save the state and stop after this phase-1 step, as a killed run would (tests resuming)")
    p.add_argument("--distill-steps", type=int, default=7000, help="phase 2: MTP self-distillation steps (0: skip)")
    p.add_argument("--distill-lr", type=float, default=2e-3)
    p.add_argument("--distill-batch", type=int, default=16)
    p.add_argument("--distill-self", type=float, default=1.0,
                   help="fraction of each phase-2 batch taken from the main model's own greedy text")
    p.add_argument("--distill-pool", type=int, default=32768, help="greedy continuations in that pool")
    p.add_argument("--distill-chain-floor", type=float, default=0.25,
                   help="weight of a block's loss where an earlier block's draft was wrong (1: every "
                        "position alike; see chain_weights)")
    p.add_argument("--distill-top1", type=float, default=0.5,
                   help="weight of a cross-entropy term on the main model's argmax, added to the KL")
    p.add_argument("--distill-autocast", choices=["bfloat16", "none"], default="bfloat16",
                   help="run the MTP blocks' matmuls in bfloat16 (torch.autocast; weights stay float32): "
                        "a step 1.4x faster on a CPU with bfloat16 instructions (none: on one without)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not 0 < args.distill_chain_floor <= 1:  # 0 would weigh a batch where no block agrees at all by 0 / 0
        p.error(f"--distill-chain-floor must be in (0, 1], got {args.distill_chain_floor}")
    if args.distill_top1 < 0:
        p.error(f"--distill-top1 must be >= 0, got {args.distill_top1}")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.name + "-work")
    work.mkdir(parents=True, exist_ok=True)
    saver = Saver(work, args.save_minutes)
    state = saver.load(None) if args.resume else None
    if state is not None and state["phase"] in ("main_done", "distill"):
        summary = state["summary"]  # phase 1 is on disk in <work>/phase1
    else:
        summary = train_main(args, work, saver, args.resume)
    args.summary = summary
    if args.distill_steps:
        model, distilled = distill_mtp(args, work, saver, args.resume)
        summary.update(distilled)
    else:
        model = load(work / "phase1", dtype=torch.float32, progress=False)
    save_checkpoint(model, out, dtype=torch.bfloat16, layout="hub")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((work / "phase1" / name).read_bytes())
    record = {
        "what": "minimimo.train: small MiMo (full architecture) on the interpreter's standard-library source",
        "command": command_line(args),
        "interpreter": f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))}, torch {torch.__version__}",
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "work", "resume", "summary", "stop_at")},
        **summary,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
