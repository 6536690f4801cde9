"""Memory of a causal-LM step's loss path: the plain loss head against chunked_ce.

    python scripts/bench_chunked_ce.py                      # the head's peak, SmolLM2's shape, bf16, CPU
    python scripts/bench_chunked_ce.py --device cuda        # also the CUDA allocator's peak
    python scripts/bench_chunked_ce.py --saved-bytes        # saved bytes of the whole step, llama_1b shape
    python scripts/bench_chunked_ce.py --saved-bytes --layers 16 --seqs 512 --vocabs 128256

Default (``head`` table): the loss head alone, from the last hidden states, forward + backward with the
output weight trained (random weights in SmolLM2-135M's head shape, vocab 49,152 x hidden 576, bf16), each
head in its own process after a warm-up step: the peak of live tensor bytes created meanwhile
(``LiveTensorBytes``: temporaries included), the growth of the process's resident set at its peak, for the
plain head, ``chunked_ce`` and torch's ``linear_cross_entropy`` as chunked_ce called it before issue 31
(``reduction="none"``, chunks of 4,096 tokens), and how far each one's loss and gradients are from the plain
head's.

``--saved-bytes`` (Llama-3.2-1B's shape otherwise, random weights, fp32, batch 1), rows:
- ``before``: the recipe before the loss head: Hugging Face logits, cross-entropy outside the model, the
  logits kept in the step output (alive into the next step);
- ``none``: the recipe's model with the plain loss head (whole-sequence fp32 logits inside the forward);
- ``chunked_ce``, ``checkpoint``, ``checkpoint+chunked_ce``.
``loss path``: what is saved for backward from the last hidden states on, plus what the step keeps (the
logits, before); ``total``: SavedBytesMeter over the whole forward, plus what the step keeps.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lowmem_train import SavedBytesMeter, apply_strategies
from lowmem_train.causal_lm import IGNORE_INDEX, CausalLMLossHead, CausalLMWithLossHead, LogitSettings, shifted_targets
from lowmem_train.configs.groups import LLAMA_1B
from lowmem_train.live_memory import LiveTensorBytes
from lowmem_train.strategies.chunked_ce import ChunkedCEOptions, ChunkedCrossEntropyHead

MIB = 2**20


class TorchLinearCrossEntropyHead(nn.Module):
    """torch's linear_cross_entropy as chunked_ce's default called it before issue 31 (per-token losses in the
    input dtype, 4,096 tokens per chunk), for comparison."""

    def forward(self, hidden, labels, output_embeddings):
        targets = shifted_targets(labels)
        per_token = nn.functional.linear_cross_entropy(
            hidden.flatten(0, 1), output_embeddings.weight, targets.flatten(), reduction="none",
            ignore_index=IGNORE_INDEX, options=nn.LinearCrossEntropyOptions(batch_chunk_size=4096, chunking_method=None))
        return per_token.float().view(targets.shape).sum(1), (targets != IGNORE_INDEX).sum(1)


HEADS = {"plain": lambda chunk_bytes: CausalLMLossHead(),
         "chunked_ce": lambda chunk_bytes: ChunkedCrossEntropyHead(LogitSettings(), chunk_bytes),
         "torch linear_cross_entropy": lambda chunk_bytes: TorchLinearCrossEntropyHead()}


def run_head(name: str, tokens: int, args) -> dict:
    """In a fresh process, after a warm-up step: forward + backward of one loss head on seeded random inputs
    (at least one target per batch). Its peak of live
    tensor bytes, the growth of the process's resident set at its peak (what the allocator and kernels
    hold too, which LiveTensorBytes does not see: buffers inside one operator, or inside a Python custom op
    such as torch's linear_cross_entropy), CUDA's peak on CUDA, the loss, gradients and seconds."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    embeddings = nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=dtype)
    hidden = torch.randn(1, tokens, args.hidden, device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, tokens), device=device)
    head = HEADS[name](args.chunk_bytes)
    step(head, hidden, labels, embeddings)  # warm: kernels compiled, caches and thread pools set up, as after a first step
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    resident = process_memory("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the resident high-water mark (VmHWM) to the resident set now
    start = time.perf_counter()
    with LiveTensorBytes() as live:
        loss = step(head, hidden, labels, embeddings)
    if cuda:
        torch.cuda.synchronize()
    result = {"peak": live.peak, "resident": process_memory("VmHWM") - resident,
              "seconds": time.perf_counter() - start, "loss": loss,
              "grads": (hidden.grad.cpu(), embeddings.weight.grad.cpu())}
    if cuda:
        result["cuda_peak"] = torch.cuda.max_memory_allocated() - base
    return result


def step(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, embeddings: nn.Module) -> float:
    """The head's forward and backward from fresh gradients; the loss (summed token losses / targets)."""
    hidden.grad = embeddings.weight.grad = None
    output = head(hidden, labels, embeddings)
    sums, counts = output if isinstance(output, tuple) else (output.per_sample_loss, output.per_sample_count)
    loss = sums.sum() / counts.sum()
    loss.backward()
    return loss.item()


def process_memory(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def bench_head(tokens: int, args) -> dict[str, dict]:
    results = {}
    for name in HEADS:  # one process each: the resident high-water mark is the process's
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results[name] = pool.submit(run_head, name, tokens, args).result()
    return results


def differing(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got != expected).float().mean().item()


def print_head_table(args) -> None:
    cuda = args.device.startswith("cuda")
    print(f"loss head alone, vocab {args.vocab:,} x hidden {args.hidden}, {args.dtype}, output weight trained, "
          f"chunk_bytes {args.chunk_bytes / MIB:g} MiB, {args.device}; each head in its own process")
    print("| tokens | head | live tensors peak (MiB) | process peak (MiB) |" + (" CUDA peak (MiB) |" if cuda else "")
          + " loss | loss vs plain (relative) | weight-grad values != plain | hidden-grad values != plain | seconds |")
    print("|---|---|---|---|" + ("---|" if cuda else "") + "---|---|---|---|---|")
    for tokens in args.tokens:
        results = bench_head(tokens, args)
        plain = results["plain"]
        for name, result in results.items():
            hidden_grad, weight_grad = result["grads"]
            print(f"| {tokens:,} | {name} | {result['peak'] / MIB:.1f} | {result['resident'] / MIB:.1f} |"
                  + (f" {result['cuda_peak'] / MIB:.1f} |" if cuda else "")
                  + f" {result['loss']:.7f} | {abs(result['loss'] / plain['loss'] - 1):.1e} |"
                  f" {differing(weight_grad, plain['grads'][1]):.1e} | {differing(hidden_grad, plain['grads'][0]):.1e} |"
                  f" {result['seconds']:.1f} |", flush=True)


def old_recipe_loss(causal_lm: nn.Module, hidden: torch.Tensor | None, ids: torch.Tensor):
    """The pre-loss-head recipe: full logits, a float copy for the loss; returns (loss, kept logits)."""
    if hidden is None:
        logits = causal_lm(input_ids=ids, use_cache=False).logits
    else:
        logits = causal_lm.get_output_embeddings()(hidden)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return loss, logits


def measure(model: nn.Module, step, device: torch.device) -> dict:
    """Saved bytes of ``step()``'s forward (+ what it keeps), and on CUDA the peak of forward + backward."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with SavedBytesMeter(model) as meter:
        loss, kept = step()
    figures = {"saved": meter.bytes, "kept": sum(t.nbytes for t in kept)}
    if device.type == "cuda":
        loss.backward()
        model.zero_grad(set_to_none=True)
        figures["peak"] = torch.cuda.max_memory_allocated()
    figures["seconds"] = time.perf_counter() - start
    return figures


def loss_of(output) -> tuple[torch.Tensor, list]:
    return output.per_sample_loss.sum() / output.per_sample_count.sum(), []


def bench(vocab: int, seqs: list[int], args) -> list[tuple]:
    device = torch.device(args.device)
    settings = dict(LLAMA_1B, vocab_size=vocab, num_hidden_layers=args.layers)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    with device:
        causal_lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Strategies change the model in place, so the rows share one model, applied in this order: the wrappers
    # only differ in their loss head, and checkpoint (on the shared decoder) comes last.
    plain = CausalLMWithLossHead(causal_lm)
    chunked = apply_strategies(CausalLMWithLossHead(causal_lm), {"chunked_ce": {"chunk_bytes": args.chunk_bytes}})
    rows = []
    for seq in seqs:
        ids = torch.randint(0, vocab, (args.batch, seq), device=device)
        hidden = torch.randn(args.batch, seq, config.hidden_size, device=device, requires_grad=True)
        head = {"before": lambda: old_recipe_loss(causal_lm, hidden, ids),
                "none": lambda: loss_of(plain.loss_head(hidden, ids, causal_lm.get_output_embeddings())),
                "chunked_ce": lambda: loss_of(chunked.loss_head(hidden, ids, causal_lm.get_output_embeddings()))}
        whole = {"before": lambda: old_recipe_loss(causal_lm, None, ids),
                 "none": lambda: loss_of(plain(input_ids=ids, labels=ids)),
                 "chunked_ce": lambda: loss_of(chunked(input_ids=ids, labels=ids))}
        results = {}
        for name in ("before", "none", "chunked_ce"):
            results[name] = (measure(causal_lm, head[name], device), measure(causal_lm, whole[name], device))
        rows.append((seq, vocab, results))
    # the shared decoder's blocks, checkpointed for both wrappers from here on (named: one layer does not repeat)
    apply_strategies(plain, {"checkpoint": {"targets": ["LlamaDecoderLayer"]}})
    for seq, _, results in rows:
        ids = torch.randint(0, vocab, (args.batch, seq), device=device)
        results["checkpoint"] = (results["none"][0], measure(causal_lm, lambda: loss_of(plain(input_ids=ids, labels=ids)),
                                                             device))
        results["checkpoint+chunked_ce"] = (results["chunked_ce"][0], measure(
            causal_lm, lambda: loss_of(chunked(input_ids=ids, labels=ids)), device))
    return rows


def print_saved_bytes_table(args) -> None:
    cuda = args.device.startswith("cuda")
    print(f"llama_1b shape, {args.layers} layers, batch {args.batch}, fp32, chunk_bytes {args.chunk_bytes / MIB:g} MiB, "
          f"{args.device}")
    print("| seq | vocab | strategy | loss path saved + kept (MiB) | total saved + kept (MiB) |"
          + (" CUDA peak fwd+bwd (MiB) |" if cuda else ""))
    print("|---|---|---|---|---|" + ("---|" if cuda else ""))
    for vocab in args.vocabs:
        for seq, _, results in bench(vocab, args.seqs, args):
            for name, (head, whole) in results.items():
                line = (f"| {seq} | {vocab:,} | {name} | {(head['saved'] + head['kept']) / MIB:.1f} | "
                        f"{(whole['saved'] + whole['kept']) / MIB:.1f} |")
                print(line + (f" {whole['peak'] / MIB:.0f} |" if cuda else ""), flush=True)
            before, chunked = results["before"][0], results["chunked_ce"][0]
            totals = {name: whole["saved"] + whole["kept"] for name, (_, whole) in results.items()}
            print(f"|  |  | ratios | before / chunked_ce: {(before['saved'] + before['kept']) / (chunked['saved'] + chunked['kept']):.0f}x"
                  f" | checkpoint / checkpoint+chunked_ce: {totals['checkpoint'] / totals['checkpoint+chunked_ce']:.1f}x |"
                  + (" |" if cuda else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[600, 8000], help="head table: tokens per batch")
    parser.add_argument("--vocab", type=int, default=49152, help="head table (SmolLM2's)")
    parser.add_argument("--hidden", type=int, default=576, help="head table (SmolLM2's)")
    parser.add_argument("--dtype", default="bfloat16", help="head table: weights and hidden states")
    parser.add_argument("--saved-bytes", action="store_true", help="the whole step's saved bytes instead")
    parser.add_argument("--layers", type=int, default=2, help="saved bytes: decoder layers of llama_1b (16: all)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 2048], help="saved bytes")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256], help="saved bytes")
    parser.add_argument("--batch", type=int, default=1, help="saved bytes")
    parser.add_argument("--chunk-bytes", type=int, default=ChunkedCEOptions.chunk_bytes)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.saved_bytes:
        print_saved_bytes_table(args)
    else:
        print_head_table(args)


if __name__ == "__main__":
    main()
