"""Speculative decoding (`minimimo/speculative.py`): the acceptance rules alone, then whole runs.

The acceptance rules are pure tensor functions, checked here on hand-made tensors. Whole runs are
checked against their plain twin: greedy drafting gives every row of a batch exactly what plain
greedy gives it (ragged prompts, left padding, stop tokens, rows that finish in different cycles,
rings that wrap many times, k = 1..3), and speculative sampling keeps the target distribution.
"""

import pytest
import torch
from torch.nn import functional as F

import minimimo
import minimimo.defaults
import minimimo.speculative as speculative
from minimimo import MiMoConfig, MiMoForCausalLM, generate
from minimimo.mtp import mtp_logits
from minimimo.sampling import positions_from_mask


def mtp_model(window=3, vocab=256, seed=1, layers=8):
    config = MiMoConfig.tiny(num_hidden_layers=layers, sliding_window_size=window, num_mtp_layers=3, vocab_size=vocab)
    return MiMoForCausalLM(config).init_weights(seed).eval()


def padded_batch(lengths, vocab, seed=0):
    width = max(lengths)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=gen)
    mask = torch.stack([torch.arange(width) >= width - n for n in lengths]).long()
    return ids * mask, mask


# --- the acceptance rules, alone ---------------------------------------------------------------

def test_greedy_acceptance_takes_the_longest_agreeing_prefix_and_the_targets_next_token():
    drafts = torch.tensor([[5, 6, 7],    # all three agree: 3 accepted, the 4th target is the bonus
                           [5, 9, 7],    # the 2nd disagrees: 1 accepted, the target's 2nd token next
                           [1, 6, 7],    # the 1st disagrees: nothing accepted
                           [5, 6, 0]])   # a later agreement after a miss does not count
    targets = torch.tensor([[5, 6, 7, 8],
                            [5, 6, 7, 8],
                            [5, 6, 7, 8],
                            [5, 6, 7, 8]])
    accepted, next_token = speculative.accept_greedy(drafts, targets)
    assert accepted.tolist() == [3, 1, 0, 2]
    assert next_token.tolist() == [8, 6, 5, 7]
    accepted, next_token = speculative.accept_greedy(torch.tensor([[4, 6, 7]]), torch.tensor([[5, 6, 7, 8]]))
    assert accepted.tolist() == [0] and next_token.tolist() == [5]  # matches after the first miss are ignored


def test_sampled_acceptance_keeps_a_draft_with_probability_min_1_p_over_q():
    # vocab 3, k = 2. Draft 1 is token 0 with q = .5, p = .25: kept when u < p / q = 0.5.
    # Draft 2 is token 1 with q = .2, p = .6: always kept (p >= q).
    q = torch.tensor([[[.5, .3, .2], [.4, .2, .4]]])
    p = torch.tensor([[[.25, .5, .25], [.2, .6, .2], [.1, .1, .8]]])
    drafts = torch.tensor([[0, 1]])
    for u1, expected in ((0.49, 2), (0.51, 0)):
        accepted, next_probs = speculative.accept_sampled(drafts, q, p, torch.tensor([[u1, 0.99]]))
        assert accepted.tolist() == [expected]
        if expected == 2:  # all drafts kept: the next token comes from the target after the last draft
            torch.testing.assert_close(next_probs, p[:, 2])
        else:  # rejected at draft 1: sample from max(0, p - q) renormalised = (0, .2, .05) / .25
            torch.testing.assert_close(next_probs, torch.tensor([[0.0, 0.8, 0.2]]))


def test_sampled_acceptance_rejection_at_a_later_draft_and_p_equal_q():
    q = torch.tensor([[[.5, .5, 0.], [.1, .1, .8]],
                      [[.5, .5, 0.], [.2, .3, .5]]])
    p = torch.tensor([[[.5, .5, 0.], [.3, .3, .4], [1., 0., 0.]],
                      [[.5, .5, 0.], [.2, .3, .5], [0., 1., 0.]]])
    drafts = torch.tensor([[1, 2], [1, 2]])
    uniforms = torch.tensor([[0.0, 0.9], [0.0, 0.9]])  # draft 1 always kept (p = q); draft 2: u < p/q?
    accepted, next_probs = speculative.accept_sampled(drafts, q, p, uniforms)
    assert accepted.tolist() == [1, 2]  # row 0: .9 * .8 >= .4, rejected; row 1: p = q, kept
    torch.testing.assert_close(next_probs[0], torch.tensor([0.5, 0.5, 0.0]))  # (.2, .2, 0) renormalised
    torch.testing.assert_close(next_probs[1], torch.tensor([0.0, 1.0, 0.0]))  # the target after both drafts


def test_sampled_acceptance_never_divides_by_zero_when_the_residual_vanishes():
    # a rejection where max(0, p - q) is all zero can only come from rounding; fall back to p
    q = torch.tensor([[[.5, .5]]])
    p = torch.tensor([[[.5, .5], [.3, .7]]])
    accepted, next_probs = speculative.accept_sampled(torch.tensor([[0]]), q, p, torch.tensor([[1.5]]))
    assert accepted.tolist() == [0]
    torch.testing.assert_close(next_probs, p[:, 0])


# --- whole runs: greedy drafting == plain greedy ------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_speculative_equals_plain_greedy_random_mtp(k):
    model = mtp_model(window=3)
    ids, mask = padded_batch([17, 9, 4], 256)  # prompts and generation many times the window
    plain = generate(model, ids, 30, attention_mask=mask)
    spec, stats = generate(model, ids, 30, attention_mask=mask, mtp_steps=k, return_stats=True)
    assert torch.equal(spec, plain)
    assert all(1 <= n <= k + 1 for n in stats.accept_lengths)


def oracle_drafts(model, ids, mask, n, wrong_every):
    """Drafts that copy the true greedy continuation, except where (position + k) % wrong_every[row]
    == 0: the oracle then drafts a wrong token. One `wrong_every` per row: rows accept at their
    own rates and finish in different cycles."""
    longer = generate(model, ids, n + 4, attention_mask=mask)  # drafts past the end are right too
    full_mask = torch.cat([mask, torch.ones(len(ids), n + 4, dtype=torch.long)], 1)
    positions = positions_from_mask(full_mask)
    reference = torch.zeros(len(ids), positions.max() + 8, dtype=torch.long)
    for row in range(len(ids)):
        keep = positions[row] >= 0
        reference[row, positions[row][keep]] = longer[row][keep]
    every = torch.tensor(wrong_every)[:, None]

    def fake(model_, k, tokens, hidden, pos, cache=None, *, at=None, cos_sin=None):
        target = reference.gather(1, (pos.clamp_min(0) + k + 2).clamp_max(reference.shape[1] - 1))
        target = torch.where((pos + k) % every == 0, (target + 1) % model.config.vocab_size, target)
        logits = F.one_hot(target, model.config.vocab_size).float() * 30
        return logits if at is None else logits[:, at]

    return longer[:, :ids.shape[1] + n], fake


@pytest.mark.parametrize("wrong_every", [10**6, 5, 2])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rejected_drafts_leave_no_trace_across_ring_wraps(monkeypatch, k, wrong_every):
    model = mtp_model(window=3)
    ids, mask = padded_batch([13, 6], 256, seed=2)
    plain, fake = oracle_drafts(model, ids, mask, 36, [wrong_every] * 2)
    monkeypatch.setattr(speculative, "mtp_logits", fake)
    spec, stats = generate(model, ids, 36, attention_mask=mask, mtp_steps=k, return_stats=True)
    assert torch.equal(spec, plain)
    if wrong_every == 10**6:  # perfect drafts: every cycle accepts everything
        assert set(stats.accept_lengths) == {k + 1}
    else:
        assert len(set(stats.accept_lengths)) > 1


def test_a_cycle_that_accepts_every_draft_truncates_no_cache(monkeypatch):
    """Perfect drafts: every cycle keeps all k+1 verified positions, so no cache has anything to
    forget and none is truncated (before: every cache, every cycle). Bad drafts: they are."""
    from minimimo.cache import HybridCache, RingLayerCache

    model = mtp_model(window=3)
    ids, mask = padded_batch([13, 6], 256, seed=2)
    for wrong_every, expect_truncations in ((10**6, False), (2, True)):
        plain, fake = oracle_drafts(model, ids, mask, 25, [wrong_every] * 2)  # 25 = the first token + 6 * 4
        truncated = []
        with monkeypatch.context() as patch:
            patch.setattr(speculative, "mtp_logits", fake)
            for cls in (HybridCache, RingLayerCache):
                real = cls.truncate
                patch.setattr(cls, "truncate", lambda self, keep, real=real: truncated.append(1) or real(self, keep))
            spec = generate(model, ids, 25, attention_mask=mask, mtp_steps=3)
        assert torch.equal(spec, plain)
        assert bool(truncated) == expect_truncations


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rows_finishing_in_different_cycles(monkeypatch, k):
    """Row 0 (the longest prompt, no padding) drafts perfectly and overshoots max_new_tokens by k
    in its last cycle (38 = 1 + 4 * 9 + 1 for k = 3) while the other rows still run; before the fix
    its next drafts were written past the end of the token buffer (IndexError)."""
    model = mtp_model(window=3)
    ids, mask = padded_batch([13, 6, 9], 256, seed=3)
    plain, fake = oracle_drafts(model, ids, mask, 38, [10**6, 2, 3])
    monkeypatch.setattr(speculative, "mtp_logits", fake)
    spec, stats = generate(model, ids, 38, attention_mask=mask, mtp_steps=k, return_stats=True)
    assert torch.equal(spec, plain)
    assert stats.accept_lengths[0] == k + 1 and len(set(stats.accept_lengths)) > 1


def stop_token_met_late(new_ids):
    """A token that row 0 first emits after a few steps, and the other rows at other steps or never."""
    for token in new_ids[0, 4:].tolist():
        first = [int(row.tolist().index(token)) if token in row.tolist() else -1 for row in new_ids]
        if first[0] >= 4 and all(f != first[0] for f in first[1:]):
            return token
    raise AssertionError("no such token in this continuation")


@pytest.mark.parametrize("pad_token_id", [None, 0])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_stop_tokens_end_rows_in_different_cycles(monkeypatch, k, pad_token_id):
    model = mtp_model(window=3)
    ids, mask = padded_batch([13, 6, 9], 256, seed=4)
    free, fake = oracle_drafts(model, ids, mask, 30, [10**6, 2, 4])
    stop = stop_token_met_late(free[:, 13:])
    plain = generate(model, ids, 30, attention_mask=mask, stop_token_ids=[stop], pad_token_id=pad_token_id)
    monkeypatch.setattr(speculative, "mtp_logits", fake)
    spec = generate(model, ids, 30, attention_mask=mask, stop_token_ids=[stop], pad_token_id=pad_token_id,
                    mtp_steps=k)
    assert torch.equal(spec, plain)
    monkeypatch.undo()  # the real (random) MTP blocks: drafts mostly rejected
    spec = generate(model, ids, 30, attention_mask=mask, stop_token_ids=[stop], pad_token_id=pad_token_id,
                    mtp_steps=k)
    assert torch.equal(spec, plain)


def test_every_row_stopping_early_shortens_the_output_as_plain_greedy_does():
    model = mtp_model(window=3)
    ids, mask = padded_batch([7, 5], 256, seed=5)
    free = generate(model, ids, 25, attention_mask=mask)
    stops = [stop_token_met_late(free[:, 7:]), stop_token_met_late(free[[1, 0], 7:])]
    plain = generate(model, ids, 25, attention_mask=mask, stop_token_ids=stops)
    assert plain.shape[1] < 7 + 25
    for k in (1, 2, 3):
        assert torch.equal(generate(model, ids, 25, attention_mask=mask, stop_token_ids=stops, mtp_steps=k), plain)


def test_zero_and_one_new_tokens():
    model = mtp_model(window=3)
    ids, mask = padded_batch([5, 3], 256, seed=6)
    for n in (0, 1, 2):
        assert torch.equal(generate(model, ids, n, attention_mask=mask, mtp_steps=3),
                           generate(model, ids, n, attention_mask=mask))


def test_memory_follows_the_tokens_generated_not_max_new_tokens(monkeypatch):
    """Asking for 4,000 tokens (the most this config allows) and stopping after a few holds buffers for a few."""
    model = mtp_model(window=3)
    ids, mask = padded_batch([7, 5], 256, seed=5)
    free = generate(model, ids, 6, attention_mask=mask)
    stop = [int(free[0, -1]), int(free[1, -1])]  # each row's 6th new token, or earlier
    held = []
    real_start = speculative.start

    def start(*args):
        state, cache, mtp_caches = real_start(*args)
        held.append(state)
        return state, cache, mtp_caches

    monkeypatch.setattr(speculative, "start", start)
    out = generate(model, ids, 4000, attention_mask=mask, stop_token_ids=stop, mtp_steps=3)
    assert torch.equal(out, generate(model, ids, 4000, attention_mask=mask, stop_token_ids=stop))
    assert held[0].hidden.shape[1] < 64 and held[0].tokens.shape[1] < 64  # were 4,000 + 10 positions


def test_streaming_with_drafts_yields_the_plain_steps_as_soon_as_every_row_has_them(monkeypatch):
    from minimimo.generate import stream

    model = mtp_model(window=3)
    ids, mask = padded_batch([7, 5], 256, seed=5)
    free = generate(model, ids, 20, attention_mask=mask)
    stops = [stop_token_met_late(free[:, 7:])]
    plain = torch.stack(list(stream(model, ids, 20, attention_mask=mask, stop_token_ids=stops)), 1)
    for k in (1, 2, 3):
        stats = speculative.SpeculativeStats(k)
        drafted = torch.stack(list(stream(model, ids, 20, attention_mask=mask, stop_token_ids=stops, mtp_steps=k,
                                          stats=stats)), 1)
        assert torch.equal(drafted, plain) and stats.accept_lengths
    verifies = []
    real_verify = speculative.verify
    monkeypatch.setattr(speculative, "verify", lambda *a: verifies.append(1) or real_verify(*a))
    tokens = stream(model, ids, 20, attention_mask=mask, mtp_steps=3)
    assert torch.equal(next(tokens), plain[:, 0]) and not verifies  # the first token comes from the prefill alone


def test_mtp_steps_beyond_the_checkpoint_is_an_error():
    model = MiMoForCausalLM(MiMoConfig.tiny()).init_weights(0).eval()
    with pytest.raises(ValueError, match="0 MTP blocks"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 4, mtp_steps=1)


# --- the bundled trained checkpoint, batched ----------------------------------------------------

needs_bundled = pytest.mark.skipif(not minimimo.defaults.BUNDLED.joinpath("config.json").is_file(),
                                   reason="no bundled checkpoint")


@pytest.fixture(scope="module")
def bundled():
    return minimimo.load(minimimo.default_checkpoint(), dtype=torch.float32, progress=False)


@needs_bundled
@pytest.mark.parametrize("shape,seed", [((2, 32), 0), ((3, 8), 4), ((3, 8), 1)])
def test_batched_drafting_on_the_bundled_checkpoint_equals_plain_greedy_in_float32(bundled, shape, seed):
    """The batches of the bug report (these seeds raised IndexError before the fix: k = 3 greedy for
    the first two, k = 3 sampling for the third). In float32 on the CPU the (k+1)-token verify pass
    and the one-token step round alike here, so "lossless" holds token for token (see the module
    docstring for bfloat16)."""
    ids = torch.randint(0, bundled.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))
    plain = generate(bundled, ids, 40)
    for k in (1, 2, 3):
        spec, stats = generate(bundled, ids, 40, mtp_steps=k, return_stats=True)
        assert torch.equal(spec, plain), k
        assert all(1 <= n <= k + 1 for n in stats.accept_lengths)
        sampled = generate(bundled, ids, 40, mtp_steps=k, temperature=1.0, seed=k)  # crashed before, too
        assert sampled.shape == plain.shape and torch.equal(sampled[:, :shape[1]], ids)


@needs_bundled
def test_bundled_checkpoint_ragged_batch_with_stop_tokens(bundled):
    ids, mask = padded_batch([30, 12, 21], bundled.config.vocab_size, seed=7)
    free = generate(bundled, ids, 60, attention_mask=mask)  # 90 positions: the window is 32
    stop = int(free[1, 30 + 20])
    plain = generate(bundled, ids, 60, attention_mask=mask, stop_token_ids=[stop], pad_token_id=0)
    for k in (1, 2, 3):
        spec = generate(bundled, ids, 60, attention_mask=mask, stop_token_ids=[stop], pad_token_id=0, mtp_steps=k)
        assert torch.equal(spec, plain), k
        sampled = generate(bundled, ids, 60, attention_mask=mask, stop_token_ids=[stop], mtp_steps=k,
                           temperature=0.8, top_p=0.9, seed=0)
        assert sampled.shape[1] <= plain.shape[1] + 60


def check_drafts_against_uncached_passes(monkeypatch, model, k):
    """Wraps `speculative.draft`: every draft must equal MTP block j run from scratch (no cache)
    over positions 0 .. last, reading the verified tokens and this cycle's earlier drafts."""
    real_draft, checked = speculative.draft, []

    def checked_draft(model_, state, mtp_caches, active, sampler):
        drafts, probs = real_draft(model_, state, mtp_caches, active, sampler)
        for row in active.nonzero()[:, 0].tolist():
            q = torch.arange(int(state.last[row]) + 1)
            for j in range(k):
                logits = mtp_logits(model, j, state.tokens[row, q + j + 1][None], state.hidden[row, q][None], q[None])
                top2 = logits[0, -1].topk(2).values
                if top2[0] - top2[1] > 1e-4:  # not a near-tie
                    assert int(logits[0, -1].argmax()) == int(drafts[row, j]), (row, j)
                    checked.append(j)
        return drafts, probs

    monkeypatch.setattr(speculative, "draft", checked_draft)
    return checked


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_caches_keep_exactly_what_is_valid_across_rollbacks_and_ring_wraps(monkeypatch, k):
    """The drafts themselves never change the output, so this checks the MTP caches directly."""
    model = mtp_model(window=3)
    ids, mask = padded_batch([9, 4], 256, seed=8)
    checked = check_drafts_against_uncached_passes(monkeypatch, model, k)
    generate(model, ids, 30, attention_mask=mask, mtp_steps=k)
    assert len(checked) > 20 * k


@needs_bundled
def test_bundled_mtp_caches_keep_accepted_drafts_valid(monkeypatch, bundled):
    """The trained blocks get drafts accepted, so positions that read accepted drafts stay cached."""
    ids, mask = padded_batch([40, 17], bundled.config.vocab_size, seed=9)
    checked = check_drafts_against_uncached_passes(monkeypatch, bundled, 3)
    stats = generate(bundled, ids, 60, attention_mask=mask, mtp_steps=3, return_stats=True)[1]
    assert len(checked) > 30 and stats.mean_accept_length > 1.3


def test_drafting_runs_the_mlp_and_lm_head_at_the_newest_position_only():
    """A block catches up on several positions per cycle (their keys and values enter its cache),
    but it drafts one token per row: the MLP, the final norm and the LM head run on one column
    (before: on every catch-up column, and the head's output was cut to the last one)."""
    model = mtp_model(window=3)
    ids, mask = padded_batch([9, 4], 256, seed=8)
    widths = {"attention": [], "mlp": []}
    hooks = [h for block in model.model.mtp.layers for h in (
        block.self_attn.register_forward_hook(lambda m, args, out: widths["attention"].append(args[0].shape[1])),
        block.mlp.register_forward_hook(lambda m, args, out: widths["mlp"].append(args[0].shape[1])))]
    try:
        spec, stats = generate(model, ids, 30, attention_mask=mask, mtp_steps=3, return_stats=True)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(spec, generate(model, ids, 30, attention_mask=mask))
    assert max(widths["attention"]) > 1  # catch-up: blocks 1 and 2 read at least 2 new positions every cycle
    assert set(widths["mlp"]) == {1} and len(widths["mlp"]) == len(widths["attention"])


# --- speculative sampling keeps the target distribution -----------------------------------------

def test_speculative_sampling_matches_the_target_distribution():
    """Chi-square on the 2nd and 3rd sampled tokens (vocab 8): would fail if drafts were just accepted."""
    model = mtp_model(window=2, vocab=8, seed=3, layers=3)
    prompt = torch.tensor([[1, 5, 2]])
    with torch.no_grad():  # exact marginals of the 2nd and 3rd new tokens, by enumeration
        p1 = model(prompt)[0, -1].softmax(-1)
        seq2 = torch.cat([prompt.repeat(8, 1), torch.arange(8)[:, None]], 1)
        p2_given = model(seq2)[:, -1].softmax(-1)  # [t1, t2]
        seq3 = torch.cat([seq2.repeat_interleave(8, 0), torch.arange(8).repeat(8)[:, None]], 1)
        p3_given = model(seq3)[:, -1].softmax(-1).view(8, 8, 8)
        joint12 = p1[:, None] * p2_given
        marginal2, marginal3 = joint12.sum(0), (joint12[..., None] * p3_given).sum((0, 1))
    n = 6000
    out, stats = generate(model, prompt.repeat(n, 1), 3, temperature=1.0, seed=11, mtp_steps=2, return_stats=True)
    assert stats.mean_accept_length > 1.05  # some drafts were accepted (and some rejected)
    for column, expected in ((4, marginal2), (5, marginal3)):
        counts = torch.bincount(out[:, column], minlength=8).float()
        chi2 = ((counts - n * expected) ** 2 / (n * expected)).sum()
        assert chi2 < 24.3, f"token {column - 2}: chi2 {chi2:.1f} (7 dof, p = 0.001 bound 24.3)"
    # the draft distribution itself is far from the target: accepting drafts blindly would fail
    with torch.no_grad():
        h = model.trunk(prompt)[-1]
        q = mtp_logits(model, 0, torch.tensor([[3]]), h[:, -1:], torch.tensor([[2]]))[0, -1].softmax(-1)
    assert (q - p2_given[3]).abs().sum() > 0.2
