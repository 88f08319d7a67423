"""`minimimo verify` without running the official implementation: which configs transformers would
read differently, the fixed prompt, the report, and bad arguments. (The end-to-end comparison with
transformers runs in test_placement.py, over placed layers.)"""

import dataclasses

import pytest
import torch

from minimimo import MiMoConfig, default_checkpoint
from minimimo.verify import VerifyReport, fixed_prompt, official_rule_warnings, verify


def test_the_flash_config_follows_every_rule_transformers_hard_codes():
    assert official_rule_warnings(MiMoConfig.flash()) == []


@pytest.mark.parametrize("change, named", [
    (dict(rope_theta=1e6), "rope thetas"),
    (dict(layernorm_epsilon=1e-6), "layernorm_epsilon"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_a_departure_from_the_built_in_values_is_named(change, named):
    warnings = official_rule_warnings(dataclasses.replace(MiMoConfig.flash(), **change))
    assert len(warnings) == 1 and named in warnings[0] and warnings[0].startswith("transformers ignores")


@pytest.mark.parametrize("tokens", [1, 32, 500])
def test_fixed_prompt_has_exactly_the_tokens_asked_for(tokens, tmp_path):
    config = MiMoConfig.from_pretrained(default_checkpoint())
    with_tokenizer = fixed_prompt(default_checkpoint(), config, tokens)
    without = fixed_prompt(tmp_path, config, tokens)  # no tokenizer.json: fixed ids
    assert with_tokenizer.shape == without.shape == (1, tokens)
    assert torch.equal(with_tokenizer, fixed_prompt(default_checkpoint(), config, tokens))  # the same every time
    assert int(without.max()) < config.vocab_size


def test_fixed_prompt_longer_than_the_model_is_refused(tmp_path):
    config = MiMoConfig.from_pretrained(default_checkpoint())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        fixed_prompt(tmp_path, config, config.max_position_embeddings + 1)


@pytest.mark.parametrize("tokens", [0, -3, 2.5, True])
def test_verify_refuses_a_token_count_that_is_not_a_positive_whole_number(tokens):
    with pytest.raises(ValueError, match="tokens must be a whole number"):
        verify(default_checkpoint(), tokens=tokens)


def test_report_passes_only_with_agreement_and_small_differences():
    report = VerifyReport(32, 1.0, 2e-4, 1e-5, 0.1, 0.2, ["transformers ignores the config here: x"])
    assert report.ok(1e-3) and not report.ok(1e-4)
    assert not dataclasses.replace(report, top1_agreement=0.9).ok(1e-3)
    summary = report.summary()
    assert "top-1 agreement      100.00%" in summary and summary.endswith("warning: transformers ignores the config here: x")
