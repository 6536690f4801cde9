"""Selective checkpointing: exact gradients and buffers, the memory budget met, less recompute than checkpoint."""

import copy
import logging

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from lowmem_train import SavedBytesMeter, StrategyError, apply_strategies
from lowmem_train.strategies.selective_checkpoint import block_decisions
from tiny_models import TinyResNet, cnn_batch, tiny_cnn, tiny_llama_config


def bytes_and_grads(model, loss_fn):
    torch.manual_seed(3)
    with SavedBytesMeter(model) as meter:
        loss = loss_fn(model)
    loss.backward()
    return meter.bytes, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def small_llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                                               attention_dropout=0.2))
    ids = torch.randint(0, 96, (2, 128))
    return model.train(), lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss


def tiny_resnet():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    return TinyResNet(width=16).train(), lambda m: nn.functional.cross_entropy(m(x), y)


def test_llama_budget_half_stores_at_most_half_of_none_with_identical_grads():
    model, loss_fn = small_llama()
    none_bytes, expected = bytes_and_grads(model, loss_fn)
    converted = apply_strategies(copy.deepcopy(model), {"selective_checkpoint": {"memory_budget": 0.5}})
    for step in range(2):  # the first step profiles and decides, the second runs on the decision
        converted.zero_grad()
        got_bytes, got = bytes_and_grads(converted, loss_fn)
        if step == 1:
            assert 0.4 * none_bytes <= got_bytes <= 0.5 * none_bytes, got_bytes / none_bytes
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    decisions = block_decisions(converted)
    assert [d.name for d in decisions] == [f"model.layers.{i}" for i in range(3)]
    for decision in decisions:
        assert decision.stored_bytes < decision.none_bytes
        assert decision.stored_keys, "a half budget leaves room to store some outputs"
        assert decision.recompute_seconds < decision.full_recompute_seconds


def tiny_gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64))
    ids = torch.randint(0, 128, (2, 32))
    return model.train(), lambda m: m(input_ids=ids, labels=ids).loss  # use_cache defaults to True


def tiny_llama_with_cache():
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 32))
    return LlamaForCausalLM(tiny_llama_config()).train(), lambda m: m(input_ids=ids, labels=ids).loss


def tiny_cnn_loss():
    torch.manual_seed(0)
    x, y = cnn_batch(8)
    return tiny_cnn().train(), lambda m: nn.functional.cross_entropy(m(x), y)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama_with_cache, tiny_cnn_loss])
def test_half_budget_in_a_plain_loop_matches_plain_backprop_with_a_kv_cache_in_the_forward(make):
    """A KV cache passed to the blocks was appended to again by profiling and recomputation (issue 16)."""
    model, loss_fn = make()
    none_bytes, expected = bytes_and_grads(model, loss_fn)
    converted = apply_strategies(copy.deepcopy(model), {"selective_checkpoint": {"memory_budget": 0.5}})
    for step in range(3):  # the first forward profiles and decides, later ones store as decided
        converted.zero_grad()
        got_bytes, got = bytes_and_grads(converted, loss_fn)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=f"step {step}: {name}")
    assert got_bytes <= 0.5 * none_bytes, got_bytes / none_bytes
    assert any(d.stored_keys for d in block_decisions(converted))


def test_resnet_inplace_relu_and_batch_norm_buffers_match_plain_backprop():
    model, loss_fn = tiny_resnet()
    converted = apply_strategies(copy.deepcopy(model), {"selective_checkpoint": {"memory_budget": 0.6}})
    for _ in range(2):
        model.zero_grad()
        _, expected = bytes_and_grads(model, loss_fn)
    for _ in range(2):  # the first forward profiles, the second stores outputs as decided
        converted.zero_grad()
        _, got = bytes_and_grads(converted, loss_fn)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    for (name, a), b in zip(model.named_buffers(), converted.buffers()):
        assert torch.equal(a, b), f"buffer {name} differs: profiling or recomputation updated batch norm"
    assert any(d.stored_keys for d in block_decisions(converted))


def test_smaller_budget_stores_fewer_bytes_and_budget_one_stores_more_than_checkpoint():
    model, loss_fn = small_llama()
    measured = {}
    for spec in ("checkpoint", {"selective_checkpoint": {"memory_budget": 0.2}},
                 {"selective_checkpoint": {"memory_budget": 1.0}}):
        converted = apply_strategies(copy.deepcopy(model), spec)
        bytes_and_grads(converted, loss_fn)  # selective_checkpoint decides on its first training forward
        measured[str(spec)] = bytes_and_grads(converted, loss_fn)[0]
    values = list(measured.values())
    assert values == sorted(values) and len(set(values)) == 3, measured


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5])
def test_budget_outside_unit_interval_is_a_one_line_error(budget):
    with pytest.raises(StrategyError, match=r"'memory_budget' must be in \(0, 1\]"):
        apply_strategies(TinyResNet(), {"selective_checkpoint": {"memory_budget": budget}})


def test_checkpoint_on_the_same_blocks_is_refused():
    with pytest.raises(StrategyError, match="'selective_checkpoint' cannot rebuild its forward, 'checkpoint' already does"):
        apply_strategies(TinyResNet(), ["checkpoint", "selective_checkpoint"])


def test_resumed_run_reuses_the_checkpointed_decisions_without_profiling(tmp_path, caplog):
    from conftest import compose_config
    from lowmem_train.training import train

    tiny = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=4",
            "trainer.max_epochs=5", "strategy=selective_checkpoint")
    with caplog.at_level(logging.INFO, logger="lowmem_train.strategies.selective_checkpoint"):
        first = train(compose_config(*tiny, "trainer.max_steps=2", "trainer.enable_checkpointing=true",
                                     run_dir=tmp_path / "first"))
        profiled = [r for r in caplog.records if "stores" in r.getMessage()]
        caplog.clear()
        resumed = train(compose_config(*tiny, "trainer.max_steps=4",
                                       f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}",
                                       run_dir=tmp_path / "resumed"))
        assert len(profiled) == 4 and not [r for r in caplog.records if "stores" in r.getMessage()]
    report = first["strategy_report"]["selective_checkpoint"]
    assert resumed["strategy_report"]["selective_checkpoint"] == report
    assert list(report["blocks"]) == [f"causal_lm.model.layers.{i}" for i in range(4)]
    assert report["stored_bytes"] < report["none_bytes"] and report["recompute_s"] < report["full_checkpoint_recompute_s"]
