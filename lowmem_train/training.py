"""The training run: recipe + strategies + optimizer in a LightningModule, driven by one Hydra config.

``train(cfg)`` is what ``lowmem-train`` runs; tests and notebooks can call it with a composed config.
Order matters and is fixed here: strategies are validated first, surgery happens on the freshly built
model, and the optimizer is built (in ``configure_optimizers``) only after surgery.
"""

from __future__ import annotations

import inspect
import json
import typing
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .causal_lm import sample_statistics
from .errors import ConfigError, LowmemError, StrategyError, one_line
from .memory import MemoryMonitor, format_report, plot_curve, summarize, write_report
from .recipe import Recipe, StepOutput
from .recompute import frozen_norm_statistics
from .saved_tensors import SavedBytesMeter
from .strategy import Strategy, apply_built, build_strategies, plan_strategies
from .validation import coerce


class TrainingModule(L.LightningModule):
    """Runs a recipe's forward under a saved-bytes meter, lets strategies choose the samples to
    back-propagate and build the optimizer. ``activation_bytes`` and ``last_output`` are read by the
    MemoryMonitor callback."""

    def __init__(self, recipe: Recipe, model: torch.nn.Module, strategies: list[Strategy], optimizer_factory):
        super().__init__()
        self.recipe = recipe
        self.model = model
        self.strategies = strategies
        self.sample_selectors = [s for s in strategies if type(s).select_samples is not Strategy.select_samples]
        self.optimizer_factory = optimizer_factory
        self.saved_bytes = SavedBytesMeter(model)
        self.activation_bytes = 0
        self.last_output: StepOutput | None = None

    def training_step(self, batch, batch_idx):
        scored, keep = self.score_and_select(batch) if self.sample_selectors else (None, None)
        with frozen_norm_statistics(self.model) if scored is not None else nullcontext(), self.saved_bytes:
            output = self.recipe.forward(self.model, batch if keep is None else self.recipe.subset(batch, keep))
        whole = output if scored is None else scored  # logged loss and throughput count every sample
        self.activation_bytes = self.saved_bytes.bytes
        self.last_output = whole.detached()  # no graph (and no logits) kept into the next step
        self.log("train/loss", self.last_output.mean_loss(), on_step=True, prog_bar=True, batch_size=whole.num_samples)
        # Summed loss terms over the whole batch's count: every target token weighs the same (prompt masking),
        # and with sample selection this is the full-batch loss minus the left-out terms.
        return output.per_sample_loss.sum() / whole.per_sample_count.sum().clamp_min(1)

    def score_and_select(self, batch) -> tuple[StepOutput, torch.Tensor]:
        """Score the whole batch without a graph and let the selecting strategies choose the samples to
        back-propagate; the training forward then runs on those only, batch-norm statistics frozen.

        The scoring pass updates batch-norm running statistics from the whole batch, runs on a forked RNG, so
        it draws no dropout masks from the model's stream, and asks loss heads for per-sample statistics
        (``StepOutput.sample_stats``) where the model has no logits to give.
        """
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda), sample_statistics():
            scored = self.recipe.forward(self.model, batch)
        keep = torch.ones_like(scored.per_sample_loss, dtype=torch.bool)
        for strategy in self.sample_selectors:
            mask = strategy.select_samples(scored)
            if mask is not None:
                keep &= mask.to(keep.device)
        if not keep.any():
            raise StrategyError(f"strategy '{self.sample_selectors[0].name}' left no sample of a batch to back-propagate")
        return scored, keep

    def validation_step(self, batch, batch_idx):
        metrics, batch_size = self.recipe.validation_step(self.model, batch)
        self.log_dict(metrics, prog_bar=True, batch_size=batch_size, sync_dist=True)  # DDP: averaged over ranks

    def configure_optimizers(self):
        for strategy in self.strategies:
            optimizer = strategy.configure_optimizer(self.model, self.optimizer_factory)
            if optimizer is not None:
                return optimizer
        return self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])


def build_logger(cfg: DictConfig, run_dir: Path):
    if cfg.logger.get("_target_", "").endswith("WandbLogger"):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logger=wandb needs the wandb package: pip install 'lowmem-train[wandb]'") from None
    return instantiate(cfg.logger, save_dir=str(run_dir))


def trainer_kwargs(cfg: DictConfig) -> dict:
    """``cfg.trainer`` checked against lightning.Trainer's signature: unknown keys and wrong types fail here."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    parameters = inspect.signature(L.Trainer.__init__).parameters
    hints = typing.get_type_hints(L.Trainer.__init__)
    for key, value in kwargs.items():
        if key not in parameters or key in ("logger", "callbacks", "default_root_dir"):
            valid = ", ".join(p for p in parameters if p not in ("self", "logger", "callbacks", "default_root_dir"))
            raise ConfigError(f"unknown option 'trainer.{key}'; valid keys: {valid}")
        try:
            kwargs[key] = coerce(value, hints.get(key, typing.Any))
        except TypeError as exc:
            raise ConfigError(f"trainer.{key} {exc}") from None
    return kwargs


def instantiate_choice(cfg: DictConfig, group: str, **kwargs):
    """``instantiate(cfg[group])`` with its failures (a missing optional package, a bad argument) as one line."""
    try:
        return instantiate(cfg[group], **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, LowmemError):
            raise cause from None
        raise ConfigError(f"{group}: {one_line(cause or exc)}") from None


def build_recipe(cfg: DictConfig) -> Recipe:
    return instantiate_choice(cfg, "recipe", model=cfg.model, data=cfg.data, _recursive_=False)


def missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys still ``???`` (without resolving interpolations, which may need a running Hydra app)."""
    found = []
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            found.append(prefix + str(key))
        elif not OmegaConf.is_interpolation(node, key) and isinstance(node[key], DictConfig):
            found += missing_keys(node[key], f"{prefix}{key}.")
    return found


def validate_config(cfg: DictConfig) -> tuple[list[Strategy], Recipe]:
    """Everything that can be checked without building the model or reading data; raises LowmemError."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError(f"{missing[0]} is required (it is ??? in the config); set it: {missing[0]}=...")
    trainer_kwargs(cfg)
    instantiate_choice(cfg, "optimizer")
    return build_strategies(cfg.strategy), build_recipe(cfg)


def format_plan(plans) -> str:
    lines = []
    for name, touches in plans.items():
        lines.append(f"strategy {name}: {sum(t.changed for t in touches)} module(s)")
        lines += [f"  {t.module or '<root>'} ({t.kind}): {t.action}" for t in touches if t.changed]
        lines += [f"  {t.module or '<root>'} ({t.kind}) unchanged: {t.action}" for t in touches if not t.changed]
    return "\n".join(lines)


def train(cfg: DictConfig) -> dict | None:
    """Run one training job; returns the memory report (None for a dry run and on DDP ranks other than 0)."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    strategies, recipe = validate_config(cfg)
    model = recipe.build_model()
    if cfg.dry_run:
        print(format_plan(plan_strategies(model, strategies)))
        return None
    touched = apply_built(model, strategies)
    train_loader, val_loader = recipe.build_dataloaders()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    module = TrainingModule(recipe, model, strategies, instantiate_choice(cfg, "optimizer"))
    monitor = MemoryMonitor(run_dir)
    callbacks = [monitor] + [c for s in strategies for c in s.callbacks()]
    if cfg.trainer.get("enable_checkpointing"):
        # <run_dir>/checkpoints/last.ckpt: a path Hydra parses unquoted in ckpt_path=... (no '=' in it).
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step}",
                                         auto_insert_metric_name=False, save_last=True))
    logger = build_logger(cfg, run_dir)
    trainer = L.Trainer(**trainer_kwargs(cfg), logger=logger, callbacks=callbacks, default_root_dir=str(run_dir))
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=cfg.get("ckpt_path"))
        validation = {}
        if val_loader is not None:
            (metrics,) = trainer.validate(module, val_loader, verbose=False)
            validation = {k: float(v) for k, v in metrics.items()}
        if not monitor.rows:
            raise ConfigError("no training step ran: check trainer.max_steps / trainer.max_epochs and the data size")
        if not trainer.is_global_zero:
            return None  # DDP: rank 0 writes the report
        report = {
            "strategies": [s.name for s in strategies] or ["none"],
            "recipe": recipe.name,
            "model": type(model).__name__,
            **summarize(monitor.rows, device=module.device),
            "validation_metric": recipe.validation_metric if validation else None,
            "validation_metric_value": validation.get(recipe.validation_metric),
            "validation": validation,
            "modules_touched": {name: sum(t.changed for t in plan) for name, plan in touched.items()},
            "strategy_report": {s.name: figures for s in strategies if (figures := s.report())},
            "run_dir": str(run_dir),
        }
        (run_dir / "strategies.json").write_text(json.dumps(
            {name: [t.__dict__ for t in plan] for name, plan in touched.items()}, indent=2) + "\n")
        plot = plot_curve(monitor.rows, run_dir, f"{recipe.name}, strategy={'+'.join(report['strategies'])}")
        report["files"] = ["memory.csv", "memory_report.json", plot.name, "strategies.json"]
        write_report(report, run_dir)
        print(format_report(report))
        return report
    finally:
        monitor.close()
        if hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()  # else the runs of a multirun merge into one
