"""Bytes per parameter of four ways to fine-tune the llama_1b shape, predicted (an analytic model) vs measured
(lowmem-train's own accounting, memory_report.json of a short in-process run), all with checkpoint + chunked_ce.

    python scripts/bench_finetune_memory.py                          # llama_1b shape cut to 1 layer, seq 64, CPU
    python scripts/bench_finetune_memory.py --layers 2 --seq-len 256 --batch 1 --out table.md
    python scripts/bench_finetune_memory.py --model llama_tiny --layers 1 --seq-len 16   # seconds (smoke test)

Configurations (random init, ``recipe=llama_finetune data=synthetic``, ``strategy=[...,checkpoint,chunked_ce]``):
- ``full fp32 + AdamW``: model.dtype=float32, optimizer=adamw;
- ``full bf16 + AdamW8bit``: model.dtype=bfloat16, optimizer=adamw8bit (torchao);
- ``LoRA bf16``: strategy lora on a bf16 base (adapters train in fp32), AdamW;
- ``QLoRA NF4``: strategy.lora.quantize=nf4 (bitsandbytes, blocks of 64, double-quantised scales), AdamW.
``bytes/param`` is (weights + grads + optimizer state) / all parameters of the model (base + adapters; NF4
weights counted as the parameters they stand for). ``total`` adds the activations saved for backward.
The full-model rows (16 layers) are extrapolated: per-layer bytes scale with the layer count, the embedding
(tied: also the output head), the final norm and the activations of the loss do not.
The measured columns are memory_report.json's param_bytes (trainable + frozen), grad_bytes,
optimizer_state_bytes and activation_bytes; tests/test_bench_finetune_memory.py checks that they agree with
the analytic model within 5%. The default run (llama_1b, 1 layer) takes ~4 minutes and ~6 GiB on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lowmem_train.configs.groups import MODELS

ROOT = Path(__file__).resolve().parents[1]
GIB, MIB = 2**30, 2**20
CONFIGS = {
    # name: (model dtype, optimizer, lora quantize or None for full fine-tuning)
    "full fp32 + AdamW": ("float32", "adamw", None),
    "full bf16 + AdamW8bit": ("bfloat16", "adamw8bit", None),
    "LoRA bf16": ("bfloat16", "adamw", "none"),
    "QLoRA NF4": ("bfloat16", "adamw", "nf4"),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Fixed bytes per tensor, from the libraries' layouts (see predict()):
# bitsandbytes NF4, per weight: the 16-value NF4 code map and the 256-value code map of the 8-bit absmax (fp32),
# plus the ~170-byte serialised quant state its state dict carries (a JSON of shape, dtype, offset; 169-172 bytes)
NF4_TENSOR_EXTRA = 16 * 4 + 256 * 4 + 170
AO8_BLOCK = 256        # torchao AdamW8bit: per moment 1-byte codes, an fp32 scale per 256 values,
AO8_QMAP = 256 * 4     # and its own 256-value fp32 code map
AO8_MIN_NUMEL = 4096   # smaller tensors keep plain moments in the parameter's dtype (bf16 here, not fp32)
REFERENCES = [ROOT.parent / "shared" / "REFERENCES.md", ROOT / "shared" / "REFERENCES.md"]


@dataclass
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool  # the output head is the embedding (llama_1b); otherwise a separate vocab x hidden Linear

    @classmethod
    def of(cls, model: str, layers: int) -> "Shape":
        c = MODELS[model].config
        return cls(c["vocab_size"], c["hidden_size"], c["intermediate_size"], layers, c["num_attention_heads"],
                   c["num_key_value_heads"], bool(c.get("tie_word_embeddings", False)))

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's Linear layers: q, k, v, o, gate, up, down (no biases)."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        return [(h, h), (h, kv), (h, kv), (h, h), (h, self.intermediate), (h, self.intermediate),
                (self.intermediate, h)]


def predict(shape: Shape, dtype: str, optimizer: str, quantize: str | None, r: int, batch: int, seq: int) -> dict:
    """Bytes split into the part every layer repeats (``layer_*``) and the rest (``fixed_*``): embedding (tied
    output head), final norm, and the loss head's activations."""
    w = DTYPE_BYTES[dtype]
    h = shape.hidden
    norms = [h, h]  # input and post-attention RMSNorm weights of one layer
    lora = quantize is not None
    adapters = [n for i, o in shape.linears() for n in (r * i, r * o)] if lora else []  # lora_A, lora_B
    fixed_tensors = [shape.vocab * h, h] + ([] if shape.tied else [shape.vocab * h])  # embedding, final norm, head
    layer = {"params": sum(i * o for i, o in shape.linears()) + sum(norms) + sum(adapters)}
    fixed = {"params": sum(fixed_tensors)}
    if not lora:
        trainable = {"layer": [i * o for i, o in shape.linears()] + norms, "fixed": fixed_tensors}
        layer["weights"], fixed["weights"] = w * sum(trainable["layer"]), w * sum(trainable["fixed"])
        grad_bytes = state_bytes = w
    else:
        trainable = {"layer": adapters, "fixed": []}
        if quantize == "none":
            base = w * sum(i * o for i, o in shape.linears())
        else:  # NF4: 2 codes a byte; per 64-value block an 8-bit absmax; per 256 blocks an fp32 scale; code maps
            base = 0
            for i, o in shape.linears():
                n = i * o
                blocks = math.ceil(n / 64)
                base += math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + NF4_TENSOR_EXTRA
        layer["weights"] = base + w * sum(norms) + 4 * sum(adapters)  # adapters train in fp32
        fixed["weights"] = w * sum(fixed_tensors)
        grad_bytes = state_bytes = 4
    for part, target in (("layer", layer), ("fixed", fixed)):
        sizes = trainable[part]
        target["grads"] = grad_bytes * sum(sizes)
        if optimizer == "adamw":  # fp32 exp_avg + exp_avg_sq, and a 4-byte step per tensor
            target["optimizer"] = sum(8 * n + 4 for n in sizes)
        else:  # torchao AdamW8bit, two moments: quantized from 4096 values on, else in the parameter's dtype
            target["optimizer"] = sum(2 * (n + 4 * math.ceil(n / AO8_BLOCK) + AO8_QMAP) if n >= AO8_MIN_NUMEL
                                      else 2 * state_bytes * n for n in sizes) + 4 * len(sizes)
    # Saved for backward (SavedBytesMeter: parameters count zero): checkpoint keeps each block's input in the
    # compute dtype. After the last block: the final RMSNorm keeps its input upcast to fp32 and one fp32 rsqrt
    # per token, plus the normalised states in the compute dtype when its weight trains; chunked CE keeps the
    # final hidden states, the int64 targets and two fp32 values per token (largest logit, log-sum); a trained
    # embedding keeps the int64 token ids.
    tokens = batch * seq
    layer["activations"] = tokens * h * w
    fixed["activations"] = (tokens * h * 4 + tokens * 4 + (0 if lora else tokens * h * w)  # final norm
                            + tokens * h * w + tokens * 8 + tokens * 8                      # chunked CE
                            + (0 if lora else tokens * 8))                                  # embedding
    return {"layer": layer, "fixed": fixed}


def combine(parts: dict, layers: int) -> dict:
    return {k: parts["fixed"][k] + layers * parts["layer"][k] for k in parts["fixed"]}


def overrides(name: str, args, run_dir: Path) -> list[str]:
    dtype, optimizer, quantize = CONFIGS[name]
    strategies = "[lora,checkpoint,chunked_ce]" if quantize else "[checkpoint,chunked_ce]"
    out = ["recipe=llama_finetune", f"model={args.model}", "data=synthetic", f"model.dtype={dtype}",
           f"model.config.num_hidden_layers={args.layers}", f"optimizer={optimizer}", f"strategy={strategies}",
           f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch}",
           f"data.num_samples={args.batch * args.steps}", "trainer=debug", f"trainer.max_steps={args.steps}",
           "trainer.limit_val_batches=0", "trainer.accelerator=cpu", "logger=csv",
           # named: with one layer there is no repeated block for the defaults to find
           "strategy.checkpoint.targets=[LlamaDecoderLayer]"]
    if quantize:
        out += [f"strategy.lora.quantize={quantize}", f"strategy.lora.r={args.r}",
                r"strategy.lora.target_modules=['.*layers\.\d+\.(self_attn|mlp)\.\w+_proj']"]
    return out


def measure(name: str, args, run_dir: Path) -> dict:
    """One short training run in this process; the memory report's byte keys."""
    from hydra import compose, initialize_config_dir

    from lowmem_train.cli import CONFIG_DIR, CONFIG_NAME
    from lowmem_train.training import train

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAME, overrides=overrides(name, args, run_dir))
    cfg.run_dir = str(run_dir)
    report = train(cfg)
    saved = json.loads((run_dir / "memory_report.json").read_text())
    assert saved["param_bytes"] == report["param_bytes"]
    return report


def run(args) -> list[dict]:
    """Every configuration: predicted (at ``args.layers`` and at ``args.full_layers``) and measured bytes."""
    shape = Shape.of(args.model, args.layers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(CONFIGS):
            if args.configs and name not in args.configs:
                continue
            dtype, optimizer, quantize = CONFIGS[name]
            parts = predict(shape, dtype, optimizer, quantize, args.r, args.batch, args.seq_len)
            row = {"config": name, "layers": args.layers, "pred": combine(parts, args.layers),
                   "full": combine(parts, args.full_layers)}
            try:
                report = measure(name, args, Path(tmp) / f"run{index}")
            except Exception as exc:  # a combination that cannot run here: say why, in the table
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            else:
                row["meas"] = {"weights": report["param_bytes"], "grads": report["grad_bytes"],
                               "optimizer": report["optimizer_state_bytes"],
                               "activations": report["activation_bytes"]}
            rows.append(row)
    return rows


def state(row: dict, which: str) -> int:
    return sum(row[which][k] for k in ("weights", "grads", "optimizer"))


def total(row: dict, which: str) -> int:
    return state(row, which) + row[which]["activations"]


def table(rows: list[dict], args) -> str:
    lines = [f"{args.model} shape, {args.layers} decoder layer(s), batch {args.batch}, "
             f"seq {args.seq_len}, LoRA r={args.r}, {args.steps} steps, CPU; strategy checkpoint + chunked_ce",
             "",
             "| config | params | bytes/param pred | bytes/param meas | weights (MiB) | grads (MiB) | optimizer (MiB) "
             "| activations (MiB) | total pred (MiB) | total meas (MiB) | meas/pred |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        params = row["pred"]["params"]
        if "error" in row:
            lines.append(f"| {row['config']} | {params:,} | {state(row, 'pred') / params:.3f} | FAILED: {row['error']} "
                         f"| | | | | {total(row, 'pred') / MIB:.2f} | | |")
            continue
        m = row["meas"]
        lines.append(f"| {row['config']} | {params:,} | {state(row, 'pred') / params:.3f} | "
                     f"{state(row, 'meas') / params:.3f} | {m['weights'] / MIB:.2f} | {m['grads'] / MIB:.2f} | "
                     f"{m['optimizer'] / MIB:.2f} | {m['activations'] / MIB:.3f} | {total(row, 'pred') / MIB:.2f} | "
                     f"{total(row, 'meas') / MIB:.2f} | {total(row, 'meas') / total(row, 'pred'):.4f} |")
    lines += ["", f"EXTRAPOLATED to {args.full_layers} layers (analytic model; not measured), same batch and seq:", "",
              "| config | params | bytes/param | weights + grads + optimizer (GiB) | activations (GiB) | total (GiB) |",
              "|---|---|---|---|---|---|"]
    for row in rows:
        full = row["full"]
        lines.append(f"| {row['config']} | {full['params']:,} | {state(row, 'full') / full['params']:.3f} | "
                     f"{state(row, 'full') / GIB:.2f} | {full['activations'] / GIB:.3f} | {total(row, 'full') / GIB:.2f} |")
    reference = torchtune_reference()
    if reference:
        lines += ["", "torchtune's published peaks (Llama-3-8B, one 24 GiB card; ../shared/REFERENCES.md), for scale: "
                  + reference, "(theirs are CUDA peaks of an 8B model with its own activations and allocator; ours are "
                  "accounted bytes of a 1.2B model: compare the ordering and ratios, not the GiB)"]
    return "\n".join(lines)


def torchtune_reference() -> str | None:
    for path in REFERENCES:
        if path.is_file():
            lines = path.read_text().splitlines()
            for index, line in enumerate(lines):
                if "torchtune" in line and "QLoRA" in line:  # the bullet and its indented continuation lines
                    bullet = [line.strip(" -")]
                    for more in lines[index + 1:]:
                        if not more.startswith("  ") or more.lstrip().startswith("-"):
                            break
                        bullet.append(more.strip())
                    text = " ".join(bullet)
                    return text[:text.index(").") + 2] if ")." in text else text  # that sentence only
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_1b", help="a model config's shape (llama_1b; llama_tiny for tests)")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers to build (the full llama_1b has 16)")
    parser.add_argument("--full-layers", type=int, default=16, help="layer count of the extrapolated rows")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=None, help="a subset of the rows")
    parser.add_argument("--out", type=Path, default=None, help="also write the table: .md (markdown) or .csv")
    return parser.parse_args(argv)


def write_csv(rows: list[dict], path: Path) -> None:
    import csv

    keys = ["params", "weights", "grads", "optimizer", "activations"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "layers"] + [f"pred_{k}" for k in keys] + [f"meas_{k}" for k in keys[1:]]
                        + [f"full_{k}" for k in keys] + ["error"])
        for row in rows:
            meas = row.get("meas", {})
            writer.writerow([row["config"], row["layers"]] + [row["pred"][k] for k in keys]
                            + [meas.get(k, "") for k in keys[1:]] + [row["full"][k] for k in keys] + [row.get("error", "")])


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = run(args)
    text = table(rows, args)
    print(text)
    if args.out:
        if args.out.suffix == ".csv":
            write_csv(rows, args.out)
        else:
            args.out.write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
