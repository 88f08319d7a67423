"""Train the embedded default: a small MiMo on Python source, on the CPU, reproducibly.

    python -m minimimo.train --out minimimo/checkpoints/mimo-tiny-python     # ~25 + ~10 min, one core

It has the whole MiMo-V2-Flash architecture at laptop size: hybrid sliding/global attention with
sinks, a dense layer 0 then MoE layers with the sigmoid router, and three MTP blocks trained with
the MTP loss. The data is the source code of the running interpreter's standard library (on
every machine, no download); the tokenizer is a byte-level BPE trained on it with `tokenizers`.

Training recipe (the paper's, scaled down), phase 1:
* loss = CE(main next token) + mtp_weight * mean_k CE(MTP block k predicts token q + k + 2);
* AdamW (betas 0.9 / 0.95, weight decay 0.1), linear warm-up then cosine decay;
* auxiliary-loss-free balancing: after every step each router's `e_score_correction_bias` moves
  by `bias_rate * sign(mean load - load)` — under-used experts become easier to choose. The
  bias never gets a gradient and never changes the expert weights, only the choice.

Phase 2 (`distill_mtp`) freezes the main model, read back from the phase-1 checkpoint, and trains
only the MTP blocks to match the main model's own next-token distributions (KL divergence): a
drafter is judged by agreement with the model it drafts for, and a small model's MTP blocks
trained on corpus tokens alone agree with it too rarely (mean acceptance ~2.0 at k = 3).

The checkpoint is written in the official hub layout (config.json, index, per-layer shards,
`model_mtp.safetensors`, tokenizer.json) in bfloat16, with a `training.json` of what was done.
The run is a fixed number of steps from a seed, so it repeats on the same interpreter.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from .config import MiMoConfig
from .hub import save_checkpoint
from .model import MiMoForCausalLM
from .moe import Router, update_correction_bias_
from .mtp import mtp_hidden_input, mtp_logits
from .tokenizer import ENDOFTEXT, save_tokenizer, train_bpe_tokenizer

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__", "ensurepip"}


def stdlib_sources(max_chars: int) -> list[str]:
    """The interpreter's own standard-library .py files, sorted by path, up to max_chars."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


def small_config(vocab_size: int) -> MiMoConfig:
    """The default's shape: 8 layers (GSSSSGSS), 8 experts top-2, window 32, 3 MTP blocks."""
    return MiMoConfig.tiny(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, moe_intermediate_size=192,
        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1, head_dim=48, v_head_dim=32,
        swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=48, swa_v_head_dim=32,
        sliding_window_size=32, n_routed_experts=8, num_experts_per_tok=2, num_mtp_layers=3,
        max_position_embeddings=4096, torch_dtype="bfloat16", attention_value_scale=0.707)


def mtp_loss(model, ids: torch.Tensor, h_last: torch.Tensor) -> torch.Tensor:
    """Mean over blocks of CE(block k at position q -> token q + k + 2), teacher-forced."""
    b, t = ids.shape
    hidden = mtp_hidden_input(model, h_last)
    losses = []
    for k in range(model.config.num_mtp_layers):
        n = t - k - 2
        positions = torch.arange(n).expand(b, n)
        logits = mtp_logits(model, k, ids[:, k + 1:k + 1 + n], hidden[:, :n], positions)
        losses.append(F.cross_entropy(logits.flatten(0, 1), ids[:, k + 2:k + 2 + n].flatten()))
    return torch.stack(losses)


def distill_mtp(directory: Path, texts: list[str], *, steps: int, batch: int, seq: int, lr: float, seed: int) -> list:
    """Phase 2: teach the MTP blocks to agree with the main model they draft for.

    The main model (frozen) is read back from the phase-1 checkpoint; block k at position q learns
    the main model's own next-token distribution at q + k + 1 (KL divergence) instead of the
    corpus token. Greedy drafting is judged by agreement with the main model, so this is the
    target that raises the acceptance length (self-distillation, as EAGLE-style drafters do)."""
    from .checkpoint import load
    from .tokenizer import Tokenizer

    model = load(directory, dtype=torch.float32, progress=False)
    tokenizer = Tokenizer.from_pretrained(directory)
    eot = tokenizer.token_id(ENDOFTEXT)
    ids = []
    for encoding in tokenizer.backend.encode_batch(texts):
        ids += encoding.ids + [eot]
    data = torch.tensor(ids, dtype=torch.long)
    model.requires_grad_(False)
    mtp_params = list(model.model.mtp.parameters())
    for p in mtp_params:
        p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(mtp_params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    history = []
    for step in tqdm(range(steps), desc="distilling MTP", unit="step"):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        tokens = torch.stack([data[s:s + seq] for s in starts.tolist()])
        with torch.no_grad():
            h_last = model.trunk(tokens)[-1]
            teacher = model.logits(h_last).log_softmax(-1)  # [b, t, V]: main's next-token distribution
        hidden = mtp_hidden_input(model, h_last)
        losses = []
        for k in range(model.config.num_mtp_layers):
            n = seq - k - 1
            positions = torch.arange(n).expand(batch, n)
            student = mtp_logits(model, k, tokens[:, k + 1:k + 1 + n], hidden[:, :n], positions).log_softmax(-1)
            losses.append(F.kl_div(student, teacher[:, k + 1:k + 1 + n], log_target=True, reduction="batchmean") / n)
        loss = torch.stack(losses).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            history.append({"step": step, "kl": [round(x.item(), 4) for x in losses]})
    model.eval()
    return model, history


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "checkpoints" / "mimo-tiny-python"))
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--corpus-chars", type=int, default=8_000_000)
    p.add_argument("--mtp-weight", type=float, default=0.5)
    p.add_argument("--bias-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)  # one thread: steady on a shared machine
    p.add_argument("--distill-steps", type=int, default=800, help="phase 2: MTP self-distillation steps (0: skip)")
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--distill-only", action="store_true",
                   help="run phase 2 only, on the phase-1 checkpoint already in --out")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.distill_only:
        out = Path(args.out)
        summary = json.loads((out / "training.json").read_text())
        distill_phase(out, stdlib_sources(args.corpus_chars), args, summary)
        (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"distilled the MTP blocks of {out}")
        return 0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    texts = stdlib_sources(args.corpus_chars)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab)
    eot = tokenizer.token_to_id(ENDOFTEXT)
    ids = []
    for encoding in tokenizer.encode_batch(texts):
        ids += encoding.ids + [eot]
    data = torch.tensor(ids, dtype=torch.long)
    print(f"corpus: {len(texts)} stdlib files, {sum(map(len, texts)):,} chars, {len(data):,} tokens "
          f"(vocab {tokenizer.get_vocab_size()})")

    config = small_config(tokenizer.get_vocab_size())
    model = MiMoForCausalLM(config).init_weights(args.seed).train()
    with torch.no_grad():  # start the biases at zero: balancing moves them
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                param.zero_()
    counts = config.parameter_counts()
    print(f"model: {counts['total']:,} parameters ({counts['active']:,} active) + MTP {counts['mtp']:,}")

    loads = {}
    for name, module in model.named_modules():
        if isinstance(module, Router):
            module.register_forward_hook(lambda m, inp, out, name=name: loads.__setitem__(name, out[1]))
    routers = {name: m for name, m in model.named_modules() if isinstance(m, Router)}
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s:s + args.seq] for s in starts.tolist()])
        h_last = model.trunk(batch)[-1]
        logits = model.lm_head(model.model.norm(h_last))
        main_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        mtp = mtp_loss(model, batch, h_last)
        loss = main_loss + args.mtp_weight * mtp.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        for name, router in routers.items():  # auxiliary-loss-free balancing
            update_correction_bias_(router, loads[name], args.bias_rate)
        if step % 25 == 0 or step == args.steps - 1:
            row = {"step": step, "loss": round(main_loss.item(), 4), "mtp": [round(x, 4) for x in mtp.tolist()]}
            history.append(row)
            bar.set_postfix(loss=row["loss"], mtp=row["mtp"])

    model.eval()
    out = Path(args.out)
    save_checkpoint(model, out, dtype=torch.bfloat16, layout="hub")
    save_tokenizer(tokenizer, out)
    summary = {
        "what": "minimimo.train: small MiMo (full architecture) on the interpreter's stdlib source",
        "args": {**vars(args), "out": args.out if not Path(args.out).is_absolute() else Path(args.out).name},
        "corpus_files": len(texts), "corpus_tokens": len(data),
        "parameters": counts, "minutes_phase1": round((time.perf_counter() - start) / 60, 1), "history": history,
    }
    if args.distill_steps:  # phase 2 starts from the checkpoint on disk, as `--distill-only` does
        distill_phase(out, texts, args, summary)
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def distill_phase(out: Path, texts: list[str], args, summary: dict) -> None:
    start = time.perf_counter()
    model, history = distill_mtp(out, texts, steps=args.distill_steps, batch=args.batch, seq=args.seq,
                                 lr=args.distill_lr, seed=args.seed)
    save_checkpoint(model, out, dtype=torch.bfloat16, layout="hub")
    summary["distill_args"] = {"steps": args.distill_steps, "lr": args.distill_lr, "batch": args.batch,
                               "seq": args.seq, "seed": args.seed}
    summary["distill_history"] = history
    summary["minutes_phase2"] = round((time.perf_counter() - start) / 60, 1)


if __name__ == "__main__":
    raise SystemExit(main())
