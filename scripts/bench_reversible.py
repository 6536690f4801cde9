"""Saved bytes vs depth for none / checkpoint / reversible on a small Llama, and reconstruction error per dtype.

    python scripts/bench_reversible.py --depths 4 8 16

Bytes: SavedBytesMeter around the forward of the second step (the first is a drift-check step, which
stores the true block inputs). Reconstruction error: the drift guard's largest relative error over blocks.
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from lowmem_train import SavedBytesMeter, apply_strategies
from lowmem_train.strategies.reversible import use_plain_autograd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import tiny_llama_config  # noqa: E402


def build(layers, dtype):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=344, num_hidden_layers=layers,
                                              max_position_embeddings=256, attention_dropout=0.1)).to(dtype).train()


def step(model, ids):
    model.zero_grad()
    torch.manual_seed(3)
    with SavedBytesMeter(model) as meter:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return meter.bytes, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    ids = torch.randint(0, 96, (args.batch, 256))
    print("depth  none MiB  checkpoint MiB  reversible MiB  grad rel err vs plain autograd (fp32)")
    for depth in args.depths:
        row = {}
        for spec in ("none", "checkpoint", {"reversible": {"drift_check_every": 2}}):
            model = apply_strategies(build(depth, torch.float32), spec)
            step(model, ids)
            row[str(spec)], grads = step(model, ids)
        reference = copy.deepcopy(model)
        use_plain_autograd(reference)
        expected = step(reference, ids)[1]
        error = max(((grads[n] - expected[n]).norm() / expected[n].norm()).item() for n in expected)
        print(f"{depth:5d}  " + "  ".join(f"{b / 2**20:12.2f}" for b in row.values()) + f"  {error:.2e}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = apply_strategies(build(args.depths[0], dtype), {"reversible": {"drift_tolerance": 1.0}})
        step(model, ids)
        stack = model.model.layers[0]._lowmem_rev.stack
        print(f"reconstruction error {str(dtype):15s} depth {args.depths[0]}: {stack.max_error:.2e}")


if __name__ == "__main__":
    main()
