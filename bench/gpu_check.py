"""The GPU check: the real-dimension slice of MiMo-V2-Flash on one CUDA GPU, in under 5 minutes.

    python bench/gpu_check.py                 # writes the slice to a temp folder (9.8 GB), runs, deletes it
    python bench/gpu_check.py --keep DIR      # reuse a slice written by bench/real_slice.py --keep DIR

It loads the slice of `bench/real_slice.py` (layer 0 global + dense, layer 1 sliding + 256-expert
MoE, one MTP block, the 152,576-token vocabulary, all at their true sizes and FP8 block layout)
twice on `cuda:0`: with the FP8 tensors kept in FP8 (`weight_dtype="fp8"`) and dequantized to
bfloat16. For each it checks that cached greedy decoding equals decoding by full recomputation,
that MTP drafting (k = 1) gives the same tokens as plain greedy in float32-exact terms where the
arithmetic allows (bf16 may differ: the script reports, it does not hide it), and prints:

* tokens/s of cached decode (batch 1) and with MTP;
* the bytes a decode step must read (the active weights: attention, the dense MLP or the 8 chosen
  experts' three matrices, the router, the LM head) and the fraction of the GPU's memory bandwidth
  that this traffic reaches at the measured step time. The slice has 2 layers where the real model
  has 48, so the LM head weighs more here than in the real model; the fraction tells how far a step
  is from being bandwidth-bound, not the real model's speed.

Then `bench/mtp.py --device cuda` on the bundled trained model (float32): MTP acceptance at
k = 1, 2, 3 on held-out code and the speed-up over plain decoding, side by side (`--skip-mtp`
leaves it out). On a CPU a (k+1)-token verify costs ~1.4 one-token steps of this small MoE, so
the speed-up stays near 1.35x there; on a GPU, where a step of a model this small waits on
kernel launches more than on its weights, k+1 tokens should cost about what one does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minimimo, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_slice import slice_config, slice_folder  # noqa: E402

import minimimo  # noqa: E402

# Peak memory bandwidth by device name (vendor data sheets), bytes/s.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
                  "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12,
                  "L40S": 0.864e12, "RTX 4090": 1.008e12}


def peak_bandwidth(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BANDWIDTH.items():
        if key in name:
            return value
    return None


def active_bytes_per_token(model) -> int:
    """Bytes of weights a batch-1 decode step reads: everything held, minus the experts not chosen,
    minus the embedding table (one row is read) and the MTP blocks (not used by a plain step)."""
    c = model.config
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        size = t.numel() * t.element_size()
        if name.startswith("model.mtp.") or name == "model.embed_tokens.weight":
            continue
        if ".experts." in name and t.dim() >= 1 and t.shape[0] == c.n_routed_experts:
            size = size * c.num_experts_per_tok // c.n_routed_experts
        total += size
    return total


def timed_decode(model, ids, new_tokens: int, mtp_steps: int = 0):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = minimimo.generate(model, ids, new_tokens, mtp_steps=mtp_steps)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def check(path: Path, weight_dtype: str | None, new_tokens: int, bandwidth: float | None) -> None:
    label = "FP8 kept" if weight_dtype == "fp8" else "bf16"
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = minimimo.load(path, dtype=torch.bfloat16, device="cuda:0", weight_dtype=weight_dtype, progress=False)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([[11, 22, 33, 44, 55, 66, 77, 88]], device="cuda:0")
    timed_decode(model, ids, 2)  # warm-up: kernels, allocator
    one, prefill_s = timed_decode(model, ids, 1)
    out, total_s = timed_decode(model, ids, new_tokens)
    step_s = (total_s - prefill_s) / max(1, new_tokens - 1)
    with torch.no_grad():  # full recomputation: the slow twin of the cached decode
        full = ids
        for _ in range(new_tokens):
            full = torch.cat([full, model(full)[:, -1:].argmax(-1)], dim=1)
    mtp, mtp_s = timed_decode(model, ids, new_tokens, mtp_steps=1)
    moved = active_bytes_per_token(model)
    print(f"[{label}] load {load_s:.1f} s | peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"[{label}] cached decode: {1 / step_s:.1f} tokens/s ({step_s * 1e3:.1f} ms/step); "
          f"with MTP k=1: {new_tokens / mtp_s:.1f} tokens/s including prefill")
    print(f"[{label}] cached == full recomputation: {torch.equal(out, full)}; MTP == greedy: {torch.equal(mtp, out)}")
    line = f"[{label}] a decode step reads {moved / 2**30:.2f} GiB of weights: {moved / step_s / 1e9:.0f} GB/s"
    if bandwidth:
        line += f" = {moved / step_s / bandwidth:.1%} of the GPU's {bandwidth / 1e12:.2f} TB/s"
    print(line)
    del model
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keep", help="slice folder to write or reuse, kept afterwards")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--peak-bandwidth", type=float, help="the GPU's memory bandwidth in bytes/s (else by name)")
    p.add_argument("--skip-mtp", action="store_true", help="leave out bench/mtp.py on the bundled model")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check")
        return 2
    name = torch.cuda.get_device_name(0)
    bandwidth = peak_bandwidth(name, args.peak_bandwidth)
    print(f"device: {name} | torch {torch.__version__} | minimimo {minimimo.__version__} | "
          f"slice: {slice_config().num_hidden_layers} layers + 1 MTP block at MiMo-V2-Flash's sizes")
    with slice_folder(args.keep) as path:
        check(path, "fp8", args.new_tokens, bandwidth)
        check(path, None, args.new_tokens, bandwidth)
    if not args.skip_mtp:
        import mtp  # bench/mtp.py

        print("\n== MTP drafting on the bundled model, float32, on the GPU (bench/mtp.py --device cuda) ==")
        mtp.main(["--device", "cuda"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
