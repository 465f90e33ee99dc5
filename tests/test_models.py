"""Tests of nthr_book.models' helpers that other modules share: the LM head and eval mode."""

from __future__ import annotations

import pytest
import torch

from nthr_book.models import eval_mode, lm_head, tiny_random_model


def test_lm_head_reads_weight_bias_and_softcap():
    model = tiny_random_model(vocab_size=32, hidden_size=16)
    head = lm_head(model)
    assert head.module is model.get_output_embeddings()
    assert head.weight.shape == (32, 16) and not head.weight.requires_grad
    assert head.bias is None and head.softcap is None
    model.config.final_logit_softcapping = 2.5
    assert lm_head(model).softcap == 2.5
    model.config.final_logit_softcapping = 0.0  # 0 means off, as in transformers
    assert lm_head(model).softcap is None
    out = torch.nn.Linear(16, 32, bias=True)
    model.set_output_embeddings(out)
    assert torch.equal(lm_head(model).bias, out.bias) and not lm_head(model).bias.requires_grad


def test_eval_mode_restores_each_submodules_flag_even_after_an_error():
    model = tiny_random_model(vocab_size=32, hidden_size=16)
    model.train()
    frozen = next(m for m in model.modules() if m is not model)
    frozen.eval()  # one submodule already in eval mode: it must stay so
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == before
