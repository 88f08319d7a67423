"""MiMoConfig: every number that shapes MiMo-V2-Flash, read from the hub's `config.json`.

The hub config describes a *hybrid* model: each of the 48 layers is either a global-attention
layer (sees every previous token) or a sliding-window layer (sees the last `sliding_window_size`
tokens plus itself), and either a dense SwiGLU MLP (layer 0 only) or a mixture of 256 experts.
Sliding layers have their own head geometry (`swa_*` keys), their own RoPE theta and a learned
attention sink. This module turns those keys into a checked dataclass and answers the questions
the rest of the package asks ("is layer 7 sliding?", "how many kv heads does it have?").

Nothing here touches tensors except for counting parameters.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dtypes

SCORING_FUNCS = ("sigmoid",)
TOPK_METHODS = ("noaux_tc",)
ACTIVATIONS = ("silu",)
MTP_PREFIX = "model.mtp.layers."


def flash_layer_pattern(num_layers: int) -> list[int]:
    """1 = sliding window, 0 = global: global at layer 0 and every sixth layer (5, 11, ..., 47).

    The one place this rule is written. The hub config spells it out as `hybrid_layer_pattern`;
    transformers' MiMoV2FlashConfig builds its default `layer_types` from the same rule.
    """
    return [0 if (i == 0 or (i + 1) % 6 == 0) else 1 for i in range(num_layers)]


# Keys a `config.json` may leave out, and what their absence means in the hub's config format.
# Every other field shapes the computation (a size, the layer rule, the window, the position
# limit, a constant of the math) and must be present: taking MiMo-V2-Flash's value for a missing
# `sliding_window_size` would silently run a window-32 model with window 128.
OPTIONAL_KEYS = {
    "quantization_config": "absent: the weights are not quantized",
    "torch_dtype": "the shards' own dtypes are what is read",
    "bos_token_id": "token ids belong to the tokenizer",
    "eos_token_id": "token ids belong to the tokenizer",
    "pad_token_id": "token ids belong to the tokenizer",
    "n_shared_experts": "absent or null: no shared expert",
    "routed_scaling_factor": "absent or null: 1.0 (the release stores null)",
    "num_mtp_layers": "`num_nextn_predict_layers`; counted from the index when absent",
    "mtp_hidden": "not a hub key",
    "mtp_sliding_window": "not a hub key",
}
ALIASES = {  # hub spelling -> the field it fills, when the field's own key is absent
    "rms_norm_eps": "layernorm_epsilon",
    "num_nextn_predict_layers": "num_mtp_layers",
    "sliding_window": "sliding_window_size",
    "dtype": "torch_dtype",
}


@dataclass(frozen=True)
class AttentionGeometry:
    """The shape of one layer's attention (global and sliding layers differ)."""

    sliding: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int  # query/key
    v_head_dim: int
    rotary_dim: int
    rope_theta: float
    window: int | None  # previous tokens visible (None = global causal)
    has_sink: bool


@dataclass
class MiMoConfig:
    """The hub `config.json` of MiMo-V2-Flash as a dataclass (defaults = the real 309B model)."""

    vocab_size: int = 152576
    hidden_size: int = 4096
    intermediate_size: int = 16384  # dense MLP of layer 0 and of every MTP block
    moe_intermediate_size: int = 2048  # each expert
    num_hidden_layers: int = 48
    # global-attention layers
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int = 192
    v_head_dim: int = 128
    # sliding-window layers
    swa_num_attention_heads: int = 64
    swa_num_key_value_heads: int = 8
    swa_head_dim: int = 192
    swa_v_head_dim: int = 128
    hybrid_layer_pattern: list[int] = field(default_factory=lambda: flash_layer_pattern(48))
    moe_layer_freq: list[int] = field(default_factory=lambda: [0] + [1] * 47)
    sliding_window_size: int = 128
    rope_theta: float = 5_000_000.0
    swa_rope_theta: float = 10_000.0
    partial_rotary_factor: float = 0.334
    attention_value_scale: float | None = 0.707
    add_swa_attention_sink_bias: bool = True
    add_full_attention_sink_bias: bool = False
    attention_bias: bool = False
    # mixture of experts
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int | None = None
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float | None = None  # null on the hub, meaning 1.0
    # the rest
    layernorm_epsilon: float = 1e-5
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    torch_dtype: str | None = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    num_mtp_layers: int = 3  # hub key `num_nextn_predict_layers` is absent; 3 blocks are on disk
    quantization_config: dict | None = None
    # two points the public sources leave open, as switches (not hub keys): vLLM feeds the MTP blocks
    # the main model's hidden state after the final norm, SGLang the one before it; and the window
    # of the MTP blocks' sliding attention is not in config.json
    mtp_hidden: str = "pre_norm"  # main hidden state fed to the MTP blocks: "pre_norm" or "post_norm"
    mtp_sliding_window: int | None = None  # window of the MTP blocks' attention; None = sliding_window_size
    # keys we read but do not need (architectures, sliding_window, attention_chunk_size, ...), kept
    # so that `to_dict()` writes back what was read
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ reading and writing
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "MiMoConfig":
        """The config a hub `config.json` describes. A key that shapes the computation and is
        missing raises a ValueError naming it (see OPTIONAL_KEYS for the ones that may be absent)."""
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        for alias, key in ALIASES.items():
            if key not in d and alias in d:
                # `sliding_window` stays in `extra` too: to_dict writes it back as it was read
                d[key] = d[alias] if alias == "sliding_window" else d.pop(alias)
        if "num_nextn_predict_layers" in d:  # the hub key wins over ours
            d["num_mtp_layers"] = d.pop("num_nextn_predict_layers")
        missing = sorted(names - set(d) - set(OPTIONAL_KEYS))
        if missing:
            raise ValueError(f"{source}: required key `{missing[0]}` is missing"
                             + (f" (and {', '.join(missing[1:])})" if missing[1:] else "")
                             + "; it shapes the computation, so there is no safe default")
        for key in list(d):
            if key in names:
                kwargs[key] = d.pop(key)
        try:
            return cls(**kwargs, extra=d)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MiMoConfig":
        """Read `config.json` from a checkpoint directory (or the file itself).

        The hub config does not say how many MTP blocks there are; when reading a directory we
        count the `model.mtp.layers.N` tensors of its index instead of guessing.
        """
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not valid JSON ({err})") from None
        if "num_nextn_predict_layers" not in raw:
            raw["num_nextn_predict_layers"] = _count_mtp_layers(file.parent)
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def flash(cls) -> "MiMoConfig":
        """The released MiMo-V2-Flash (309B total, 15B active) as published on the hub."""
        return cls(
            bos_token_id=None,
            quantization_config={
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [128, 128],
                "packed_modules_mapping": {},
                "ignored_layers": [f"model.layers.{i}.self_attn.o_proj" for i in range(48)]
                + ["model.decoder.self_attn.o_proj"],
            },
            extra={
                "architectures": ["MiMoV2FlashForCausalLM"],
                "model_type": "mimo_v2_flash",
                "sliding_window": 128,
                "attention_chunk_size": 128,
                "attention_dropout": 0.0,
                "initializer_range": 0.02,
                "use_cache": True,
            },
        )

    @classmethod
    def tiny(cls, num_hidden_layers: int = 8, **overrides) -> "MiMoConfig":
        """A laptop-sized model with the full architecture (hybrid attention with sinks, MoE with
        the biased sigmoid router, dense layer 0): the same layer rule as Flash, small widths."""
        n = num_hidden_layers
        d = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=n, num_attention_heads=4, num_key_value_heads=1, head_dim=24, v_head_dim=16,
                 swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=24, swa_v_head_dim=16,
                 hybrid_layer_pattern=flash_layer_pattern(n), moe_layer_freq=[0] + [1] * (n - 1),
                 sliding_window_size=8, n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
                 torch_dtype="float32", num_mtp_layers=0)
        d.update(overrides)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The hub `config.json` form (hub key names, `extra` keys merged back)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        d.setdefault("architectures", ["MiMoV2FlashForCausalLM"])
        d.setdefault("model_type", "mimo_v2_flash")
        d.setdefault("sliding_window", self.sliding_window_size)
        d.pop("num_mtp_layers")  # the hub has no such key: the count is read off the tensors
        for key, default in (("mtp_hidden", "pre_norm"), ("mtp_sliding_window", None)):
            if d[key] == default:
                d.pop(key)
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        return d

    def save(self, directory: str | Path) -> Path:
        file = Path(directory) / "config.json"
        file.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return file

    def replace(self, **changes) -> "MiMoConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        n = self.num_hidden_layers

        def need(ok: bool, key: str, why: str):
            if not ok:
                raise ValueError(f"`{key}` {why}")

        need(n > 0, "num_hidden_layers", f"must be positive, got {n}")
        need(len(self.hybrid_layer_pattern) == n, "hybrid_layer_pattern",
             f"has {len(self.hybrid_layer_pattern)} entries but num_hidden_layers is {n}")
        need(set(self.hybrid_layer_pattern) <= {0, 1}, "hybrid_layer_pattern",
             "must hold only 0 (global) and 1 (sliding window)")
        need(len(self.moe_layer_freq) == n, "moe_layer_freq",
             f"has {len(self.moe_layer_freq)} entries but num_hidden_layers is {n}")
        need(set(self.moe_layer_freq) <= {0, 1}, "moe_layer_freq", "must hold only 0 (dense) and 1 (MoE)")
        for prefix in ("", "swa_"):
            heads = getattr(self, f"{prefix}num_attention_heads")
            kv = getattr(self, f"{prefix}num_key_value_heads")
            hd = getattr(self, f"{prefix}head_dim")
            need(heads > 0 and kv > 0, f"{prefix}num_key_value_heads", "head counts must be positive")
            need(heads % kv == 0, f"{prefix}num_key_value_heads",
                 f"({kv}) must divide {prefix}num_attention_heads ({heads})")
            rot = int(hd * self.partial_rotary_factor)
            need(rot % 2 == 0, "partial_rotary_factor",
                 f"gives an odd rotary dim int({hd} * {self.partial_rotary_factor}) = {rot} for {prefix}head_dim")
        need(0 < self.partial_rotary_factor <= 1, "partial_rotary_factor", "must be in (0, 1]")
        need(self.sliding_window_size >= 0, "sliding_window_size", "must be >= 0")
        need(self.scoring_func in SCORING_FUNCS, "scoring_func",
             f"{self.scoring_func!r} is unknown (MiMo uses {SCORING_FUNCS})")
        need(self.topk_method in TOPK_METHODS, "topk_method",
             f"{self.topk_method!r} is unknown (MiMo uses {TOPK_METHODS})")
        need(self.hidden_act in ACTIVATIONS, "hidden_act", f"{self.hidden_act!r} is not supported (silu only)")
        need(not self.n_shared_experts, "n_shared_experts", "must be null: MiMo-V2-Flash has no shared expert")
        if any(self.moe_layer_freq):
            e, k = self.n_routed_experts, self.num_experts_per_tok
            need(0 < k <= e, "num_experts_per_tok", f"({k}) must be in 1..n_routed_experts ({e})")
            need(self.n_group > 0 and e % self.n_group == 0, "n_group",
                 f"({self.n_group}) must divide n_routed_experts ({e})")
            need(0 < self.topk_group <= self.n_group, "topk_group",
                 f"({self.topk_group}) must be in 1..n_group ({self.n_group})")
            need(k <= self.topk_group * (e // self.n_group), "num_experts_per_tok",
                 f"({k}) exceeds the experts in the topk_group ({self.topk_group}) chosen groups")
            if self.n_group > 1:
                need(e // self.n_group >= 2, "n_group", "needs >= 2 experts per group (group score = top-2 sum)")
        if self.quantization_config is not None:
            q = self.quantization_config
            need(q.get("quant_method") == "fp8", "quantization_config",
                 f"quant_method {q.get('quant_method')!r} is not supported (fp8 only)")
            block = q.get("weight_block_size")
            need(isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block),
                 "quantization_config", f"weight_block_size must be [rows, cols], got {block!r}")
        need(self.num_mtp_layers >= 0, "num_mtp_layers", "must be >= 0")
        need(self.mtp_hidden in ("pre_norm", "post_norm"), "mtp_hidden", "must be 'pre_norm' or 'post_norm'")

    # ------------------------------------------------------------------ per-layer questions
    @property
    def scaling_factor(self) -> float:
        return 1.0 if self.routed_scaling_factor is None else float(self.routed_scaling_factor)

    @property
    def value_scale(self) -> float:
        return 1.0 if self.attention_value_scale is None else float(self.attention_value_scale)

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        if self.quantization_config is None:
            return None
        r, c = self.quantization_config["weight_block_size"]
        return int(r), int(c)

    def is_sliding(self, layer: int) -> bool:
        return self.hybrid_layer_pattern[layer] == 1

    def is_moe(self, layer: int) -> bool:
        return self.moe_layer_freq[layer] == 1

    def attention(self, layer: int | None) -> AttentionGeometry:
        """Geometry of a decoder layer's attention; `layer=None` means an MTP block (sliding)."""
        sliding = True if layer is None else self.is_sliding(layer)
        p = "swa_" if sliding else ""
        head_dim = getattr(self, f"{p}head_dim")
        window = self.sliding_window_size if sliding else None
        if layer is None and self.mtp_sliding_window is not None:
            window = self.mtp_sliding_window
        return AttentionGeometry(
            sliding=sliding,
            num_heads=getattr(self, f"{p}num_attention_heads"),
            num_kv_heads=getattr(self, f"{p}num_key_value_heads"),
            head_dim=head_dim,
            v_head_dim=getattr(self, f"{p}v_head_dim"),
            rotary_dim=int(head_dim * self.partial_rotary_factor),
            rope_theta=float(self.swa_rope_theta if sliding else self.rope_theta),
            window=window,
            has_sink=self.add_swa_attention_sink_bias if sliding else self.add_full_attention_sink_bias,
        )

    # ------------------------------------------------------------------ counting
    def parameter_counts(self) -> dict[str, int]:
        """Parameters computed from the shapes (FP8 scales are storage, not parameters).

        `total` and `active` are for the main model; `active` counts what one token touches
        (embedding row lookup included as a full matrix, as the paper does, plus lm_head,
        attention, the dense MLP, the router and k of the experts). MTP blocks are separate.
        """
        h, v = self.hidden_size, self.vocab_size
        attn_total = norms = dense = router = experts = experts_active = 0
        for i in range(self.num_hidden_layers):
            attn_total += self._attention_params(self.attention(i))
            norms += 2 * h
            if self.is_moe(i):
                router += self.n_routed_experts * h + self.n_routed_experts
                per_expert = 3 * h * self.moe_intermediate_size
                experts += self.n_routed_experts * per_expert
                experts_active += self.num_experts_per_tok * per_expert
            else:
                dense += 3 * h * self.intermediate_size
        embedding = v * h
        lm_head = 0 if self.tie_word_embeddings else v * h
        final_norm = h
        shared = embedding + lm_head + attn_total + norms + dense + router + final_norm
        mtp_block = (
            2 * h  # enorm, hnorm
            + 2 * h * h  # eh_proj
            + self._attention_params(self.attention(None))
            + 3 * h * self.intermediate_size
            + 3 * h  # input_layernorm, pre_mlp_layernorm, final_layernorm
        )
        return {
            "total": shared + experts,
            "active": shared + experts_active,
            "active_without_embedding": shared + experts_active - embedding,
            "embedding": embedding,
            "lm_head": lm_head,
            "attention": attn_total,
            "dense_mlp": dense,
            "router": router,
            "experts": experts,
            "experts_active": experts_active,
            "norms": norms + final_norm,
            "mtp_per_block": mtp_block,
            "mtp": self.num_mtp_layers * mtp_block,
        }

    def kv_cache_bytes(self, seq_len: int, dtype: Any = "bfloat16", layout: str = "hybrid", batch: int = 1,
                       reserve: int = 0) -> int:
        """Bytes of keys and values for `batch` sequences of `seq_len` tokens.

        layout "hybrid": what MiMo keeps (sliding layers only their last `sliding_window_size`,
        plus `reserve` spare slots for speculative decoding);
        "all-global": every layer global, with the global kv-head count (the "~6x" baseline);
        "no-window": every layer keeps its own heads but never drops a token.
        (`HybridCache` allocates its ring buffers whole, so below the window it holds more than
        this formula, which counts what is needed: min(seq_len, window) tokens.)
        """
        layouts = ("hybrid", "all-global", "no-window")
        if layout not in layouts:
            raise ValueError(f"layout {layout!r} is not one of {layouts}")
        total = 0
        for i in range(self.num_hidden_layers):
            if layout == "all-global":  # the global layers' kv heads and dims, every token
                total += kv_bytes(seq_len, self.num_key_value_heads, self.head_dim, self.v_head_dim, dtype, batch)
            else:
                total += self.layer_kv_bytes(i, seq_len, dtype, batch, reserve, window=layout == "hybrid")
        return total

    def layer_kv_bytes(self, layer: int | None, seq_len: int, dtype: Any = "bfloat16", batch: int = 1,
                       reserve: int = 0, window: bool = True) -> int:
        """Keys + values one layer (`None`: an MTP block) keeps for `batch` sequences of `seq_len` tokens:
        tokens x kv heads x (head_dim + v_head_dim) x bytes per element. A sliding layer keeps
        min(seq_len, window + reserve) tokens (unless `window=False`), a global layer all of them.
        `kv_cache_bytes` and the memory planner call it; both end in `kv_bytes`."""
        g = self.attention(layer)
        tokens = seq_len if g.window is None or not window else min(seq_len, g.window + reserve)
        return kv_bytes(tokens, g.num_kv_heads, g.head_dim, g.v_head_dim, dtype, batch)

    def _attention_params(self, g: AttentionGeometry) -> int:
        h = self.hidden_size
        qk = (g.num_heads + g.num_kv_heads) * g.head_dim * h
        v = g.num_kv_heads * g.v_head_dim * h
        o = g.num_heads * g.v_head_dim * h
        return qk + v + o + (g.num_heads if g.has_sink else 0)


def kv_bytes(tokens: int, num_kv_heads: int, head_dim: int, v_head_dim: int, dtype: Any = "bfloat16",
             batch: int = 1) -> int:
    """The one KV-bytes formula: batch x tokens x kv heads x (key dim + value dim) x bytes per element."""
    return batch * tokens * num_kv_heads * (head_dim + v_head_dim) * dtypes.width(dtype)


def _count_mtp_layers(directory: Path) -> int:
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return 0
    try:
        names = json.loads(index.read_text()).get("weight_map", {})
    except json.JSONDecodeError as err:
        raise ValueError(f"{index}: not valid JSON ({err})") from None
    blocks = {int(n[len(MTP_PREFIX):].split(".")[0]) for n in names if n.startswith(MTP_PREFIX)}
    return 0 if not blocks else max(blocks) + 1


def human(n: float) -> str:
    """12_345_678_901 -> '12.35B' (for printing parameter counts)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


__all__ = ["MiMoConfig", "AttentionGeometry", "human", "flash_layer_pattern", "kv_bytes", "OPTIONAL_KEYS"]
