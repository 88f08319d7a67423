"""The embedded default checkpoint: what `minimimo generate` / `chat` / the demo run without --model.

Until the bundled *trained* checkpoint ships (`minimimo/checkpoints/`), the default is a small
random MiMo that the package writes itself, once, in the official hub layout: per-layer files,
block-FP8 weights with `weight_scale_inv`, bf16 norms and `o_proj`, a float32 router, and a
byte-level BPE tokenizer trained on a few standard-library modules. Its text is noise; its
loading and generation paths are the real ones.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

BUNDLED = Path(__file__).parent / "checkpoints" / "mimo-tiny-python"


def cache_home() -> Path:
    return Path(os.environ.get("MINIMIMO_HOME", Path.home() / ".cache" / "minimimo"))


def default_checkpoint() -> Path:
    """Directory of the embedded default checkpoint (the bundled trained one when present)."""
    if (BUNDLED / "config.json").is_file():
        return BUNDLED
    return demo_checkpoint()


def demo_checkpoint() -> Path:
    from .config import MiMoConfig
    from .hub import save_checkpoint
    from .model import MiMoForCausalLM
    from .tokenizer import save_tokenizer, train_bpe_tokenizer

    directory = cache_home() / "demo-random-v2"
    if (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file():
        return directory
    import json
    import textwrap

    texts = [inspect.getsource(m) for m in (json, textwrap, inspect)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=512)
    model = MiMoForCausalLM(MiMoConfig.tiny(vocab_size=tokenizer.get_vocab_size())).init_weights(seed=0)
    save_checkpoint(model, directory, dtype=torch.bfloat16, fp8_block=16, layout="hub")
    save_tokenizer(tokenizer, directory)
    return directory
