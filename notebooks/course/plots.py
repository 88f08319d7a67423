"""The course's figures, kept out of the notebooks so that a reader sees the idea, not the matplotlib.

Every function takes the numbers a notebook computed and returns a matplotlib figure; none computes
anything the notebook has not asserted. `save(fig, name)` writes `figures/<name>.png` only when the
environment variable MINIMIMO_WRITE_FIGURES=1 is set, so running a notebook (or the test suite)
leaves the repository as it was.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

FIGURES = Path(__file__).resolve().parents[2] / "figures"
COLORS = {"global": "#1f4e79", "sliding": "#f4a259", "dense": "#6a994e", "moe": "#bc4749",
          "light": "#9ec1de", "grey": "#e9e9e9"}


def save(fig, name: str) -> None:
    """Write figures/<name>.png when MINIMIMO_WRITE_FIGURES=1; otherwise do nothing."""
    if os.environ.get("MINIMIMO_WRITE_FIGURES") == "1":
        fig.savefig(FIGURES / f"{name}.png", dpi=120, bbox_inches="tight")


# ---------------------------------------------------------------- notebook 00
def parameter_shares(groups, mtp, counts, human):
    """groups {name: (total, active)}: left the shares of the model and of one token, right absolute sizes."""
    palette = ["#bc4749", "#1f4e79", "#e9c46a", "#6a994e", "#81b29a", "#999999"]

    def share(value, total):
        return f"{value / total:.1%}" if value / total >= 0.001 else "<0.1%"

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.2), gridspec_kw={"width_ratios": [1, 1.15]})
    rows = [(1, f"active per token\n{human(counts['active'])}"), (0, f"total\n{human(counts['total'])}")]
    for row, (col, label) in enumerate(rows):
        total, start = (counts["total"], counts["active"])[col], 0.0
        for (name, values), color in zip(groups.items(), palette):
            width = values[col] / total
            left.barh(label, width, left=start, color=color, label=name if row == 0 else None)
            if width > 0.05:
                left.text(start + width / 2, row, share(values[col], total), ha="center", va="center", fontsize=9,
                          color="black" if color == "#e9c46a" else "white")
            start += width
    left.set_xlim(0, 1); left.set_xlabel("share of the parameters")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8.5, frameon=False)
    left.set_title("experts are 98% of the model, 61% of a token's work")
    names = list(groups)[::-1]
    y = list(range(len(names)))
    right.barh([i + 0.2 for i in y], [groups[k][0] / 1e9 for k in names], height=0.4, color="#1f4e79", label="total")
    right.barh([i - 0.2 for i in y], [groups[k][1] / 1e9 for k in names], height=0.4, color="#8ecae6",
               label="active per token")
    right.barh([len(names)], [mtp / 1e9], height=0.4, color="#f4a259", label="MTP (3 blocks, outside the 309B)")
    for i, k in enumerate(names):
        right.text(groups[k][0] / 1e9 * 1.2, i + 0.2, human(groups[k][0]), va="center", fontsize=8)
        if groups[k][1] != groups[k][0]:
            right.text(groups[k][1] / 1e9 * 1.2, i - 0.2, human(groups[k][1]), va="center", fontsize=8)
    right.text(mtp / 1e9 * 1.2, len(names), human(mtp), va="center", fontsize=8)
    right.set_yticks(y + [len(names)], names + ["MTP blocks"])
    right.set_xscale("log"); right.set_xlim(1e-4, 5e3); right.set_xlabel("billions of parameters (log scale)")
    right.legend(loc="lower right", fontsize=8.5)
    right.set_title("absolute sizes")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- notebook 01
def rope_relative(rotated, passed, distances, similarity):
    """Score matrices of the rotated and unrotated channels, and q = k similarity vs distance per theta.

    similarity: {theta: [len(distances)]}."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9), gridspec_kw={"width_ratios": [1, 1, 1.5]})
    n, vmax = 64, float(rotated.abs().max())
    for ax, matrix, title in [(axes[0], rotated[:n, :n], "rotated 64 channels:\ndepends only on n − m"),
                              (axes[1], passed[:n, :n], "other 128 channels:\nposition-free")]:
        im = ax.imshow(matrix, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_xlabel("key position n"); ax.set_ylabel("query position m"); ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=axes[:2], shrink=0.8, label="q·k contribution")
    for (theta, values), color in zip(sorted(similarity.items()), [COLORS["sliding"], COLORS["global"]]):
        axes[2].plot(distances, values, color=color, lw=1, label=f"θ = {theta:,.0f}")
    axes[2].axvline(128, color=COLORS["moe"], ls="--", lw=1); axes[2].text(140, 0.9, "window 128", color=COLORS["moe"])
    axes[2].set_xscale("log"); axes[2].set_xlim(1, 262_144); axes[2].set_xlabel("distance n − m (tokens)")
    axes[2].set_ylabel("score / score at distance 0"); axes[2].legend(fontsize=9, loc="lower left")
    axes[2].set_title("q = k: similarity left after d tokens\n(mean over pairs of cos dω_i)", fontsize=10)
    return fig


def rope_wavelengths(wavelengths):
    """wavelengths {(theta, label): [32] tokens per turn} on a log axis, with the window and the context."""
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for ((theta, label), wavelength), color in zip(wavelengths.items(), [COLORS["sliding"], COLORS["global"]]):
        ax.plot(range(len(wavelength)), wavelength, "o-", ms=3.5, color=color, label=f"θ = {theta:,.0f} ({label})")
    ax.axhline(128, color=COLORS["moe"], ls="--")
    ax.text(14, 128 / 2.6, "sliding window: 128 previous tokens", color=COLORS["moe"])
    ax.axhline(262_144, color="k", ls="--"); ax.text(0.3, 262_144 * 1.4, "context: 262,144 tokens")
    ax.set_yscale("log"); ax.set_xlabel("frequency pair i (channels i and i + 32)")
    ax.set_ylabel("wavelength 2π/ω_i (tokens)")
    ax.set_title("RoPE wavelengths of the 32 rotary pairs"); ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- notebook 02
def masks(causal, sliding, window, keys_per_query, flash_window):
    """Causal and sliding masks ([t s] bool) with the boundary marked; keys per query in Flash."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    for ax, mask, title in [(axes[0], causal, "global: causal"),
                            (axes[1], sliding, f"sliding: W = {window} previous + itself")]:
        ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(title, fontsize=10); ax.set_xlabel("key position s"); ax.set_ylabel("query position t")
    row = 14
    axes[1].text(0, row + 2.6, f"in row {row}:", fontsize=8)
    axes[1].plot([row - window], [row], "o", color="white", ms=5)
    axes[1].plot([row - window - 1], [row], "x", color=COLORS["moe"], ms=6, mew=2)
    axes[1].annotate(f"key {row - window}: distance {window}, visible", xy=(row - window, row + 0.3),
                     xytext=(0, row + 6.6), fontsize=8, arrowprops=dict(arrowstyle="->"))
    axes[1].annotate(f"key {row - window - 1}: distance {window + 1}, hidden", xy=(row - window - 1, row + 0.3),
                     xytext=(0, row + 4.6), fontsize=8, color=COLORS["moe"],
                     arrowprops=dict(arrowstyle="->", color=COLORS["moe"]))
    positions = range(len(keys_per_query))
    axes[2].plot(positions, [p + 1 for p in positions], color=COLORS["global"], label="global layer (grows with the context)")
    axes[2].plot(positions, keys_per_query, color=COLORS["sliding"], lw=2.5,
                 label=f"sliding layer, W = {flash_window} (at most {flash_window + 1})")
    axes[2].axvline(flash_window, color="grey", ls=":")
    axes[2].set_xlabel("query position"); axes[2].set_ylabel("keys visible"); axes[2].legend(fontsize=9)
    axes[2].set_title("keys per query in MiMo-V2-Flash", fontsize=10)
    fig.tight_layout()
    return fig


def sink_mass(sink_values, masses, on_keys, largest_plain, largest_sink, window, sink_logit):
    """Left: mass on keys vs the sink logit for n keys ({n: [len(sink_values)]}). Right: one head along a sequence."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.4))
    ax = axes[0]
    n_max = max(masses)
    ax.fill_between(sink_values, 0, masses[n_max], color=COLORS["global"], alpha=0.85,
                    label=f"{n_max} keys: mass on real keys")
    ax.fill_between(sink_values, masses[n_max], 1, color=COLORS["sliding"], alpha=0.85,
                    label=f"{n_max} keys: mass on the sink")
    for n, style in zip(sorted(masses)[:-1][::-1], ["--", ":"]):
        ax.plot(sink_values, masses[n], "k", ls=style, label=f"{n} key{'s' if n > 1 else ''}: mass on real keys")
    ln = math.log(n_max)
    ax.axvline(ln, color="grey", lw=0.8); ax.text(ln + 0.2, 0.92, f"σ = ln {n_max}: half the mass", fontsize=8)
    ax.set_xlabel("sink logit σ (all key scores 0)"); ax.set_ylabel("probability mass"); ax.set_ylim(0, 1)
    ax.set_xlim(float(sink_values[0]), float(sink_values[-1])); ax.legend(fontsize=8.5, loc="center left")
    ax.set_title("mass on keys vs on the sink as the sink logit varies", fontsize=10)
    _sequence_mass(axes[1], on_keys, largest_plain, largest_sink, window, sink_logit)
    fig.tight_layout()
    return fig


def _sequence_mass(ax, on_keys, largest_plain, largest_sink, window, sink_logit):
    t_axis = list(range(len(on_keys)))
    ax.fill_between(t_axis, 0, on_keys, color=COLORS["global"], alpha=0.85, label=f"mass on real keys (sink σ = {sink_logit:g})")
    ax.fill_between(t_axis, on_keys, 1, color=COLORS["sliding"], alpha=0.85, label="mass on the sink")
    ax.plot(t_axis, largest_plain, color=COLORS["moe"], lw=1.2, label="largest weight on one key, no sink")
    ax.plot(t_axis, largest_sink, color="white", lw=1.2, label="largest weight on one key, with sink")
    ax.axvline(window, color="k", ls=":", lw=1)
    ax.text(window * 0.97, 0.5, f"{window + 1} keys from here on →", fontsize=8, ha="right", color="white")
    ax.set_xscale("symlog", linthresh=10); ax.set_xlim(0, len(on_keys) - 1); ax.set_ylim(0, 1)
    ax.set_xlabel(f"query position (window {window})"); ax.set_ylabel("probability mass")
    ax.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.42, 1.0), facecolor="#eeeeee")
    ax.set_title("one sliding-window head along a sequence", fontsize=10)


def window_and_sink(mask, on_keys, largest_plain, largest_sink, window, sink_logit):
    """The slider's figure: the mask of one window width beside the mass along a sequence."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    axes[0].imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
    axes[0].set_title(f"sliding mask, W = {window}: {window + 1} keys per query", fontsize=10)
    axes[0].set_xlabel("key position s"); axes[0].set_ylabel("query position t")
    _sequence_mass(axes[1], on_keys, largest_plain, largest_sink, window, sink_logit)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- notebook 03
def ring_steps(returned, kind, window):
    """What RingCache.update returns at each decode step: returned [steps, W + 1] positions, kind codes."""
    colors = matplotlib.colors.ListedColormap(["#e9e9e9", COLORS["light"], COLORS["sliding"], COLORS["global"]])
    steps = returned.shape[0]
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    ax.imshow(kind, cmap=colors, vmin=-0.5, vmax=3.5, aspect="auto")
    for p in range(steps):
        for s in range(window + 1):
            label = "" if returned[p, s] < 0 else str(int(returned[p, s]))
            ax.text(s, p, label, ha="center", va="center", fontsize=9, color="white" if kind[p, s] == 3 else "black")
    ax.axvline(window - 0.5, color="white", lw=4)
    ax.set_xticks(range(window + 1), [f"slot {s}" for s in range(window)] + ["new token"])
    ax.set_yticks(range(steps), [f"query p = {p}" for p in range(steps)])
    ax.set_title(f"ring buffer, W = {window}: what update() returns at each decode step\n"
                 "(number = token position in the slot)", fontsize=10)
    handles = [matplotlib.patches.Patch(color=colors(i), label=label) for i, label in
               enumerate(["empty (position -1)", "stored key", "distance W: read now, overwritten next", "new token"])]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.05), ncol=2)
    fig.tight_layout()
    return fig


def kv_memory(lengths, kv, ring_bytes, marks):
    """KV bytes per sequence vs context for each layout ({layout: [n] bytes}) and the saving factors.

    marks: {context length: all-global / hybrid ratio} to annotate."""
    GiB = 2 ** 30
    x = [int(L) / 1024 for L in lengths]
    style = {"hybrid": (COLORS["global"], "-", "hybrid (MiMo): 9 global + 39 rings of 128"),
             "all-global": (COLORS["moe"], "--", "all-global: 48 global layers, 4 KV heads"),
             "no-window": (COLORS["dense"], ":", "no-window: same heads, no token dropped")}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    ax = axes[0]
    for layout, values in kv.items():
        color, ls, label = style[layout]
        ax.plot(x, [float(v) / GiB for v in values], color=color, ls=ls, lw=2.2, label=label)
        ax.annotate(f"{float(values[-1]) / GiB:.1f} GiB", (x[-1], float(values[-1]) / GiB), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=8.5, color=color)
    ax.axhline(ring_bytes / GiB, color=COLORS["sliding"], lw=1.2)
    ax.text(1.05, ring_bytes / GiB * 1.15, f"the 39 rings alone: {ring_bytes / 1e6:.1f} MB, constant", fontsize=8,
            color="#b86f1f")
    ticks = [1, 4, 16, 32, 64, 128, 256]
    ax.set_xscale("log", base=2); ax.set_yscale("log")
    ax.set_xticks(ticks, [f"{t}K" for t in ticks]); ax.set_xlim(1, 420)
    ax.set_xlabel("context length (tokens)"); ax.set_ylabel("KV cache per sequence, bf16 (GiB)")
    ax.set_title("MiMo-V2-Flash KV cache vs context", fontsize=10); ax.legend(fontsize=8.5, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    ax = axes[1]
    hybrid = [float(v) for v in kv["hybrid"]]
    for layout in ("all-global", "no-window"):
        color, _, _ = style[layout]
        ax.plot(x, [float(v) / h for v, h in zip(kv[layout], hybrid)], color=color, lw=2.2, label=f"{layout} / hybrid")
    for level, text, color in [(6, "6x: idealised 5:1 SWA:global (1 layer in 6 global)", "grey"),
                               (48 / 9, "48/9 = 5.33x: the real pattern, 9 global of 48", COLORS["moe"]),
                               (348 / 36, "348/36 = 9.67x", COLORS["dense"])]:
        ax.axhline(level, color=color, ls=":", lw=1)
        ax.text(1.1, level + 0.12, text, fontsize=8, color=color)
    for L, ratio in marks.items():
        ax.plot(L / 1024, ratio, "o", color=COLORS["moe"])
        ax.annotate(f"{ratio:.2f}x at {L // 1024}K", (L / 1024, ratio), xytext=(-20, -18), textcoords="offset points",
                    fontsize=8.5, ha="center")
    ax.set_xscale("log", base=2); ax.set_xticks(ticks, [f"{t}K" for t in ticks]); ax.set_xlim(1, 300)
    ax.set_ylim(0, 10.5); ax.set_xlabel("context length (tokens)"); ax.set_ylabel("how much smaller the hybrid cache is")
    ax.set_title("saving factor vs context", fontsize=10); ax.legend(fontsize=8.5, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def kv_measured(measured, formula, title):
    """measured {model name: {L: bytes}} as points, formula {model name: {L: bytes}} as lines."""
    KiB = 1024
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    for (name, points), color in zip(measured.items(), [COLORS["global"], COLORS["moe"], COLORS["dense"]]):
        Ls = sorted(points)
        ax.plot(Ls, [points[L] / KiB for L in Ls], "o", color=color, ms=7, label=f"{name}: measured (tensor storage)")
        ax.plot(Ls, [formula[name][L] / KiB for L in Ls], "-", color=color, lw=1.2,
                label=f"{name}: config.kv_cache_bytes")
    ax.set_xlabel("tokens in the cache (L)"); ax.set_ylabel("KiB of keys and values allocated (bf16)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8.5); ax.grid(alpha=0.3); ax.set_xlim(0, None); ax.set_ylim(0, None)
    fig.tight_layout()
    return fig


# --- notebooks 04-08 ---
# (course helper B's section: figures of notebooks 04 to 08)


# ---------------------------------------------------------------- notebook 07
def hidden_state_errors(errors, bf16=(), floor=1e-9, tolerance=1e-4):
    """errors {case: [max |diff| of hidden state K]} on a log scale; bf16 cases dashed; 0 drawn at the floor."""
    fig, ax = plt.subplots(figsize=(10, 4.3))
    colors = plt.get_cmap("tab10").colors
    for i, (name, values) in enumerate(errors.items()):
        ax.plot(range(len(values)), [max(v, floor) for v in values], marker="os^vD<>"[i % 7], markersize=4,
                color=colors[i % 10], linestyle="--" if name in bf16 else "-", label=name)
    ax.axhline(tolerance, color="black", linewidth=1, linestyle=":")
    ax.text(0, tolerance * 1.4, f"float32 / FP8 tolerance {tolerance:g}", fontsize=8)
    ax.text(0, 1.5 * floor, "bit-identical (0) is drawn here", fontsize=8, va="bottom")
    ax.set_yscale("log"); ax.set_ylim(floor / 2, 5)
    ax.set_xlabel("hidden state K (0 = embeddings, K = output of layer K-1, last = final norm)")
    ax.set_ylabel("max |minimimo - official|")
    ax.set_title("every hidden state against the official implementation (dashed: bfloat16)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def fp8_grids(magnitude, grids, misses, block, head_size, name):
    """|fp8| of one weight under several row grids; each block labelled with its max (green = 448)."""
    rows, cols = magnitude.shape
    fig, axes = plt.subplots(1, len(grids), figsize=(4.4 * len(grids), 4.2), sharey=True)
    for ax, (grid, row_index) in zip(axes, grids.items()):
        ax.imshow(magnitude, cmap="Greys", vmin=0, vmax=448, aspect="auto")
        edges = [0] + [r for r in range(1, rows) if row_index[r] != row_index[r - 1]] + [rows]
        for top, bottom in zip(edges[:-1], edges[1:]):
            ax.axhline(top - 0.5, color="tab:blue", linewidth=1.5)
            for c0 in range(0, cols, block):
                block_max = magnitude[top:bottom, c0:c0 + block].max().item()
                ax.text(c0 + block / 2 - 0.5, (top + bottom) / 2 - 0.5, f"{block_max:.0f}", ha="center", va="center",
                        fontsize=9, color="white",
                        bbox=dict(boxstyle="round,pad=0.15", fc="tab:green" if block_max == 448 else "tab:red", ec="none"))
        for c0 in range(block, cols, block):
            ax.axvline(c0 - 0.5, color="tab:blue", linewidth=0.8)
        for head in range(1, rows // head_size):
            ax.axhline(head * head_size - 0.5, color="tab:orange", linewidth=2.5, linestyle="--")
        ax.set_title(f"{grid}\n{misses[grid]} block(s) with max |fp8| < 448", fontsize=10)
        ax.set_xlabel("input column")
    axes[0].set_ylabel("row (orange: kv head boundary)")
    fig.suptitle(f"{name}: |fp8| and the max of each block under {len(grids)} grids", fontsize=11)
    fig.tight_layout()
    return fig
