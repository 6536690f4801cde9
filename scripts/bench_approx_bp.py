"""Saved bytes, peak memory and throughput of approx_bp against plain backprop and checkpointing on a Llama.

    python scripts/bench_approx_bp.py                          # a small random-init Llama, CPU or CUDA
    python scripts/bench_approx_bp.py --llama-1b --device cuda # Llama-3.2-1B shape, seq 1024, bf16
    python scripts/bench_approx_bp.py --fidelity               # also: forward max abs diff, grad cosines

Each strategy gets a fresh model from the same seed, the same batch and AdamW. Throughput is measured over
full training steps (forward, backward, optimizer) after warm-up; peak memory (CUDA only) is the allocator's
peak during those steps, and "activations" is that peak minus the memory held before the forward.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_train import SavedBytesMeter, apply_strategies

SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-1b", action="store_true", help="Llama-3.2-1B shape (random init), seq 1024, bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--batch", type=int, default=None, help="default: 4 (2 with --llama-1b)")
    parser.add_argument("--seq", type=int, default=None, help="default: 256 (1024 with --llama-1b)")
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=["none", "approx_bp", "checkpoint", "approx_bp+checkpoint"])
    parser.add_argument("--fidelity", action="store_true", help="forward max abs diff and per-group grad cosine")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    args.batch = args.batch or (2 if args.llama_1b else 4)
    args.seq = args.seq or (1024 if args.llama_1b else 256)
    return args


def build(args) -> LlamaForCausalLM:
    settings = dict(LLAMA_1B if args.llama_1b else SMALL, max_position_embeddings=max(args.seq, 128))
    if args.layers:
        settings["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    config = LlamaConfig(**settings)
    with torch.device(args.device):
        return LlamaForCausalLM(config).to(args.dtype)


def with_strategy(args, spec: str) -> LlamaForCausalLM:
    """A fresh model (same seed, so the same weights) with ``spec`` applied: no other copy holds memory."""
    model = build(args)
    if spec != "none":
        apply_strategies(model, spec.split("+"))
    return model.train()


def loss_of(model, batch):
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, batch, args) -> dict:
    with SavedBytesMeter(model) as meter:
        loss = loss_of(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = args.device.startswith("cuda")
    peak = before = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(args.device)
            start = time.perf_counter()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
        loss_of(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    return {"saved": meter.bytes, "peak": peak, "activations": None if peak is None else peak - before,
            "tokens_per_s": batch.numel() / seconds, "step_ms": seconds * 1e3}


def fidelity(args, batch) -> None:
    """Forward max abs diff and the least gradient cosine per parameter group, approx_bp against none."""
    plain, approx = with_strategy(args, "none"), with_strategy(args, "approx_bp")
    losses = [loss_of(m, batch) for m in (plain, approx)]
    with torch.no_grad():
        logits = [m(input_ids=batch, use_cache=False).logits.float() for m in (plain, approx)]
    print(f"forward: max abs diff of logits {(logits[0] - logits[1]).abs().max().item():.3e}, "
          f"loss {losses[0].item():.6f} vs {losses[1].item():.6f}")
    for loss in losses:
        loss.backward()
    exact = dict(plain.named_parameters())
    groups: dict[str, list[float]] = defaultdict(list)
    for name, parameter in approx.named_parameters():
        if parameter.grad is None:
            groups[name.split(".")[-2] + " (folded, frozen)"].append(float("nan"))
            continue
        cosine = torch.nn.functional.cosine_similarity(parameter.grad.float().flatten(),
                                                       exact[name].grad.float().flatten(), dim=0)
        groups[name.split(".")[-2]].append(cosine.item())
    for group, values in groups.items():
        print(f"  grad cosine {group:32s} min {min(values):.4f}  over {len(values)} parameter(s)")


def main():
    args = parse_args()
    config = build(args).config
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq),
                          generator=torch.Generator().manual_seed(1)).to(args.device)
    print(f"Llama {config.num_hidden_layers} layers, hidden {config.hidden_size}, batch {args.batch} x seq "
          f"{args.seq}, {args.dtype}, {args.device}")
    if args.fidelity:
        fidelity(args, batch)
    rows = {}
    for spec in args.strategies:
        model = with_strategy(args, spec)
        rows[spec] = measure(model, batch, args)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    reference = rows.get("none")
    print(f"{'strategy':22s} {'saved MiB':>10s} {'vs none':>8s} {'peak MiB':>9s} {'act. MiB':>9s} "
          f"{'tokens/s':>10s} {'vs none':>8s} {'step ms':>8s}")
    for spec, row in rows.items():
        def mib(value):
            return "-" if value is None else f"{value / 2**20:.1f}"

        saved_ratio = f"{row['saved'] / reference['saved']:.3f}" if reference else "-"
        speed_ratio = f"{row['tokens_per_s'] / reference['tokens_per_s']:.3f}" if reference else "-"
        print(f"{spec:22s} {mib(row['saved']):>10s} {saved_ratio:>8s} {mib(row['peak']):>9s} "
              f"{mib(row['activations']):>9s} {row['tokens_per_s']:>10.0f} {speed_ratio:>8s} {row['step_ms']:>8.1f}")


if __name__ == "__main__":
    main()
