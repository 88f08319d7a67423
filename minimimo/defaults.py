"""The embedded default checkpoint: what `minimimo generate` / `chat` / `demo` run without --model.

`minimimo/checkpoints/mimo-tiny-python` ships inside the package (12 MB): a small MiMo (8 layers,
hidden size 128, the full architecture: hybrid sliding/global attention with sinks, a dense layer 0,
MoE layers with the biased sigmoid router, 3 MTP blocks) trained here on Python's standard library
with `python -m minimimo.train`, stored in bfloat16 in the official hub layout (per-layer files,
index, `config.json`, `tokenizer.json`). Its training settings are in its `training.json`.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).parent / "checkpoints" / "mimo-tiny-python"


def default_checkpoint() -> Path:
    """Directory of the bundled checkpoint."""
    if not (BUNDLED / "config.json").is_file():
        raise FileNotFoundError(f"the bundled checkpoint is missing from this installation ({BUNDLED}): "
                                "reinstall minimimo, or pass a checkpoint folder with --model")
    return BUNDLED
