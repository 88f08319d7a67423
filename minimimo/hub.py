"""The official hub layout: which tensors a MiMo-V2-Flash checkpoint holds, and writing one.

Every tensor name the loader accepts is listed by `tensor_specs(config)`, with the shape it must
have, the model parameter it fills (experts are stacked: hub tensor
`model.layers.L.mlp.experts.E.gate_proj.weight` fills row E of `model.layers.L.mlp.experts.gate_proj`)
and whether it may be stored block-FP8.

The released checkpoint spreads the tensors over 145 files: `model_embedding.safetensors`,
`model_{L}.safetensors` (attention, norms, router, dense MLP of layer L),
`model_{L}_linear_fc1.safetensors` (every expert's gate and up projections),
`model_{L}_linear_fc2.safetensors` (every expert's down projection), `model_final.safetensors`
and `model_mtp.safetensors`. A loader must not rely on those names: the index says where each
tensor is. `save_checkpoint` writes this layout (or a single file) so that small models made here
look exactly like the real one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import MiMoConfig
from .fp8 import quantize

INDEX = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
MTP_PREFIX = "model.mtp."


@dataclass(frozen=True)
class TensorSpec:
    param: str  # model parameter it fills
    shape: tuple[int, ...]
    expert: int | None = None  # row of a stacked expert parameter
    quantizable: bool = False  # may be stored as FP8 + _scale_inv
    head_size: int | None = None  # rows per head, for the per-head FP8 grid
    float32: bool = False  # kept in float32 whatever the model dtype (router)


def tensor_specs(config: MiMoConfig) -> dict[str, TensorSpec]:
    """hub tensor name -> TensorSpec, main model and MTP blocks (`model.mtp.layers.k.*`)."""
    c = config
    h = c.hidden_size
    specs = {
        "model.embed_tokens.weight": TensorSpec("model.embed_tokens.weight", (c.vocab_size, h)),
        "model.norm.weight": TensorSpec("model.norm.weight", (h,)),
        "lm_head.weight": TensorSpec("lm_head.weight", (c.vocab_size, h), quantizable=True),
    }

    def add(name, shape, **kw):
        specs[name] = TensorSpec(name, shape, **kw)

    def add_attention(p, g):
        add(p + "self_attn.q_proj.weight", (g.num_heads * g.head_dim, h), quantizable=True, head_size=g.head_dim)
        add(p + "self_attn.k_proj.weight", (g.num_kv_heads * g.head_dim, h), quantizable=True, head_size=g.head_dim)
        add(p + "self_attn.v_proj.weight", (g.num_kv_heads * g.v_head_dim, h), quantizable=True,
            head_size=g.v_head_dim)
        add(p + "self_attn.o_proj.weight", (h, g.num_heads * g.v_head_dim), quantizable=True)
        if g.has_sink:
            add(p + "self_attn.attention_sink_bias", (g.num_heads,))

    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        g = c.attention(i)
        add(p + "input_layernorm.weight", (h,))
        add(p + "post_attention_layernorm.weight", (h,))
        add_attention(p, g)
        if c.is_moe(i):
            add(p + "mlp.gate.weight", (c.n_routed_experts, h), float32=True)
            add(p + "mlp.gate.e_score_correction_bias", (c.n_routed_experts,), float32=True)
            mi = c.moe_intermediate_size
            for e in range(c.n_routed_experts):
                for proj, shape in (("gate_proj", (mi, h)), ("up_proj", (mi, h)), ("down_proj", (h, mi))):
                    specs[f"{p}mlp.experts.{e}.{proj}.weight"] = TensorSpec(
                        f"{p}mlp.experts.{proj}", shape, expert=e, quantizable=True)
        else:
            i_s = c.intermediate_size
            add(p + "mlp.gate_proj.weight", (i_s, h), quantizable=True)
            add(p + "mlp.up_proj.weight", (i_s, h), quantizable=True)
            add(p + "mlp.down_proj.weight", (h, i_s), quantizable=True)
    for k in range(c.num_mtp_layers):
        p = f"model.mtp.layers.{k}."
        g = c.attention(None)
        for norm in ("enorm", "hnorm", "input_layernorm", "pre_mlp_layernorm", "final_layernorm"):
            add(p + norm + ".weight", (h,))
        add(p + "eh_proj.weight", (h, 2 * h))
        add_attention(p, g)
        add(p + "mlp.gate_proj.weight", (c.intermediate_size, h), quantizable=True)
        add(p + "mlp.up_proj.weight", (c.intermediate_size, h), quantizable=True)
        add(p + "mlp.down_proj.weight", (h, c.intermediate_size), quantizable=True)
    return specs


def hub_file(name: str) -> str:
    """The file the released checkpoint keeps a tensor in."""
    if name.startswith(MTP_PREFIX):
        return "model_mtp.safetensors"
    if name.startswith("model.embed_tokens"):
        return "model_embedding.safetensors"
    if name.startswith("model.layers."):
        layer = name.split(".")[2]
        if ".mlp.experts." in name:
            fc = "fc2" if ".down_proj." in name else "fc1"
            return f"model_{layer}_linear_{fc}.safetensors"
        return f"model_{layer}.safetensors"
    return "model_final.safetensors"


def hub_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under hub names (experts unstacked)."""
    params = dict(model.named_parameters())
    out = {}
    for name, spec in tensor_specs(model.config).items():
        t = params[spec.param]
        out[name] = (t[spec.expert] if spec.expert is not None else t).detach()
    return out


def is_fp8_stored(name: str, spec: TensorSpec) -> bool:
    """What the release quantizes: q/k/v, dense MLP and expert linears (o_proj, lm_head stay bf16)."""
    return spec.quantizable and not name.endswith(("o_proj.weight", "lm_head.weight"))


def fp8_head_size(config: MiMoConfig, name: str, spec: TensorSpec) -> int | None:
    """The head size at which the release restarts an FP8 tensor's row blocks, None for the uniform
    grid: only the global-attention k_proj is quantized per kv head (its [768, 4096] weight has an
    [8, 32] scale, 2 blocks for each 192-row head). The saver writes, and the planner counts, this grid;
    a loader never assumes it (`fp8.choose_grid` reads the grid off the scale)."""
    global_layer = name.startswith("model.layers.") and not config.is_sliding(int(name.split(".")[2]))
    return spec.head_size if global_layer and name.endswith("self_attn.k_proj.weight") else None


def save_checkpoint(model, directory: str | Path, *, dtype: torch.dtype = torch.bfloat16, fp8_block: int | None = None,
                    layout: str = "hub", extra_tensors: dict[str, torch.Tensor] | None = None,
                    per_head_k_grid: bool = True) -> Path:
    """Write `model` as a hub checkpoint: config.json, index, shards.

    dtype: storage dtype of unquantized tensors (the router is always float32).
    fp8_block: if set, store q/k/v, dense and expert linears as block FP8 with this block size
        (global-layer k_proj on the per-head grid when `per_head_k_grid`, as in the release).
    layout: "hub" (the release's per-layer file names) or "single" (one model.safetensors + index).
    extra_tensors: more hub-named tensors to store (e.g. the MTP blocks).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    if fp8_block:
        q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": [fp8_block, fp8_block], "packed_modules_mapping": {},
             "ignored_layers": [f"model.layers.{i}.self_attn.o_proj" for i in range(config.num_hidden_layers)]}
        config = config.replace(quantization_config=q)
    config = config.replace(torch_dtype=str(dtype).removeprefix("torch."))
    specs = tensor_specs(config)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in {**hub_state(model), **(extra_tensors or {})}.items():
        spec = specs.get(name)
        if spec is not None and spec.float32:
            tensors[name] = t.float().contiguous()
        elif fp8_block and spec is not None and is_fp8_stored(name, spec):
            head_size = fp8_head_size(config, name, spec) if per_head_k_grid else None
            w, s = quantize(t, (fp8_block, fp8_block), head_size=head_size)
            tensors[name], tensors[name + SCALE_SUFFIX] = w.contiguous(), s.contiguous()
        else:
            tensors[name] = t.to(dtype).contiguous()
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        file = hub_file(name) if layout == "hub" else "model.safetensors"
        files.setdefault(file, {})[name] = t
    for file, group in files.items():
        save_file(group, str(directory / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {name: (hub_file(name) if layout == "hub" else "model.safetensors")
                            for name in sorted(tensors)}}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config.save(directory)
    return directory
