"""Activation checkpointing: exact gradients, dropout and batch-norm handled, at least 2x fewer saved bytes."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from lowmem_train import SavedBytesMeter, apply_strategies, repeated_blocks
from tiny_models import tiny_llama_config


def saved_bytes_and_grads(model, loss_fn):
    with SavedBytesMeter(model) as meter:
        loss = loss_fn(model)
    loss.backward()
    return meter.bytes, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, loss_fn, strategy="checkpoint"):
    converted = apply_strategies(copy.deepcopy(model), strategy)
    torch.manual_seed(3)
    base_bytes, base_grads = saved_bytes_and_grads(model, loss_fn)
    torch.manual_seed(3)
    ckpt_bytes, ckpt_grads = saved_bytes_and_grads(converted, loss_fn)
    for name in base_grads:
        torch.testing.assert_close(ckpt_grads[name], base_grads[name], rtol=0, atol=0, msg=name)
    return base_bytes / ckpt_bytes, converted


def cifar_resnet18():
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def test_resnet18_cifar_batch128_saves_over_2x_with_equal_grads_and_buffers():
    torch.manual_seed(0)
    model = cifar_resnet18()
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    ratio, converted = compare(model, lambda m: nn.functional.cross_entropy(m(x), y))
    assert ratio >= 2.0, ratio
    for (name, a), b in zip(model.named_buffers(), converted.buffers()):
        assert torch.equal(a, b), f"batch-norm buffer {name} updated differently (recomputation must not update it)"


def test_small_llama_seq256_saves_over_2x_with_dropout_replayed():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                               max_position_embeddings=256, attention_dropout=0.2))
    model.train()
    ids = torch.randint(0, 96, (2, 256))
    ratio, _ = compare(model, lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss)
    assert ratio >= 2.0, ratio


@pytest.mark.parametrize("build, expected", [
    (cifar_resnet18, ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]),
    (lambda: torchvision.models.VisionTransformer(32, 8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32),
     [f"encoder.layers.encoder_layer_{i}" for i in range(3)]),
    (lambda: torchvision.models.convnext_tiny(), None),
    (lambda: torchvision.models.swin_t(), None),
    (lambda: BertModel(BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)),
     [f"encoder.layer.{i}" for i in range(3)]),
    (lambda: GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=3, n_head=2)), [f"transformer.h.{i}" for i in range(3)]),
    (lambda: torchvision.models.DenseNet(8, (2, 3), 16), [f"features.denseblock{b}.denselayer{i}"
                                                          for b, n in ((1, 2), (2, 3)) for i in range(1, n + 1)]),
])
def test_default_targets_find_repeated_blocks_without_per_model_rules(build, expected):
    model = build()
    names = [name for name, _ in repeated_blocks(model)]
    if expected is not None:
        assert names == expected
    else:  # ConvNeXt / Swin: the blocks of every stage, never the stage containers or the downsamplers
        classes = {type(model.get_submodule(n)).__name__ for n in names}
        assert classes in ({"CNBlock"}, {"SwinTransformerBlock"}), classes
        assert len(names) == sum(1 for m in model.modules() if type(m).__name__ in classes)


def test_checkpointed_model_deep_copies_and_runs_without_grad():
    model = apply_strategies(cifar_resnet18(), "checkpoint")
    clone = copy.deepcopy(model)
    assert clone.layer1[0].forward.__self__ is clone.layer1[0]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert list(model.state_dict()) == list(cifar_resnet18().state_dict())


@pytest.mark.parametrize("strategy", ["checkpoint", {"selective_checkpoint": {"memory_budget": 0.5}}])
def test_densenet_layers_get_the_feature_list_as_it_was_at_the_call(strategy):
    """A DenseNet block appends each layer's output to the list it passed that layer: the recomputation
    (and selective checkpoint's profiling) must see the list of the call, not the longer one."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(8, (3,), 16, bn_size=2, num_classes=4)
    converted = apply_strategies(copy.deepcopy(model), strategy)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):  # selective checkpoint decides on the first forward, stores on the second
        model.zero_grad()
        converted.zero_grad()
        torch.manual_seed(3)
        _, expected = saved_bytes_and_grads(model, lambda m: m(x).square().mean())
        torch.manual_seed(3)
        _, got = saved_bytes_and_grads(converted, lambda m: m(x).square().mean())
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
