"""Benchmark strategy compress against plain backprop: saved bytes, peak memory, throughput, gradient cosine.

Runs a few SGD steps per configuration (none, compress at each --bits) on ResNet-50 and/or a Llama built
from a config (no downloads), on CUDA when available, else CPU. Peak memory is the CUDA allocator's peak
over a training step (not measured on CPU). Examples:

    python scripts/bench_compress.py --model resnet50 --batch 256 --image-size 224          # GPU
    python scripts/bench_compress.py --model resnet50 --batch 8 --image-size 64 --steps 3   # CPU smoke
    python scripts/bench_compress.py --model llama --batch 4 --seq-len 256 --adaptive
    python scripts/bench_compress.py --model llama --bias-samples 32   # mean of K gradients -> exact?
    python scripts/bench_compress.py --model llama --chunked-ce       # the loss path without full logits
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torchvision
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_train import SavedBytesMeter, apply_strategies
from lowmem_train.strategies.compress import calibrate


def resnet50_case(args, device):
    model = torchvision.models.resnet50(num_classes=1000)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    return model, lambda m: nn.functional.cross_entropy(m(x), y), args.batch


def llama_case(args, device):
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq_len)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    return model, lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss, args.batch * args.seq_len


def gradients(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    grads = {n: p.grad.detach().float().flatten() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def bias_check(model, loss_fn, exact, samples):
    """Squared error of one stochastic gradient over that of the mean of ``samples``: ``samples`` if the
    rounding is unbiased, less where the backward is nonlinear in what it saved (norms, softmax)."""
    reference = torch.cat([exact[n] for n in exact])
    draws = [torch.cat([g[n] for n in exact]) for g in (gradients(model, loss_fn) for _ in range(samples))]
    single = sum(float((d - reference).square().sum()) for d in draws) / samples
    mean = torch.stack(draws).mean(0)
    return single / float((mean - reference).square().sum())


def measure(model, loss_fn, items, device, steps):
    with SavedBytesMeter(model) as meter:
        loss = loss_fn(model)
    saved = meter.bytes
    del loss
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        loss_fn(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (cudnn autotune, Triton compilation)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    seconds = (time.perf_counter() - start) / steps
    return {"saved_bytes": saved, "peak_bytes": peak, "step_s": seconds, "items_per_s": items / seconds}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["resnet50", "llama", "both"], default="both")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--batch", type=int, default=None, help="default: 256 (resnet50) / 8 (llama) on CUDA, 8 / 2 on CPU")
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 on CUDA, 64 on CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 1024 on CUDA, 128 on CPU")
    parser.add_argument("--hidden", type=int, default=None, help="Llama hidden size (default 1024 CUDA / 256 CPU)")
    parser.add_argument("--layers", type=int, default=None, help="Llama layers (default 8 CUDA / 2 CPU)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 CUDA / 2 CPU)")
    parser.add_argument("--adaptive", action="store_true", help="also run adaptive compress (calibrated) at each --bits")
    parser.add_argument("--bias-samples", type=int, default=0,
                        help="K: also report how much closer the mean of K stochastic gradients is (K if unbiased)")
    parser.add_argument("--channels-last", action="store_true", help="ResNet in channels-last memory format")
    parser.add_argument("--chunked-ce", action="store_true",
                        help="llama: every configuration (none included) computes its loss with chunked_ce, so the "
                             "log-softmax that compress keeps exact is not in the step")
    parser.add_argument("--json", help="write the results to this file")
    return parser.parse_args()


def case_settings(args: argparse.Namespace, name: str, gpu: bool) -> argparse.Namespace:
    """The options with this model's device-dependent defaults filled in."""
    case = argparse.Namespace(**vars(args))
    case.batch = args.batch or {("resnet50", True): 256, ("resnet50", False): 8,
                                ("llama", True): 8, ("llama", False): 2}[name, gpu]
    case.image_size = args.image_size or (224 if gpu else 64)
    case.seq_len = args.seq_len or (1024 if gpu else 128)
    case.hidden = args.hidden or (1024 if gpu else 256)
    case.layers = args.layers or (8 if gpu else 2)
    case.steps = args.steps or (10 if gpu else 2)
    return case


def run_case(name: str, args: argparse.Namespace, device: torch.device):
    """One row per configuration of model ``name``: none, then compress at each of ``args.bits``."""
    torch.manual_seed(0)
    base, loss_fn, items = {"resnet50": resnet50_case, "llama": llama_case}[name](args, device)
    base = base.to(device)
    if args.chunked_ce and name == "llama":
        apply_strategies(base, "chunked_ce")
    if args.channels_last and name == "resnet50":
        base = base.to(memory_format=torch.channels_last)
    exact = gradients(base, loss_fn)
    configs = [("none", None)] + [(f"compress bits={b}", {"bits": b}) for b in args.bits]
    if args.adaptive:
        configs += [(f"compress adaptive bits={b}", {"bits": b, "adaptive": True}) for b in args.bits]
    baseline = None
    for label, options in configs:
        model = copy.deepcopy(base)
        if options is not None:
            apply_strategies(model, {"compress": options})
            if options.get("adaptive"):
                calibrate(model, lambda: loss_fn(model))
        grads = gradients(model, loss_fn)  # before the timed steps change the weights
        cos = [float(nn.functional.cosine_similarity(grads[n], exact[n], dim=0)) for n in exact]
        row = {"model": name, "config": label, "batch": args.batch, "device": str(device),
               "grad_cos_min": min(cos), "grad_cos_mean": sum(cos) / len(cos)}
        if args.bias_samples and options is not None:
            row["mean_of_k_error_reduction"] = bias_check(model, loss_fn, exact, args.bias_samples)
        row.update(measure(model, loss_fn, items, device, args.steps))
        baseline = baseline or row
        row["saved_ratio"] = baseline["saved_bytes"] / row["saved_bytes"]
        row["throughput_vs_none"] = row["items_per_s"] / baseline["items_per_s"]
        yield row


def print_row(row: dict, bias_samples: int) -> None:
    peak = f"{row['peak_bytes'] / 2**30:8.2f} GiB" if row["peak_bytes"] is not None else "     n/a    "
    bias = f"  mean of {bias_samples}: {row['mean_of_k_error_reduction']:.1f}x closer" \
        if "mean_of_k_error_reduction" in row else ""
    print(f"{row['model']:9} {row['config']:27} saved {row['saved_bytes'] / 2**20:9.1f} MiB ({row['saved_ratio']:5.1f}x)"
          f"  peak {peak}  {row['items_per_s']:9.1f} items/s ({row['throughput_vs_none']:5.1%})"
          f"  grad cos min {row['grad_cos_min']:.4f} mean {row['grad_cos_mean']:.4f}{bias}", flush=True)


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for name in (["resnet50", "llama"] if args.model == "both" else [args.model]):
        for row in run_case(name, case_settings(args, name, device.type == "cuda"), device):
            results.append(row)
            print_row(row, args.bias_samples)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
