"""Activation bytes and step time of none / checkpoint / selective_checkpoint on a CIFAR ResNet-18 and a small Llama.

    python scripts/bench_selective_checkpoint.py --budget 0.5 --steps 5

Bytes: SavedBytesMeter around the forward. Time: median of the steps after the first (which profiles),
strategies interleaved step by step so load from other processes hits them alike.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from transformers import LlamaForCausalLM

from lowmem_train import SavedBytesMeter, apply_strategies
from lowmem_train.strategies.selective_checkpoint import block_decisions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import tiny_llama_config  # noqa: E402


def resnet18(batch):
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return model, lambda m: nn.functional.cross_entropy(m(x), y)


def llama(batch):
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                               num_attention_heads=4, max_position_embeddings=512))
    ids = torch.randint(0, 96, (batch, 512))
    return model, lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    for label, build in (("resnet18-cifar", resnet18), ("llama-4x256-seq512", llama)):
        base, loss_fn = build(args.batch)
        specs = {"none": "none", "checkpoint": "checkpoint",
                 "selective": {"selective_checkpoint": {"memory_budget": args.budget}}}
        models = {k: apply_strategies(copy.deepcopy(base), s) for k, s in specs.items()}
        times = {k: [] for k in models}
        saved = {}
        for step in range(args.steps):
            for key, model in models.items():
                model.zero_grad()
                start = time.perf_counter()
                with SavedBytesMeter(model) as meter:
                    loss = loss_fn(model)
                loss.backward()
                if step > 0:
                    times[key].append(time.perf_counter() - start)
                    saved[key] = meter.bytes
        median = {k: statistics.median(v) for k, v in times.items()}
        print(f"{label}: budget {args.budget}")
        for key in models:
            print(f"  {key:11s} saved {saved[key] / 2**20:8.2f} MiB ({saved[key] / saved['none']:.3f} of none)  "
                  f"step {median[key]:.3f} s ({median[key] / median['none']:.3f} of none)")
        print(f"  selective/checkpoint step-time ratio {median['selective'] / median['checkpoint']:.3f}; "
              f"extra time over none: selective {median['selective'] - median['none']:+.3f} s, "
              f"checkpoint {median['checkpoint'] - median['none']:+.3f} s")
        for decision in block_decisions(models["selective"]):
            print("   ", decision.describe())


if __name__ == "__main__":
    main()
