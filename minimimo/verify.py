"""`minimimo verify`: minimimo against the official implementation on the same checkpoint.

    python -m minimimo verify --model path/to/MiMo-V2-Flash [--devices cuda:0,...,cuda:7]

Both models read the same folder; a fixed prompt runs through both; the report gives the top-1
agreement and the largest logit difference. The official implementation is Hugging Face
transformers (`MiMoV2FlashForCausalLM`), imported here only, never by the rest of minimimo.

Two things can make the official model differ from minimimo for reasons that are not bugs of
minimimo, and the report says when they apply:
* transformers ignores several hub keys (layer pattern, `swa_*`, thetas, rotary factor, epsilon)
  and uses built-in values; a checkpoint whose config departs from them is not comparable;
* transformers' own FP8 dequantization infers a uniform block height (rows // scale rows), which
  is wrong for the per-head grid of the released global-layer `k_proj`: its 768 rows are 4 heads
  of 192, each quantized as a block of 128 rows and one of 64, hence a `weight_scale_inv` of 8
  rows (as the checkpoint's safetensors headers show) where uniform 128-row blocks would need 6,
  and transformers reads 768 / 8 = 96-row blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import load
from .config import MiMoConfig


@dataclass
class VerifyReport:
    tokens: int
    top1_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    minimimo_seconds: float
    official_seconds: float
    warnings: list[str] = field(default_factory=list)

    def ok(self, atol: float) -> bool:
        return self.top1_agreement >= 0.99 and self.max_abs_diff <= atol

    def summary(self) -> str:
        lines = [f"prompt tokens        {self.tokens}",
                 f"top-1 agreement      {self.top1_agreement:.2%}",
                 f"max |logit diff|     {self.max_abs_diff:.3g}",
                 f"mean |logit diff|    {self.mean_abs_diff:.3g}",
                 f"forward time         minimimo {self.minimimo_seconds:.2f}s, official {self.official_seconds:.2f}s"]
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def official_rule_warnings(config: MiMoConfig) -> list[str]:
    """Where this config departs from the values transformers 5.23 hard-codes."""
    n = config.num_hidden_layers
    checks = [
        (config.hybrid_layer_pattern == [0 if i == 0 or (i + 1) % 6 == 0 else 1 for i in range(n)],
         "hybrid_layer_pattern differs from the built-in rule (global at 0 and (i+1) % 6 == 0)"),
        (config.moe_layer_freq == [0] + [1] * (n - 1), "moe_layer_freq differs from the built-in [0] + [1]*(L-1)"),
        (config.swa_num_key_value_heads == 2 * config.num_key_value_heads, "swa kv heads != 2 x kv heads"),
        (config.swa_num_attention_heads == config.num_attention_heads
         and config.swa_head_dim == config.head_dim and config.swa_v_head_dim == config.v_head_dim,
         "sliding-layer head geometry differs from the global one"),
        ((config.rope_theta, config.swa_rope_theta) == (5e6, 1e4), "rope thetas differ from 5e6 / 1e4"),
        (config.partial_rotary_factor == 0.334, "partial_rotary_factor differs from 0.334"),
        (config.layernorm_epsilon == 1e-5, "layernorm_epsilon differs from 1e-5"),
    ]
    return [f"transformers ignores the config here: {why}" for ok, why in checks if not ok]


def verify(path, *, dtype="float32", devices=None, weight_dtype=None, tokens: int = 32) -> VerifyReport:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a whole number >= 1, got {tokens!r}")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit("verify needs the official implementation: pip install 'transformers==5.23.0' "
                         "(or the test extra: pip install -e '.[test]')") from None
    directory = Path(path)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[str(dtype).removeprefix("torch.")]
    kept = "fp8" if weight_dtype == "fp8" else None  # weight_dtype bf16/fp32: dequantized into that dtype
    ours_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(weight_dtype, None if kept else torch_dtype)
    ours = load(directory, dtype=ours_dtype, devices=devices, weight_dtype=kept, progress=False)
    config = ours.config
    warnings = official_rule_warnings(config)
    if ours.load_report.grids.get("per-head"):
        warnings.append(f"{ours.load_report.grids['per-head']} FP8 tensors use the per-head grid, which "
                        "transformers' own FP8 dequantization gets wrong: differences there are expected")
    ids = fixed_prompt(directory, config, tokens)
    start = time.perf_counter()
    with torch.no_grad():
        mine = ours(ids).float().cpu()
    minimimo_seconds = time.perf_counter() - start
    device_map = "auto" if torch.cuda.is_available() else None
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, attn_implementation="eager",
                                                  device_map=device_map).eval()
    start = time.perf_counter()
    with torch.no_grad():
        official = theirs(ids.to(theirs.device)).logits.float().cpu()
    official_seconds = time.perf_counter() - start
    diff = (mine - official).abs()
    agreement = (mine.argmax(-1) == official.argmax(-1)).float().mean().item()
    return VerifyReport(ids.shape[1], agreement, diff.max().item(), diff.mean().item(), minimimo_seconds,
                        official_seconds, warnings)


def fixed_prompt(directory: Path, config: MiMoConfig, tokens: int) -> torch.Tensor:
    """The same `tokens` ids every time: code through the checkpoint's tokenizer, else fixed ids."""
    if tokens > config.max_position_embeddings:
        raise ValueError(f"tokens={tokens} is more than the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    if (directory / "tokenizer.json").is_file():
        from .tokenizer import Tokenizer

        line = "def fibonacci(n):\n    # the n-th Fibonacci number\n    a, b = 0, 1\n    for _ in range(n):\n"
        tokenizer, ids = Tokenizer.from_pretrained(directory), []
        while len(ids) < tokens:
            ids += tokenizer.encode(line)
        ids = ids[:tokens]
    else:
        ids = [(7 * i + 3) % config.vocab_size for i in range(tokens)]
    return torch.tensor([ids])
