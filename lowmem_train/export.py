"""What a run hands over besides its memory report: the trained model in its library's own format, and the
model's answers to a few prompts before and after training.

A full fine-tune (every parameter trained, no architecture-changing strategy) ends with
``<run_dir>/hf_model``, written by the recipe's ``export`` (for a causal LM a Hugging Face model directory
with its tokenizer). ``lowmem-train export <run_dir> [--out DIR]`` writes the same from the run's
``checkpoints/last.ckpt``: the model is rebuilt from the run's ``.hydra/config.yaml`` and seed, as the run
built it, and the checkpoint's weights (trainable parameters and buffers) loaded into it. Runs whose result
is not a whole model (LoRA adapters: ``<run_dir>/adapter``) are refused in one line saying where it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import lightning as L
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.tensor import DTensor

from . import checkpoints
from .errors import ConfigError, LowmemError
from .recipe import Recipe

EXPORT_DIR = "hf_model"
USAGE = "lowmem-train export <run_dir> [--out DIR]"


def exports_whole_model(recipe: Recipe, model: nn.Module, strategies) -> bool:
    """Whether the end of this run writes ``hf_model``: the recipe can export, the data is real (``data=synthetic``
    is a benchmark: a llama_1b run would write gigabytes of noise), every parameter trained (a frozen base means
    the run's result is its adapters), the architecture is the model's own and the weights are whole in this
    process (not sharded)."""
    return (type(recipe).export is not Recipe.export
            and recipe.data_cfg.get("name") != "synthetic"
            and all(p.requires_grad for p in model.parameters())
            and not any(s.changes_architecture for s in strategies)
            and not any(isinstance(p, DTensor) for p in model.parameters()))


def export_at_end(recipe: Recipe, model: nn.Module, strategies, run_dir: Path) -> str | None:
    """Write ``<run_dir>/hf_model`` after a full fine-tune; its name, or None. A failure to write it is said
    and leaves the run's other results alone."""
    if not exports_whole_model(recipe, model, strategies):
        return None
    try:
        recipe.export(model, run_dir / EXPORT_DIR)
    except LowmemError as exc:
        print(f"{EXPORT_DIR} not written: {exc}")
        return None
    return EXPORT_DIR


def export_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write the model of the run in ``run_dir`` (its ``checkpoints/last.ckpt``) into ``out`` (default
    ``<run_dir>/hf_model``), which must be new or empty."""
    from .training import build_recipe

    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"export: {run_dir} is not a lowmem-train run directory (no .hydra/config.yaml)")
    checkpoint_path = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint_path.exists():
        raise ConfigError(f"export: {run_dir} has no checkpoints/last.ckpt (trained with "
                          "trainer.enable_checkpointing=false?)")
    if checkpoint_path.resolve().is_dir():
        raise ConfigError(f"export: {checkpoint_path} is a sharded checkpoint (trainer=fsdp), which export does not "
                          "read; resume it on one device without trainer=fsdp and export that run")
    out = out or run_dir / EXPORT_DIR
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export: --out {out} already exists and is not empty; choose a new directory")
    checkpoint = checkpoints.read_checkpoint(str(checkpoint_path))
    changed = checkpoint.get(checkpoints.KEY, {}).get("architecture")
    if changed:
        raise ConfigError(f"export: {run_dir} was trained with strategy '{changed[0]}', which changes the "
                          "architecture: its weights compute another function in the model's own code")
    cfg = OmegaConf.load(config_file)
    L.seed_everything(int(cfg.get("seed", 0)), verbose=False)  # weights the checkpoint lacks, rebuilt as the run did
    recipe = build_recipe(cfg)
    model = recipe.build_model()
    state = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise ConfigError(f"export: {checkpoint_path} holds weights the model has not ({unexpected[0]}): a strategy "
                          f"added modules; LoRA adapters are saved in {run_dir / 'adapter'} (load them with PEFT)")
    dtypes = {value.dtype for value in state.values() if value.is_floating_point()}
    if len(dtypes) == 1:  # the dtype it trained in (trainer.precision=bf16-true casts the model)
        model.to(dtypes.pop())
    model.load_state_dict(state, strict=False)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        recipe.export(model, out)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr and exit status 2, like every other bad input."""

    def error(self, message: str):
        print(f"lowmem-train: error: export: {message}; usage: {USAGE}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> int:
    """``lowmem-train export <run_dir> [--out DIR]``."""
    parser = OneLineParser(prog="lowmem-train export", usage=USAGE,
                           description="Write a run's trained model from its checkpoints/last.ckpt in the format its "
                                       "library loads (a Hugging Face model directory for llama_finetune).")
    parser.add_argument("run_dir", type=Path, help="the run's directory (hydra.run.dir)")
    parser.add_argument("--out", type=Path, help=f"where to write it (default: <run_dir>/{EXPORT_DIR})")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir.expanduser(), args.out and args.out.expanduser())
    except LowmemError as exc:
        print(f"lowmem-train: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported the model of {args.run_dir} to {out}")
    return 0


class SampleGenerations(L.Callback):
    """The model's greedy answers to ``data.sample_prompts``: before training (at its start, on the training
    device) and after (``samples``)."""

    def __init__(self, recipe: Recipe, prompts: list[str]):
        self.recipe = recipe
        self.prompts = prompts
        self.before: list[str] = []

    def on_train_start(self, trainer, pl_module):
        self.before = self.recipe.generate(pl_module.model, self.prompts)

    def samples(self, model: nn.Module) -> list[dict]:
        """Before and after for each prompt; none for a run stopped before its training started."""
        if not self.before:
            return []
        after = self.recipe.generate(model, self.prompts)
        return [{"prompt": p, "before": b, "after": a} for p, b, a in zip(self.prompts, self.before, after)]


def format_samples(samples: list[dict]) -> str:
    """The samples for the terminal, one quoted line each."""
    lines = ["samples (greedy)"]
    for sample in samples:
        lines += [f"  prompt  {json.dumps(sample['prompt'])}", f"  before  {json.dumps(sample['before'])}",
                  f"  after   {json.dumps(sample['after'])}"]
    return "\n".join(lines)
