"""Tiny models for strategy tests: a ResNet-style CNN and a Hugging Face Llama, both built from configs."""

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock
from transformers import LlamaConfig, LlamaForCausalLM


class TinyResNet(nn.Module):
    """Conv stem, two repeated BasicBlocks (conv, batch norm, ReLU), dropout, a linear head."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.dropout(self.pool(self.blocks(self.stem(x))).flatten(1)))


def tiny_cnn() -> nn.Module:
    return TinyResNet()


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    attention_dropout=0.0)
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_transformer() -> nn.Module:
    return LlamaForCausalLM(tiny_llama_config())


def cnn_batch(batch_size: int = 4):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch_size, 3, 8, 8, generator=generator), torch.randint(0, 10, (batch_size,), generator=generator)


def transformer_batch(batch_size: int = 2, seq_len: int = 16):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (batch_size, seq_len), generator=generator)


def loss_of(kind: str, model: nn.Module, batch) -> torch.Tensor:
    if kind == "cnn":
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)
    return model(input_ids=batch, labels=batch, use_cache=False).loss


MODELS = {"cnn": (tiny_cnn, cnn_batch), "transformer": (tiny_transformer, transformer_batch)}
