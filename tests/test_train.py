"""minimimo.train on a tiny setting: a stopped run resumed ends exactly where an uninterrupted one
ends, and the result is a loadable hub checkpoint with its training record."""

import ast
import json

import pytest
import torch

from minimimo import generate, load
from minimimo.model import MiMoForCausalLM
from minimimo.train import (bits_per_byte, chain_weights, lr_factor, main, self_written_pool, small_config,
                            summary_docstrings, trunk_hidden)

TINY = ["--steps", "6", "--batch", "2", "--seq", "32", "--vocab", "300", "--hidden", "64", "--window", "8",
        "--corpus-chars", "60000", "--val-chars", "2000", "--eval-every", "3", "--eval-context", "64",
        "--distill-steps", "0", "--save-minutes", "1000"]


def finished_state(work):
    return torch.load(work / "state.pt", weights_only=False)


def test_resumed_run_equals_uninterrupted(tmp_path):
    main(TINY + ["--out", str(tmp_path / "a"), "--work", str(tmp_path / "wa")])
    with pytest.raises(SystemExit, match="stopped after step 4"):
        main(TINY + ["--out", str(tmp_path / "b"), "--work", str(tmp_path / "wb"), "--stop-at", "4"])
    stopped = finished_state(tmp_path / "wb")
    assert (stopped["phase"], stopped["step"]) == ("main", 4)
    main(TINY + ["--out", str(tmp_path / "b"), "--work", str(tmp_path / "wb"), "--resume"])

    a, b = finished_state(tmp_path / "wa"), finished_state(tmp_path / "wb")
    assert a["phase"] == b["phase"] == "main_done"
    assert a["history"] == b["history"] and a["validation"] == b["validation"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert torch.equal(a["generator"], b["generator"])

    record = json.loads((tmp_path / "b" / "training.json").read_text())
    assert record["command"].startswith("python -m minimimo.train")
    assert "--steps 6" in record["command"] and "stop" not in record["command"]
    assert [row["step"] for row in record["validation"]] == [0, 3, 6]
    model = load(tmp_path / "b", dtype=torch.float32, progress=False)
    assert model.config.num_mtp_layers == 3 and model.config.vocab_size == 300


def test_bits_per_byte_scores_every_token_once():
    """A model that predicts uniformly over V tokens costs log2(V) bits per token, whatever the
    windows: the sliding windows must score each of the n tokens after the first exactly once."""
    vocab = 64

    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, vocab)

    ids = list(range(1, 50))
    n_bytes = 100
    for context in (4, 8, 16, 64):
        expected = (len(ids) - 1) * torch.log2(torch.tensor(float(vocab))).item() / n_bytes
        assert bits_per_byte(Uniform(), ids, n_bytes, context) == pytest.approx(expected, rel=1e-6)


def test_learning_rate_schedule():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10) == pytest.approx(0.1)
    factors = [lr_factor(s, 100, 10) for s in range(10, 101)]
    assert all(x >= y for x, y in zip(factors, factors[1:]))  # cosine decays monotonically


@pytest.mark.parametrize("self_written, autocast, floor, top1", [("0.5", "bfloat16", "1.0", "0"),
                                                                 ("1.0", "none", "0.25", "0.5")])
def test_distillation_trains_only_the_mtp_blocks(tmp_path, self_written, autocast, floor, top1):
    """Phase 2 (with a pool of the model's own greedy text, its trunk states computed once; the
    blocks in bfloat16 autocast or float32; positions weighted alike or by the chain of earlier
    blocks' agreement; KL alone or with a top-1 term) changes the MTP blocks and nothing else."""
    args = TINY[:TINY.index("--distill-steps")] + ["--steps", "2", "--distill-steps", "3", "--distill-batch", "2",
                                                   "--distill-pool", "4", "--save-minutes", "1000",
                                                   "--distill-self", self_written, "--distill-autocast", autocast,
                                                   "--distill-chain-floor", floor, "--distill-top1", top1]
    main(args + ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    before = load(tmp_path / "work" / "phase1", dtype=torch.float32, progress=False).state_dict()
    after = load(tmp_path / "out", dtype=torch.float32, progress=False).state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.mtp.") for name in changed), sorted(changed)[:5]
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert record["distill_args"]["self_written_rows_per_batch"] == round(2 * float(self_written))
    assert record["distill_args"]["self_written_pool"] == 4
    assert record["distill_args"]["autocast"] == autocast
    assert record["distill_args"]["chain_floor"] == float(floor)
    assert record["distill_args"]["top1"] == float(top1)
    assert all(param.dtype == torch.float32 for param in after.values())


def test_chain_weights_follow_the_earlier_blocks_agreement():
    """Block k's loss at q weighs 1 where blocks 0 .. k-1 all agreed with the main model at q (a
    draft there can be accepted), the floor elsewhere; block 0, and floor 1, weigh all alike."""
    assert torch.equal(chain_weights([], torch.zeros(2, 5), 0.25), torch.ones(2, 5))
    block0 = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])
    block1 = torch.tensor([[True, False, True, True], [True, True, False, True]])  # one position fewer
    assert torch.equal(chain_weights([block0], torch.zeros(2, 4), 1.0), torch.ones(2, 4))
    assert torch.equal(chain_weights([block0], torch.zeros(2, 4), 0.25),
                       torch.tensor([[1, 1, 0.25, 1], [0.25, 1, 1, 1]]))
    assert torch.equal(chain_weights([block0, block1], torch.zeros(2, 3), 0.0),
                       torch.tensor([[1.0, 0, 0], [0, 1, 0]]))


@pytest.mark.parametrize("option, value, message", [("--distill-chain-floor", "0", "must be in (0, 1]"),
                                                     ("--distill-chain-floor", "1.5", "must be in (0, 1]"),
                                                     ("--distill-top1", "-1", "must be >= 0")])
def test_phase2_loss_options_out_of_range_are_refused(tmp_path, option, value, message, capsys):
    with pytest.raises(SystemExit):
        main(TINY + ["--out", str(tmp_path / "out"), option, value])
    assert f"{option} {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_trunk_hidden_equals_the_trunk_row_by_row():
    """Phase 2's cached hidden states: the trunk's last hidden states of every row, whatever the
    chunking, with the model's training mode left as it was."""
    model = MiMoForCausalLM(small_config(300, 64, 8)).init_weights(0).train()
    rows = torch.randint(0, 300, (5, 16), generator=torch.Generator().manual_seed(2))
    hidden = trunk_hidden(model, rows, chunk=2)
    assert hidden.shape == (5, 16, 64) and hidden.dtype == torch.float32 and model.training
    with torch.no_grad():
        for row, h in zip(rows, hidden):
            torch.testing.assert_close(h, model.eval().trunk(row[None])[-1][0], rtol=1e-5, atol=1e-5)


def test_self_written_pool_is_greedy_text_after_corpus_prompts_in_chunks():
    """Every row: a stretch of the corpus (seq // 4 tokens), then the model's greedy continuation;
    exactly `rows` rows, whether they fill whole chunks or not."""
    model = MiMoForCausalLM(small_config(300, 64, 8)).init_weights(0).eval()
    data = torch.randint(0, 300, (2000,), generator=torch.Generator().manual_seed(1))
    windows = data.unfold(0, 4, 1)  # every 4-token stretch of the corpus
    for rows, chunk in ((5, 2), (4, 4), (3, 128), (0, 2)):
        pool = self_written_pool(model, data, rows, 16, seed=3, chunk=chunk)
        assert pool.shape == (rows, 16) and pool.dtype == torch.long
        for row in pool:
            assert (windows == row[:4]).all(1).any()
            assert torch.equal(generate(model, row[None, :4], 12)[0], row)


def test_phase_one_mtp_loss_trains_the_blocks_only_when_weighted(tmp_path):
    """--mtp-weight 0 (the default) leaves the MTP blocks to phase 2; a positive weight trains them
    in phase 1 too and records their losses."""
    args = TINY[:TINY.index("--steps")] + ["--steps", "2"] + TINY[TINY.index("--steps") + 2:]
    records = {}
    for weight in ("0", "0.5"):
        work = tmp_path / f"w{weight}"
        main(args + ["--mtp-weight", weight, "--out", str(tmp_path / f"o{weight}"), "--work", str(work)])
        records[weight] = finished_state(work)
    initial = MiMoForCausalLM(small_config(300, 64, 8)).init_weights(0).state_dict()
    for weight, state in records.items():
        mtp = [name for name in state["model"] if name.startswith("model.mtp.")]
        moved = [name for name in mtp if not torch.equal(state["model"][name], initial[name])]
        assert bool(moved) == (weight != "0"), (weight, moved[:3])
        assert ("mtp" in state["history"][0]) == (weight != "0")


def test_summary_docstrings_cut_prose_and_keep_code():
    text = ('"""Module summary\n   on two lines.\n\nLong prose.\n"""\nimport os\n\n\n'
            'class A:\n    r"""Class \\d summary.\n    \n    More.\n    """\n\n'
            '    def f(self):\n        """One paragraph only,\n        kept whole."""\n        return "\\n\\n"\n\n'
            '    def g(self):\n        \'\'\'Single.\n\n        Extra é.\'\'\'\n        x = 1\n        return x\n')
    cut = summary_docstrings(text, ast.parse(text))
    ast.parse(cut)
    assert cut == ('"""Module summary\n   on two lines."""\nimport os\n\n\n'
                   'class A:\n    r"""Class \\d summary."""\n\n'
                   '    def f(self):\n        """One paragraph only,\n        kept whole."""\n        return "\\n\\n"\n\n'
                   '    def g(self):\n        \'\'\'Single.\'\'\'\n        x = 1\n        return x\n')
    plain = "def h():\n    return 1\n"
    assert summary_docstrings(plain, ast.parse(plain)) == plain
