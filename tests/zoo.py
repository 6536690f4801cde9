"""A zoo of common architectures in tiny configs, for the strategy conformance suite (tests/conformance.py).

Every model is built from a config object (no download) with 2 blocks per stack and widths of 16-64, so one
forward and backward takes a fraction of a second on a CPU; images are 64 px in batches of 4, token batches
2 x 16. ``traits`` say what a strategy can find in a model; ``tests/strategy_settings.py`` states, per
strategy, the traits it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import transformers as hf
from torch import nn
from torchvision import models as tv
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.efficientnet import _efficientnet_conf

from tiny_models import cnn_batch, tiny_cnn, tiny_llama_config

IMAGE_SIZE = 64  # ResNet-style stems divide by 32: at 32 px the last stage is 1x1 and batch norm degenerate
VOCAB = 96

# Traits:
# - linear_blocks: nn.Linear layers inside the repeated blocks that their parent calls;
# - gelu_silu: GELU/SiLU activations (or their Hugging Face classes); causal_lm: a Hugging Face causal LM;
# - residual_blocks: repeated blocks that map a hidden-state tensor to one of its shape and return nothing
#   else (not DenseNet's layers, which take a list, nor T5's, which hand a position bias on);
# - velora_layers: nn.Linear layers named like VeLoRA's defaults (v_proj, down_proj, qkv, fc2) that their
#   parent calls (torchvision Swin's qkv is read as a weight, not called).


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[], object]
    loss: Callable[[nn.Module, object], torch.Tensor]
    traits: frozenset[str]


def images(batch_size: int = 4):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            torch.randint(0, 10, (batch_size,), generator=generator))


def tokens(batch_size: int = 2, seq_len: int = 16):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (batch_size, seq_len), generator=generator)


def tokens_and_class(batch_size: int = 2, seq_len: int = 16):
    return tokens(batch_size, seq_len), torch.randint(0, 10, (batch_size,), generator=torch.Generator().manual_seed(2))


def seq2seq(batch_size: int = 2):
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (batch_size, 12), generator=generator),
            torch.randint(0, VOCAB, (batch_size, 8), generator=generator))


def classifier_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def causal_lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss  # use_cache defaults to on: blocks get a key/value cache


def hf_labels_loss(model, batch, input_key):
    x, y = batch
    return model(**{input_key: x}, labels=y).loss


def seq2seq_loss(model, batch):
    source, target = batch
    return model(input_ids=source, labels=target).loss


def resnet():
    return tv.ResNet(tv.resnet.BasicBlock, [2, 2, 1, 1], num_classes=10)


def mobilenet_v3():
    return tv.mobilenet_v3_small(width_mult=0.25, num_classes=10)


def efficientnet():
    settings, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.5)
    return tv.EfficientNet(settings, dropout=0.1, last_channel=last_channel, num_classes=10)


def convnext():
    stages = [CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)]
    return tv.ConvNeXt(stages, stochastic_depth_prob=0.1, layer_scale=0.5, num_classes=10)


def densenet():
    return tv.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10)


def vit():
    model = tv.VisionTransformer(image_size=IMAGE_SIZE, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                                 mlp_dim=64, num_classes=10)
    model.heads.head.reset_parameters()  # torchvision starts it at zero: a frozen zero head passes no gradient
    return model


def swin():
    return tv.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                              stochastic_depth_prob=0.1, num_classes=10)


TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def llama():
    return hf.LlamaForCausalLM(tiny_llama_config())


def qwen2():
    return hf.Qwen2ForCausalLM(hf.Qwen2Config(**TEXT, tie_word_embeddings=True))


def mistral():
    return hf.MistralForCausalLM(hf.MistralConfig(**TEXT, sliding_window=8))


def gpt2():
    return hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                    bos_token_id=0, eos_token_id=0))


def bert():
    return hf.BertForSequenceClassification(hf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=10))


def hf_vit():
    return hf.ViTForImageClassification(hf.ViTConfig(
        image_size=IMAGE_SIZE, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=10))


def t5():
    return hf.T5ForConditionalGeneration(hf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0))


def _arch(name, build, make_batch, loss, *traits):
    return Arch(name, build, make_batch, loss, frozenset(traits))


_blocks = ("residual_blocks",)
_vision = ("linear_blocks", "gelu_silu", "residual_blocks")
_causal = ("linear_blocks", "gelu_silu", "causal_lm", "velora_layers", "residual_blocks")
ZOO: dict[str, Arch] = {arch.name: arch for arch in [
    _arch("cnn", tiny_cnn, cnn_batch, classifier_loss, *_blocks),  # the suite's own TinyResNet, with dropout
    _arch("resnet", resnet, images, classifier_loss, *_blocks),
    _arch("mobilenet_v3", mobilenet_v3, images, classifier_loss, *_blocks),
    _arch("efficientnet", efficientnet, images, classifier_loss, "gelu_silu", *_blocks),
    _arch("convnext", convnext, images, classifier_loss, *_vision),
    _arch("densenet", densenet, images, classifier_loss),
    _arch("vit", vit, images, classifier_loss, *_vision),
    _arch("swin", swin, images, classifier_loss, *_vision),
    _arch("llama", llama, tokens, causal_lm_loss, *_causal),
    _arch("qwen2", qwen2, tokens, causal_lm_loss, *_causal),
    _arch("mistral", mistral, tokens, causal_lm_loss, *_causal),
    # its blocks hold transformers' Conv1D, not nn.Linear
    _arch("gpt2", gpt2, tokens, causal_lm_loss, "gelu_silu", "causal_lm", *_blocks),
    _arch("bert", bert, tokens_and_class, partial(hf_labels_loss, input_key="input_ids"), *_vision),
    _arch("hf_vit", hf_vit, images, partial(hf_labels_loss, input_key="pixel_values"), *_vision, "velora_layers"),
    _arch("t5", t5, seq2seq, seq2seq_loss, "linear_blocks", "gelu_silu"),
]}
