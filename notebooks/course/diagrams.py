"""Concept diagrams drawn with matplotlib: what a reader should picture before the code.

Notebooks 00-03: the decoder block, the hybrid layer pattern, GQA grouping, the ring buffer's
read-before-write. Each function returns a figure; `plots.save` writes it when asked. The numbers
drawn come from the config passed in, never typed into the picture.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

from .plots import COLORS


def _box(ax, x, y, w, h, text, color, text_color="white", fontsize=9):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec="black", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color=text_color)


def _arrow(ax, start, end, color="black", style="-|>", lw=1.2, rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color, lw=lw,
                                 connectionstyle=f"arc3,rad={rad}"))


# ---------------------------------------------------------------- notebook 00
def decoder_block(config):
    """Left: the whole stack (embedding, 48 layers, final norm, untied head, MTP beside).
    Right: one pre-norm decoder layer, h -> h + attn(norm(h)) -> x + ffn(norm(x))."""
    n_global = sum(not config.is_sliding(i) for i in range(config.num_hidden_layers))
    n_layers = config.num_hidden_layers
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 6.2), gridspec_kw={"width_ratios": [1, 1.25]})
    for ax in (left, right):
        ax.set_xlim(0, 10); ax.set_ylim(0, 12); ax.axis("off")

    # left: the stack
    _box(left, 4, 0.8, 5, 0.8, "input ids [b, t]", "white", "black")
    _box(left, 4, 2.2, 5, 0.9, f"embed_tokens  [{config.vocab_size:,} x {config.hidden_size}]", COLORS["light"], "black")
    _box(left, 4, 5.2, 5, 3.4, f"{n_layers} decoder layers\n(right)\n\n{n_global} global + {n_layers - n_global} sliding\n"
         f"layer 0 dense, {n_layers - 1} MoE", "#5b7fa6", fontsize=10)
    _box(left, 4, 8.2, 5, 0.8, "final RMSNorm", "#cccccc", "black")
    _box(left, 4, 9.6, 5, 0.9, f"lm_head (not tied)  [{config.vocab_size:,} x {config.hidden_size}]", COLORS["light"], "black")
    _box(left, 4, 11.0, 5, 0.8, "logits [b, t, vocab]", "white", "black")
    for y0, y1 in [(1.2, 1.75), (2.65, 3.5), (6.9, 7.8), (8.6, 9.15), (10.05, 10.6)]:
        _arrow(left, (4, y0), (4, y1))
    _box(left, 8.6, 7.0, 2.3, 2.4, f"{config.num_mtp_layers} MTP\nblocks\n(sliding, dense)\nnotebook 05", COLORS["sliding"],
         "black", fontsize=8.5)
    _arrow(left, (6.5, 7.3), (7.45, 7.3), rad=0.0)
    left.text(6.95, 7.5, "last hidden", fontsize=7.5, ha="center")
    left.set_title("the model", fontsize=11)

    # right: one layer
    x = 3.2
    right.text(x, 0.35, "h (residual stream) [b, t, hidden]", ha="center", fontsize=9)
    _box(right, x, 1.8, 3.2, 0.8, "RMSNorm", "#cccccc", "black")
    _box(right, x, 3.5, 3.6, 1.3, "attention\nglobal or sliding window\n(notebooks 01-03)", COLORS["global"], fontsize=8.5)
    right.add_patch(plt.Circle((x, 5.2), 0.32, fc="white", ec="black")); right.text(x, 5.2, "+", ha="center", va="center")
    _box(right, x, 6.8, 3.2, 0.8, "RMSNorm", "#cccccc", "black")
    _box(right, x, 8.5, 3.6, 1.3, "feed-forward\ndense SwiGLU (layer 0) or\nMoE, 8 of 256 (notebook 04)", COLORS["moe"], fontsize=8.5)
    right.add_patch(plt.Circle((x, 10.2), 0.32, fc="white", ec="black")); right.text(x, 10.2, "+", ha="center", va="center")
    right.text(x, 11.4, "h' to the next layer", ha="center", fontsize=9)
    for y0, y1 in [(0.6, 1.4), (2.2, 2.85), (4.15, 4.88), (5.52, 6.4), (7.2, 7.85), (9.15, 9.88), (10.52, 11.2)]:
        _arrow(right, (x, y0), (x, y1))
    for y0, y1 in [(0.9, 5.2), (5.7, 10.2)]:                       # residual connections around each half
        right.plot([x, x - 2.6, x - 2.6], [y0, y0, y1], color="#888888", lw=1.4)
        _arrow(right, (x - 2.6, y1), (x - 0.32, y1), color="#888888")
    right.text(x - 2.75, 3.0, "residual", rotation=90, fontsize=8, color="#666666", va="center", ha="right")
    right.text(x - 2.75, 8.0, "residual", rotation=90, fontsize=8, color="#666666", va="center", ha="right")
    right.text(5.6, 3.5, "x = h + Attn(RMSNorm(h))", fontsize=9.5, va="center")
    right.text(5.6, 8.5, "h' = x + FFN(RMSNorm(x))", fontsize=9.5, va="center")
    right.set_title("one decoder layer (pre-norm residual block)", fontsize=11)
    fig.tight_layout()
    return fig


def hybrid_pattern(config):
    """The 48 layers as two rows of tiles (attention kind, feed-forward kind) and the MTP blocks."""
    n = config.num_hidden_layers
    fig, ax = plt.subplots(figsize=(14, 3.0))
    for i in range(n):
        geometry = config.attention(i)
        ax.add_patch(plt.Rectangle((i, 1), 0.92, 0.9, color=COLORS["sliding" if geometry.sliding else "global"]))
        ax.add_patch(plt.Rectangle((i, 0), 0.92, 0.9, color=COLORS["moe" if config.is_moe(i) else "dense"]))
        if not geometry.sliding:
            ax.text(i + 0.46, 2.05, str(i), ha="center", va="bottom", fontsize=9)
    x0 = n + 2
    for m in range(config.num_mtp_layers):
        ax.add_patch(plt.Rectangle((x0 + m, 1), 0.92, 0.9, color=COLORS["sliding"], ec="k", lw=1.2))
        ax.add_patch(plt.Rectangle((x0 + m, 0), 0.92, 0.9, color=COLORS["dense"], ec="k", lw=1.2))
        ax.text(x0 + m + 0.46, 2.05, str(m), ha="center", va="bottom", fontsize=9)
    ax.text(x0 + 1.5, 2.55, "MTP blocks", ha="center", va="bottom", fontsize=9)
    ax.axvline(n + 1, color="grey", ls=":")
    ax.text(-0.6, 1.45, "attention", ha="right", va="center")
    ax.text(-0.6, 0.45, "feed-forward", ha="right", va="center")
    ax.set_xlim(-8, x0 + 3.5); ax.set_ylim(-0.6, 3.0); ax.axis("off")
    g, s = config.attention(0), config.attention(1)
    n_global = sum(not config.is_sliding(i) for i in range(n))
    handles = [Patch(color=COLORS[k]) for k in ("global", "sliding", "dense", "moe")]
    labels = [f"global ({n_global} layers, {g.num_kv_heads} KV heads, θ {g.rope_theta:.0e}, no sink)",
              f"sliding window {s.window} (+ itself), {s.num_kv_heads} KV heads, θ {s.rope_theta:.0e}, sink",
              f"dense SwiGLU {config.intermediate_size}",
              f"MoE: {config.n_routed_experts} experts x {config.moe_intermediate_size}, top-{config.num_experts_per_tok}"]
    ax.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.12))
    ax.set_title(f"{n} decoder layers (numbers = global layers) and the {config.num_mtp_layers} MTP blocks beside them")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- notebook 02
def gqa_grouping(config):
    """64 query heads share 8 (sliding) or 4 (global) KV heads: query head h reads KV head h // r."""
    fig, axes = plt.subplots(2, 1, figsize=(13, 5.4))
    palette = plt.get_cmap("tab10")
    for ax, layer, title in [(axes[0], 1, "sliding-window layer"), (axes[1], 0, "global layer")]:
        G = config.attention(layer)
        h, g = G.num_heads, G.num_kv_heads
        r = h // g
        width = 64 / h
        for head in range(h):
            group = head // r
            ax.add_patch(plt.Rectangle((head * width, 2), width * 0.85, 0.8, color=palette(group % 10)))
            if head % r == 0 or head == h - 1:
                ax.text(head * width + width * 0.42, 3.0, str(head), ha="center", fontsize=7)
        kv_width = 64 / g
        for group in range(g):
            x = group * kv_width + kv_width / 2
            ax.add_patch(plt.Rectangle((x - 1.6, 0), 3.2, 0.8, color=palette(group % 10), ec="black"))
            ax.text(x, 0.4, f"KV {group}", ha="center", va="center", fontsize=8, color="white")
            for head in (group * r, group * r + r - 1):            # the group's first and last query head
                _arrow(ax, (head * width + width * 0.42, 1.95), (x, 0.85), color=palette(group % 10), lw=0.9)
        ax.text(-1, 2.4, f"{h} query heads", ha="right", va="center", fontsize=9)
        ax.text(-1, 0.4, f"{g} KV heads", ha="right", va="center", fontsize=9)
        ax.set_xlim(-12, 65); ax.set_ylim(-0.3, 3.5); ax.axis("off")
        ax.set_title(f"{title}: {h} query heads in {g} groups of r = {r}; query head h reads KV head h // {r}   "
                     f"(einops: 'b (g r) t d -> b g r t d', g={g})", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- notebook 03
def ring_read_before_write(window=4, position=9):
    """One decode step of a ring of `window` slots: read (stored slots + the new token), then write."""
    W, p = window, position
    stored = {q % W: q for q in range(p - W, p)}                      # slot -> position before the step
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.2))
    for ax in axes:
        ax.set_xlim(-0.3, W + 1.6); ax.set_ylim(-0.9, 2.8); ax.axis("off")

    def slots(ax, y, content, highlight=None, new=None):
        for s in range(W):
            color = COLORS["sliding"] if s == highlight else COLORS["light"]
            ax.add_patch(plt.Rectangle((s, y), 0.9, 0.9, fc=color, ec="black"))
            ax.text(s + 0.45, y + 0.45, str(content[s]), ha="center", va="center", fontsize=11)
            ax.text(s + 0.45, y - 0.25, f"slot {s}", ha="center", fontsize=7.5)
        if new is not None:
            ax.add_patch(plt.Rectangle((W + 0.4, y), 0.9, 0.9, fc=COLORS["global"], ec="black"))
            ax.text(W + 0.85, y + 0.45, str(new), ha="center", va="center", fontsize=11, color="white")
            ax.text(W + 0.85, y - 0.25, "new", ha="center", fontsize=7.5)

    oldest = p - W
    slot_p = p % W
    slots(axes[0], 1.2, stored, highlight=slot_p, new=p)
    axes[0].plot([0, W + 1.3], [2.35, 2.35], color=COLORS["global"], lw=2)
    axes[0].text((W + 1.3) / 2, 2.45, f"what query {p} reads", ha="center", fontsize=8.5, color=COLORS["global"])
    axes[0].set_title(f"1. read: update() returns the {W} slots + the new token", fontsize=10)
    axes[0].text(0, -0.6, f"query {p} sees keys {oldest}..{p}: {W + 1} keys\n(key {oldest}, distance {W}, is still visible)",
                 fontsize=9)
    after = dict(stored); after[slot_p] = p
    slots(axes[1], 1.2, after, highlight=slot_p, new=p)
    _arrow(axes[1], (W + 0.85, 1.1), (slot_p + 0.45, 1.1), rad=-0.45, color=COLORS["global"], lw=1.6)
    axes[1].set_title(f"2. then write: {p} goes to slot {p} % {W} = {slot_p}", fontsize=10)
    axes[1].text(0, -0.6, f"it overwrites {oldest}, which no later query\n(position > {p}) can see", fontsize=9)
    slots(axes[2], 1.2, after, highlight=slot_p, new=p)
    axes[2].plot([0, W + 1.3], [2.35, 2.35], color=COLORS["moe"], lw=2)
    axes[2].text((W + 1.3) / 2, 2.45, f"what query {p} would read", ha="center", fontsize=8.5, color=COLORS["moe"])
    axes[2].set_title("the wrong order: write, then read", fontsize=10, color=COLORS["moe"])
    axes[2].text(0, -0.6, f"query {p} finds keys {sorted(after.values())[0]}..{p} (and {p} twice):\n"
                 f"key {oldest} (distance {W}) is lost", fontsize=9, color=COLORS["moe"])
    fig.suptitle(f"ring buffer of W = {W} slots, decode step for the token at position {p} (number = position held)",
                 fontsize=11)
    fig.tight_layout()
    return fig


# --- notebooks 04-08 ---
# (course helper B's section: the MTP block wiring and the draft/verify cycle, notebook 05)


def mtp_block(config):
    """Left: one MTP block, inputs to logits. Right: the three blocks chained on tokens at draft time."""
    g = config.attention(None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6.6), gridspec_kw={"width_ratios": [1.15, 1]})
    for ax in (left, right):
        ax.set_xlim(0, 10); ax.set_ylim(0, 13); ax.axis("off")

    # left: one block, bottom to top
    _box(left, 2.4, 0.7, 3.6, 0.8, "token t(q+k+1)", "white", "black")
    _box(left, 7.4, 0.7, 3.8, 0.8, "main model's h(q)\n(residual stream, pre-norm)", "white", "black", fontsize=8.5)
    _box(left, 2.4, 2.0, 3.6, 0.8, "embed_tokens (shared)", COLORS["light"], "black", fontsize=8.5)
    _box(left, 2.4, 3.2, 2.6, 0.7, "enorm", "#cccccc", "black")
    _box(left, 7.4, 3.2, 2.6, 0.7, "hnorm", "#cccccc", "black")
    _box(left, 4.9, 4.6, 6.4, 0.9, f"concat [embedding ; hidden]  ->  eh_proj  ({2 * config.hidden_size} -> {config.hidden_size})",
         "#5b7fa6", fontsize=8.5)
    _box(left, 4.9, 6.1, 2.6, 0.7, "RMSNorm", "#cccccc", "black")
    window = "all" if g.window is None else g.window
    _box(left, 4.9, 7.4, 5.6, 1.0, f"sliding attention: window {window}, sink per head,\nRoPE θ {g.rope_theta:.0e} at position q",
         COLORS["sliding"], "black", fontsize=8.5)
    left.add_patch(plt.Circle((4.9, 8.55), 0.28, fc="white", ec="black")); left.text(4.9, 8.55, "+", ha="center", va="center")
    _box(left, 4.9, 9.55, 2.6, 0.7, "RMSNorm", "#cccccc", "black")
    _box(left, 4.9, 10.65, 4.4, 0.8, f"dense SwiGLU ({config.intermediate_size})", COLORS["dense"], fontsize=8.5)
    left.add_patch(plt.Circle((4.9, 11.6), 0.28, fc="white", ec="black")); left.text(4.9, 11.6, "+", ha="center", va="center")
    _box(left, 4.9, 12.45, 6.2, 0.7, "final_layernorm -> lm_head (shared) -> logits for t(q+k+2)", COLORS["light"],
         "black", fontsize=8.5)
    for (x0, y0), (x1, y1) in [((2.4, 1.1), (2.4, 1.6)), ((2.4, 2.4), (2.4, 2.85)), ((7.4, 1.1), (7.4, 2.85)),
                               ((2.4, 3.55), (3.2, 4.15)), ((7.4, 3.55), (6.6, 4.15)), ((4.9, 5.05), (4.9, 5.75)),
                               ((4.9, 6.45), (4.9, 6.9)), ((4.9, 7.9), (4.9, 8.27)), ((4.9, 8.83), (4.9, 9.2)),
                               ((4.9, 9.9), (4.9, 10.25)), ((4.9, 11.05), (4.9, 11.32)), ((4.9, 11.88), (4.9, 12.1))]:
        _arrow(left, (x0, y0), (x1, y1))
    for y0, y1 in [(5.4, 8.55), (8.9, 11.6)]:                      # residuals
        left.plot([4.9, 1.2, 1.2], [y0, y0, y1], color="#888888", lw=1.3)
        _arrow(left, (1.2, y1), (4.62, y1), color="#888888")
    left.set_title("MTP block k at position q (u = eh_proj output; two residual updates)", fontsize=10.5)

    # right: chaining at draft time
    right.text(5, 12.3, "drafting after the main model's last position 'last'", ha="center", fontsize=10)
    _box(right, 5, 0.9, 7.6, 0.8, "main model: h(last), and its own next token t(last+1)", "#1f4e79", fontsize=9)
    colors = [COLORS["sliding"], "#e9c46a", "#f4a2a2"]
    for k in range(3):
        y = 3.2 + 3.0 * k
        token = "t(last+1)" if k == 0 else f"d{k}"
        _box(right, 5, y, 4.2, 1.1, f"MTP block {k}\nreads h(last) and {token}", colors[k], "black", fontsize=9)
        _box(right, 8.6, y + 1.45, 1.5, 0.7, f"d{k + 1}", "white", "black")
        _arrow(right, (7.1, y + 0.3), (8.6, y + 1.1))
        right.plot([1.0, 1.0], [1.3, y], color="#1f4e79", lw=1.2)
        _arrow(right, (1.0, y), (2.9, y), color="#1f4e79")
        if k:                                                      # the previous draft is this block's token
            _arrow(right, (8.6, y - 3.0 + 1.8), (7.1, y - 0.1), rad=0.2)
    _arrow(right, (5, 1.3), (5, 2.65))
    right.text(0.75, 6.5, "same h(last) for every block", rotation=90, color="#1f4e79", fontsize=8.5, va="center", ha="right")
    right.text(5, 11.45, "each block drafts from the previous draft (a chain on tokens, not on hidden states)",
               ha="center", fontsize=8.5)
    right.set_title(f"the {config.num_mtp_layers} blocks at draft time", fontsize=10.5)
    fig.tight_layout()
    return fig


def draft_verify_cycle(drafts=("d1", "d2", "d3"), accepted=2):
    """One greedy cycle: k drafts, one main forward on k+1 tokens, keep the agreeing prefix + one bonus."""
    k = len(drafts)
    fig, ax = plt.subplots(figsize=(12.5, 4.6))
    ax.set_xlim(-0.2, 11.2); ax.set_ylim(-0.6, 5.4); ax.axis("off")
    known = ["...", "t(last-1)", "t(last)"]
    for i, text in enumerate(known):
        _box(ax, 0.6 + i * 1.3, 4.4, 1.15, 0.7, text, COLORS["light"], "black", fontsize=8.5)
    _box(ax, 0.6 + 3 * 1.3, 4.4, 1.15, 0.7, "t(last+1)", "#1f4e79", fontsize=8.5)
    for j, d in enumerate(drafts):
        _box(ax, 0.6 + (4 + j) * 1.3, 4.4, 1.15, 0.7, d, COLORS["sliding"], "black")
    ax.text(10.9, 4.4, "1. draft: the MTP blocks\nguess k tokens", fontsize=9, va="center", ha="right")
    x0, x1 = 0.6 + 3 * 1.3 - 0.6, 0.6 + (3 + k) * 1.3 + 0.6
    _box(ax, (x0 + x1) / 2, 2.9, x1 - x0, 0.8, f"2. verify: ONE main-model forward on these {k + 1} tokens", "#5b7fa6",
         fontsize=9)
    for j in range(k + 1):
        x = 0.6 + (3 + j) * 1.3
        _arrow(ax, (x, 4.03), (x, 3.32))
        _arrow(ax, (x, 2.48), (x, 1.85))
        _box(ax, x, 1.45, 1.15, 0.7, f"a{j + 1}", "white", "black")
    for j in range(k):
        x = 0.6 + (4 + j) * 1.3
        ok = j < accepted
        state = "=" if ok else ("≠" if j == accepted else "not checked")
        color = COLORS["dense"] if ok else (COLORS["moe"] if j == accepted else "grey")
        ax.text(x, 0.55, f"d{j + 1} {state} a{j + 1}" if state != "not checked" else "(not checked)", ha="center",
                fontsize=8.5, color=color)
    ax.text(0.1, 1.45, "main model's\nargmax after\neach position", fontsize=8.5, va="center")
    kept = [d for d in drafts[:accepted]] + [f"a{accepted + 1}"]
    ax.text(5.6, -0.35, f"3. keep the agreeing drafts and the main model's next token: {' '.join(kept)}  "
            f"({accepted + 1} tokens for one forward; between 1 and {k + 1})", ha="center", fontsize=9.5)
    ax.set_title("one greedy draft-and-verify cycle (every kept token is the main model's own argmax)", fontsize=10.5)
    fig.tight_layout()
    return fig
