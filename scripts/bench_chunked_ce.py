"""Memory of a causal-LM step's loss path: the plain loss head against chunked_ce, with and without checkpoint.

    python scripts/bench_chunked_ce.py                                   # llama_1b shape cut to 2 layers, CPU
    python scripts/bench_chunked_ce.py --layers 16 --seqs 512 --vocabs 128256
    python scripts/bench_chunked_ce.py --device cuda --layers 16         # also the CUDA peak of forward + backward

Rows, per sequence length and vocabulary (Llama-3.2-1B's shape otherwise, random weights, fp32, batch 1):
- ``before``: the recipe before the loss head: Hugging Face logits, cross-entropy outside the model, the
  logits kept in the step output (alive into the next step);
- ``none``: the recipe's model with the plain loss head (whole-sequence fp32 logits inside the forward);
- ``chunked_ce``, ``checkpoint``, ``checkpoint+chunked_ce``.
``loss path``: what is saved for backward from the last hidden states on, plus what the step keeps (the
logits, before); ``total``: SavedBytesMeter over the whole forward, plus what the step keeps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lowmem_train import SavedBytesMeter, apply_strategies
from lowmem_train.causal_lm import CausalLMWithLossHead

MIB = 2**20
LLAMA_1B = Path(__file__).resolve().parents[1] / "configs" / "model" / "llama_1b.yaml"


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
    settings = OmegaConf.to_container(OmegaConf.load(LLAMA_1B).config)
    settings.update(vocab_size=vocab, num_hidden_layers=args.layers)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    with device:
        causal_lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Strategies change the model in place, so the rows share one model, applied in this order: the wrappers
    # only differ in their loss head, and checkpoint (on the shared decoder) comes last.
    plain = CausalLMWithLossHead(causal_lm)
    chunked = apply_strategies(CausalLMWithLossHead(causal_lm), {"chunked_ce": {"chunk_size": args.chunk_size}})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the llama_1b shape (16: all)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    print(f"llama_1b shape, {args.layers} layers, batch {args.batch}, fp32, chunk_size {args.chunk_size}, {args.device}")
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


if __name__ == "__main__":
    main()
