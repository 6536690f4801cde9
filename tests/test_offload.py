"""Offload: a logged no-op on CPU; on CUDA, saved activations leave the GPU and gradients stay identical."""

import copy
import logging

import pytest
import torch
from transformers import LlamaForCausalLM

from lowmem_train import StrategyError, apply_strategies
from lowmem_train.saved_tensors import saved_tensor_stages
from lowmem_train.strategies.offload import Offloaded, OffloadStage
from tiny_models import tiny_llama_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="offload moves CUDA tensors; needs a GPU")


def llama(device="cpu"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                                               attention_dropout=0.1)).to(device).train()
    ids = torch.randint(0, 96, (2, 128), device=device)
    return model, lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss


def grads(model, loss_fn):
    torch.manual_seed(5)
    loss_fn(model).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")
def test_on_cpu_it_is_a_logged_no_op_with_identical_grads(caplog):
    model, loss_fn = llama()
    with caplog.at_level(logging.WARNING):
        converted = apply_strategies(copy.deepcopy(model), "offload")
    assert "no CUDA device" in caplog.text and "no-op" in caplog.text
    expected, got = grads(model, loss_fn), grads(converted, loss_fn)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_stage_passes_cpu_tensors_and_non_tensors_through_unchanged():
    stage = OffloadStage(min_bytes=0, pin_memory=False)
    tensor = torch.randn(64, 64)
    assert stage.pack(tensor) is tensor
    payload = (tensor, 3, [tensor])
    packed = stage.pack(payload)
    assert packed[0] is tensor and packed[1] == 3 and packed[2][0] is tensor
    assert stage.unpack(packed)[0] is tensor


def test_negative_min_bytes_is_a_one_line_error():
    with pytest.raises(StrategyError, match="'min_bytes' must be >= 0"):
        apply_strategies(torch.nn.Linear(2, 2), {"offload": {"min_bytes": -1}})


@cuda
@pytest.mark.parametrize("spec", ["offload", ["checkpoint", "offload"], ["selective_checkpoint", "offload"]])
def test_cuda_grads_identical_and_saved_activations_leave_the_gpu(spec):
    model, loss_fn = llama("cuda")
    converted = apply_strategies(copy.deepcopy(model), spec)
    plain = apply_strategies(copy.deepcopy(model), [s for s in ([spec] if isinstance(spec, str) else spec)
                                                    if s != "offload"] or "none")
    expected = grads(model, loss_fn)
    for _ in range(2):  # selective_checkpoint decides on its first forward
        converted.zero_grad()
        got = grads(converted, loss_fn)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)

    def held_after_forward(m):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = loss_fn(m)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        return held

    grads(plain, loss_fn)  # let selective_checkpoint decide
    assert held_after_forward(converted) < 0.5 * held_after_forward(plain)


@cuda
def test_cuda_small_tensors_stay_on_the_gpu_and_large_ones_round_trip():
    stage = OffloadStage(min_bytes=1024, pin_memory=True)
    small, large = torch.randn(16, device="cuda"), torch.randn(1024, device="cuda")
    assert stage.pack(small) is small
    packed = stage.pack(large)
    assert isinstance(packed, Offloaded) and packed.host.device.type == "cpu" and packed.host.is_pinned()
    restored = stage.unpack(packed)
    assert restored.device == large.device and torch.equal(restored, large)


def test_targets_limit_offload_to_the_saves_of_those_subtrees(monkeypatch):
    """On CPU nothing moves, so record which modules' saves the stage would move."""
    model, loss_fn = llama()
    apply_strategies(model, {"offload": {"targets": ["layers.1"], "exclude": ["layers.1.mlp"]}})
    stage = saved_tensor_stages(model)[0]
    moved = []
    monkeypatch.setattr(OffloadStage, "_offload", lambda self, leaf: moved.append(self.scope[0].current()) or leaf)
    loss_fn(model).backward()
    assert moved and all(name.startswith("model.layers.1.") and ".mlp" not in name for name in moved)
    everywhere = apply_strategies(llama()[0], "offload")
    assert saved_tensor_stages(everywhere)[0].scope is None
    assert stage.scope[1]("model.layers.1.self_attn") and not stage.scope[1]("model.layers.0")
