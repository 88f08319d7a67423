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


# ---------------------------------------------------------------- notebook 04
def moe_groups(biased, group_score, kept, chosen, chosen_without_groups, per_group, token):
    """One token's biased scores, coloured by group (grey = group dropped), chosen experts outlined."""
    n_experts, n_groups = len(biased), len(group_score)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    top = max(biased) * 1.3
    for e, v in enumerate(biased):
        g = e // per_group
        ax.bar(e, v, color=colors[g % len(colors)] if g in kept else "lightgrey",
               edgecolor="black" if e in chosen else "none", linewidth=2)
    for e in chosen_without_groups:
        if e not in chosen:
            ax.annotate(f"in the top-{len(chosen)}\nwithout groups", (e + 0.3, biased[e]), xytext=(e + 1.2, biased[e] * 1.02),
                        fontsize=8, va="center", arrowprops=dict(arrowstyle="->"))
    for g in range(n_groups):
        ax.axvline(g * per_group - 0.5, color="black", linewidth=0.5)
        ax.text(g * per_group + (per_group - 1) / 2, top * 0.98, f"group {g}: score {group_score[g]:.2f}" +
                (" (kept)" if g in kept else ""), ha="center", va="top", fontsize=8)
    ax.set_ylim(0, top); ax.set_xticks(range(n_experts))
    ax.set_xlabel("expert"); ax.set_ylabel("biased score s + b")
    ax.set_title(f"token {token}: {n_groups} groups, best {len(kept)} kept (coloured), {len(chosen)} experts chosen "
                 "(black outline)")
    fig.tight_layout()
    return fig


def moe_load(load_before, load_after, tokens, top_k, rounds, imbalance, rate, labels=("without bias", None)):
    """Left: every expert's load on a fresh batch, before and after balancing. Right: imbalance per round."""
    n_experts = len(load_before)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 1.2]})
    order = load_before.argsort(descending=True)
    ax.bar(range(n_experts), load_before[order], width=1.0, color="tab:red", alpha=0.55, label=labels[0])
    ax.bar(range(n_experts), load_after[order], width=1.0, color="tab:blue", alpha=0.7,
           label=labels[1] or f"with bias ({rounds} rounds)")
    ax.axhline(tokens * top_k / n_experts, color="black", linestyle="--", linewidth=1,
               label=f"balanced: n k / e = {tokens * top_k // n_experts}")
    ax.set_xlabel("expert (sorted by load without bias)"); ax.set_ylabel("tokens routed to the expert")
    ax.set_title(f"load of {n_experts} experts, top-{top_k}, on a fresh batch of {tokens} tokens"); ax.legend()
    if imbalance:
        ax2.plot(range(1, len(imbalance) + 1), imbalance, marker="o", markersize=3)
        ax2.axhline(1, color="black", linestyle="--", linewidth=1)
        ax2.set_xlabel("round of the bias update"); ax2.set_ylabel("max load / mean load")
        ax2.set_title(f"u = {rate}, training batch")
    else:
        ax2.axis("off")
    fig.tight_layout()
    return fig


def moe_active_experts(n_tokens, measured, expected, n_experts, top_k, expert_bytes):
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.plot(n_tokens, measured, "o", label="measured (balanced router)")
    ax.plot(n_tokens, expected, "-", color="tab:grey", label=r"$e\,(1-(1-k/e)^n)$")
    ax.axhline(n_experts, color="tab:red", linestyle="--", label=f"loop over all {n_experts} experts")
    ax.axhline(top_k, color="tab:green", linestyle=":", label=f"k = {top_k} (one token)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n_tokens[::2], [str(n) for n in n_tokens[::2]])
    ax.set_xlabel("tokens in the step (n)"); ax.set_ylabel("experts that receive tokens")
    ax.set_title(f"experts that run in one MoE layer ({n_experts} experts, top-{top_k})")
    secondary = ax.secondary_yaxis("right", functions=(lambda a: a * expert_bytes / 1e9, lambda g: g * 1e9 / expert_bytes))
    secondary.set_ylabel("FP8 expert weights read (GB / layer)")
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- notebook 05
MTP_STATES = {"accepted": "#9bd59b", "rejected": "#f2a0a0", "not reached": "#e3e3e3", "bonus": "#a9cdea"}


def mtp_cycles(trace, show, k):
    """trace: [{"drafts": [k ids], "target": [k+1 ids], "accepted": n}] per cycle; show(id) -> visible text."""
    fig, ax = plt.subplots(figsize=(2.2 * (k + 1) + 1.2, 0.34 * len(trace) + 1.3))
    for i, t in enumerate(trace):
        a = t["accepted"]
        for j in range(k + 1):
            if j < k:
                state = "accepted" if j < a else "rejected" if j == a else "not reached"
                text = show(t["drafts"][j])
            else:
                state, text = "bonus", show(t["target"][a])
            ax.add_patch(plt.Rectangle((j, i), 0.96, 0.92, color=MTP_STATES[state]))
            ax.text(j + 0.48, i + 0.46, text[:14], ha="center", va="center", family="monospace", fontsize=8,
                    color="#777777" if state == "not reached" else "black")
        ax.text(k + 1.1, i + 0.46, f"+{a + 1}", va="center", fontsize=8)
    ax.set_xlim(0, k + 1.5); ax.set_ylim(len(trace), 0)
    ax.set_xticks([j + 0.48 for j in range(k + 1)], [f"block {j} draft" for j in range(k)] + ["bonus (main)"])
    ax.xaxis.tick_top()
    ax.set_yticks([i + 0.46 for i in range(len(trace))], [f"cycle {i}" for i in range(len(trace))], fontsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(length=0)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in MTP_STATES.values()]
    ax.legend(handles, [f"draft {s}" if s != "bonus" else "bonus token" for s in MTP_STATES], loc="upper center",
              bbox_to_anchor=(0.5, -0.01), ncol=4, frameon=False, fontsize=8)
    total = sum(t["accepted"] + 1 for t in trace)
    ax.set_title(f"k = {k}: {len(trace)} cycles, {total} tokens from {len(trace)} main forwards "
                 f"(right: tokens per cycle)", fontsize=9, pad=24)
    fig.tight_layout()
    return fig


def acceptance_histograms(accept, mean_accept, prompts, new_tokens):
    """accept {k: [tokens per cycle]} for k >= 1, one panel per k."""
    ks = sorted(accept)
    fig, axes = plt.subplots(1, len(ks), figsize=(3.7 * len(ks), 3.1), sharey=True)
    for ax, k in zip(axes, ks):
        shares = [accept[k].count(n) / len(accept[k]) for n in range(1, k + 2)]
        ax.bar(range(1, k + 2), shares, color="#5b8fc9")
        ax.axvline(mean_accept[k], color="black", ls="--", lw=1)
        ax.text(mean_accept[k] + 0.06, 0.9 * max(shares), f"mean {mean_accept[k]:.2f}", fontsize=8)
        ax.set_xticks(range(1, k + 2)); ax.set_xlabel("tokens per main forward")
        ax.set_title(f"k = {k} drafts ({len(accept[k])} cycles)", fontsize=9)
    axes[0].set_ylabel("fraction of cycles")
    fig.suptitle(f"Acceptance length on held-out code, {prompts} prompts x {new_tokens} greedy tokens "
                 "(paper, k = 3: up to 3.6)", fontsize=9)
    fig.tight_layout()
    return fig


def mtp_speedup(ks, mean_accept, speedup, predicted, paper_tau=3.6, paper_speedup=2.6):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    ax1.plot(ks, [k + 1 for k in ks], ":", color="grey", label="ceiling k + 1")
    ax1.plot(ks, [mean_accept[k] for k in ks], "o-", color="#5b8fc9", label="measured (this model)")
    ax1.plot([3], [paper_tau], "*", ms=12, color="#d1495b", label="MiMo-V2-Flash, paper")
    ax1.set_xlabel("drafted tokens k"); ax1.set_ylabel("tokens per main forward"); ax1.set_xticks(ks)
    ax1.set_title("Acceptance length", fontsize=10); ax1.legend(fontsize=8)
    ax2.axhline(1, color="grey", lw=0.8)
    ax2.plot(ks, [speedup[k] for k in ks], "o-", color="#5b8fc9", label="measured wall-clock (CPU)")
    ax2.plot(ks[1:], [predicted[k] for k in ks[1:]], "s--", color="#8a8a8a", mfc="none", label="cost model")
    ax2.plot([3], [paper_speedup], "*", ms=12, color="#d1495b", label="MiMo-V2-Flash, paper")
    ax2.set_xlabel("drafted tokens k"); ax2.set_ylabel("speed-up over plain greedy"); ax2.set_xticks(ks)
    ax2.set_title("Decode speed-up, batch 1", fontsize=10); ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def mtp_entropy(fit, binned, x_greedy, per_prompt, x_text):
    """The paper's fit of acceptance against entropy, and this model's measurements."""
    import torch
    right = max(5.0, max(x for x, _ in binned) + 0.3, max(x_greedy) + 0.3, x_text + 0.3)
    xs = torch.linspace(0, right, 300)
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    ax.plot(xs, fit(xs), color="#d1495b", label=r"paper's fit $4(1 - 0.58\,x^{0.58})$ (MiMo-V2-Flash)")
    ax.plot([0.048], [3.6], "*", ms=12, color="#d1495b")
    ax.annotate("3.6 tokens", (0.048, 3.6), (0.25, 3.75), fontsize=8)
    ax.axhline(1, color="grey", lw=0.8, ls=":"); ax.text(right - 0.03, 0.85, "floor: 1 token per forward", ha="right", fontsize=7.5)
    ax.axhline(4, color="grey", lw=0.8, ls=":"); ax.text(right - 0.03, 4.07, "ceiling: 3 drafts + bonus", ha="right", fontsize=7.5)
    ax.plot(*zip(*binned), "o-", color="#5b8fc9", label="this model, cycles binned by entropy of their targets")
    ax.scatter(x_greedy, per_prompt, marker="s", color="#2c5d8f", zorder=3, label="this model, measured, one per prompt")
    ax.axvline(x_text, color="#5b8fc9", ls="--", lw=1, label="this model's entropy on the real held-out code")
    ax.set_xlabel("main-model next-token entropy x (nats)"); ax.set_ylabel("acceptance length, k = 3")
    ax.set_xlim(0, right); ax.set_ylim(0, 4.4)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


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


# ---------------------------------------------------------------- notebook 08
RANK_COLORS = [plt.cm.tab10(r) for r in range(8)]


def sharding_plan(plans, parts, group_colors):
    """plans {(setup, weight dtype): Plan}; parts {(setup, wd): [device][group] -> bytes} -> 2 x 2 stacked bars."""
    GiB = 2 ** 30
    fig, axes = plt.subplots(2, 2, figsize=(12.5, 8.2), sharey=True)
    for ax, ((setup, wd), p) in zip(axes.flat, plans.items()):
        rows = p.per_device()
        for d, groups in enumerate(parts[setup, wd]):
            bottom = 0.0
            for group, nbytes in groups.items():
                ax.bar(d, nbytes / GiB, bottom=bottom, color=group_colors[group], width=0.75,
                       edgecolor="none", label=group if d == 0 else None)
                bottom += nbytes / GiB
            if not rows[d]["fits"]:
                ax.bar(d, bottom, width=0.75, fill=False, edgecolor="#c00000", lw=2)
                ax.text(d, bottom / 2, f"over\nby\n{-rows[d]['free'] / GiB:.1f}\nGiB", ha="center", va="center",
                        fontsize=8, color="white", fontweight="bold")
            else:
                ax.text(d, bottom + 1.5, f"{rows[d]['total'] / rows[d]['capacity']:.0%}", ha="center", va="bottom",
                        fontsize=7.5)
        ax.axhline(p.capacity[0] / GiB, color="0.5", ls="--", lw=1, label="device memory")
        ax.axhline(p.usable(0) / GiB, color="k", lw=1.5, label="usable (90%)")
        verdict = "fits" if p.fits else f"{sum(not r['fits'] for r in rows)} of {len(rows)} devices overflow"
        ax.set_title(f"{setup}, {wd} weights: {verdict}", fontsize=10.5, color="k" if p.fits else "#c00000")
        ax.set_xticks(range(len(rows)), [f"cuda:{d}" for d in range(len(rows))], fontsize=8)
        ax.set_ylim(0, 150); ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("GiB per device")
    axes[0, 1].legend(fontsize=8, loc="upper right", ncol=2)
    fig.suptitle("MiMo-V2-Flash placed layer by layer on 8 GPUs (contiguous units: embedding, layers 0-47, head, MTP 0-2)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def _draw_heads(ax, geometry, world, y, title, owned_heads):
    from matplotlib.patches import Rectangle
    H, G = geometry.num_heads, geometry.num_kv_heads
    per_kv = H // G
    for r in range(world):                                    # query heads: one cell each, coloured by owner
        q, _ = owned_heads(H, G, r, world)
        for h in q.tolist():
            ax.add_patch(Rectangle((h, y + 1.1), 1, 0.9, color=RANK_COLORS[r], ec="white", lw=0.4))
    for g in range(G):                                        # kv heads: below the query heads that read them
        holders = [r for r in range(world) if g in owned_heads(H, G, r, world)[1].tolist()]
        width = per_kv / len(holders)
        for i, r in enumerate(holders):
            ax.add_patch(Rectangle((g * per_kv + i * width, y), width, 0.9, color=RANK_COLORS[r], ec="white", lw=1.5))
            label = f"kv {g}" if len(holders) == 1 else f"kv {g} (copy)"
            ax.text(g * per_kv + (i + 0.5) * width, y + 0.45, label, ha="center", va="center", fontsize=8,
                    color="white", fontweight="bold")
    ax.text(-1, y + 1.55, "q heads", ha="right", va="center", fontsize=8.5)
    ax.text(-1, y + 0.45, "kv heads", ha="right", va="center", fontsize=8.5)
    ax.text(0, y + 2.15, title, fontsize=10, va="bottom")


def sharding_heads(global_geometry, sliding_geometry, owned_heads, owned_experts, world=8, experts=256):
    from matplotlib.patches import Patch, Rectangle
    fig, ax = plt.subplots(figsize=(13, 5.0))
    _draw_heads(ax, global_geometry, world, 6.2, "global layer (9 layers: 0, 5, 11, ...): 64 query heads, 4 kv heads -> "
                "each kv head replicated on the 2 ranks whose query heads (above it) read it", owned_heads)
    _draw_heads(ax, sliding_geometry, world, 3.1, "sliding-window layer (39 layers): 64 query heads, 8 kv heads -> "
                "one kv head per rank", owned_heads)
    per_rank = experts // world
    for r in range(world):                                    # experts: 256 cells, 32 per rank
        for e in owned_experts(experts, r, world).tolist():
            ax.add_patch(Rectangle((e / 4, 1.1), 0.25, 0.9, color=RANK_COLORS[r], ec="none"))
        ax.text(r * 8 + 4, 1.55, f"experts {per_rank * r}-{per_rank * r + per_rank - 1}", ha="center", va="center",
                fontsize=7.5, color="white", fontweight="bold")
    ax.text(-1, 1.55, "experts", ha="right", va="center", fontsize=8.5)
    ax.text(0, 2.15, f"every MoE layer: {experts} routed experts -> {per_rank} per rank (router replicated, one all-reduce)",
            fontsize=10, va="bottom")
    ax.set_xlim(-7, 64.5); ax.set_ylim(0.9, 9.0); ax.axis("off")
    ax.legend(handles=[Patch(color=RANK_COLORS[r], label=f"rank {r}") for r in range(world)], ncol=world,
              loc="lower center", bbox_to_anchor=(0.53, -0.1), fontsize=8.5, frameon=False)
    ax.set_title(f"Tensor + expert parallelism on {world} ranks: who owns which heads and experts", fontsize=11.5)
    fig.tight_layout()
    return fig


def sharding_fp8_rows(reads, shared, rows_per_rank=192, block=128, world=8):
    from matplotlib.patches import Patch, Rectangle
    total = rows_per_rank * world
    fig, ax = plt.subplots(figsize=(12.5, 4.6))
    for r in range(world):                                   # the ranks' weight rows
        ax.add_patch(Rectangle((rows_per_rank * r, 9.4), rows_per_rank, 1.1, color=RANK_COLORS[r], ec="white", lw=1))
        ax.text(rows_per_rank * r + rows_per_rank / 2, 9.95, f"rank {r}", ha="center", va="center", fontsize=8.5,
                color="white", fontweight="bold")
    for b in range(total // block):                          # the FP8 blocks = scale rows
        is_shared = b in shared
        ax.add_patch(Rectangle((block * b, 8.0), block, 1.1, fc="#f2b134" if is_shared else ("0.85" if b % 2 else "0.93"),
                               ec="0.4", lw=0.8, hatch="//" if is_shared else None))
        ax.text(block * b + block / 2, 8.55, f"block {b}", ha="center", va="center", fontsize=7.5)
    for r in range(world):                                   # which scale rows each rank reads
        s0, s1 = reads[r][0], reads[r][-1] + 1
        y = 6.9 - 0.85 * r
        ax.add_patch(Rectangle((block * s0, y), block * (s1 - s0), 0.6, color=RANK_COLORS[r], alpha=0.85))
        ax.plot([rows_per_rank * r, rows_per_rank * (r + 1)], [y + 0.3, y + 0.3], color="k", lw=2.2)
        ax.text(-15, y + 0.3, f"rank {r} reads scale rows {s0}-{s1 - 1}", ha="right", va="center", fontsize=8)
    for x in range(0, total + 1, block):
        ax.axvline(x, color="0.6", lw=0.5, ls=":", zorder=0)
    ax.text(-15, 9.95, "k_proj rows", ha="right", va="center", fontsize=9)
    ax.text(-15, 8.55, f"{block}-row FP8 blocks", ha="right", va="center", fontsize=9)
    ax.set_xlim(-330, total + 9); ax.set_ylim(0.8, 10.7)
    ax.set_xticks(range(0, total + 1, block), [str(x) for x in range(0, total + 1, block)], fontsize=8)
    ax.set_yticks([]); ax.set_xlabel(f"row of the sliding-layer k_proj weight [{total}, 4096] ({world} kv heads x "
                                     f"{rows_per_rank} rows)")
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.legend(handles=[Patch(fc="#f2b134", hatch="//", ec="0.4", label="block shared by two ranks (both read its scale row)"),
                       plt.Line2D([], [], color="k", lw=2.2, label=f"the rank's own {rows_per_rank} rows")],
              loc="upper center", bbox_to_anchor=(0.55, -0.16), ncol=2, fontsize=8.5, frameon=False)
    ax.set_title(f"Sliding-layer k_proj over {world} ranks: {rows_per_rank}-row shards on a {block}-row FP8 grid",
                 fontsize=11)
    fig.tight_layout()
    return fig
