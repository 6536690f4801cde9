"""The training run: recipe + strategies + optimizer in a LightningModule, driven by one Hydra config.

``train(cfg)`` is what ``lowmem-train`` runs; tests and notebooks can call it with a composed config.
Order matters and is fixed here: strategies are validated first, surgery happens on the freshly built
model, and the optimizer is built (in ``configure_optimizers``) only after surgery.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import netrc
import os
import typing
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils._pytree import tree_map_only

from . import checkpoints, estimate
from .causal_lm import sample_statistics
from .low_precision import keep_low_precision_updates, rounding_report
from .errors import ConfigError, LowmemError, StrategyError, one_line
from .export import EXPORT_DIR, SampleGenerations, export_at_end, format_samples
from .hub import building_for
from .memory import MemoryMonitor, format_report, gather_ranks, plot_curve, summarize, write_ranks, write_report
from .optimizers import sharding_problem as optimizer_sharding_problem
from .recipe import Recipe, StepOutput
from .recompute import frozen_norm_statistics
from .run_control import RunControl, RunStopped
from .saved_tensors import SavedBytesMeter
from .sharding import FSDP2
from .strategy import (ExampleBatch, Strategy, apply_built, build_strategies, give_example, plan_strategies,
                       spec_mapping)
from .undisturbed import undisturbed
from .validation import coerce, schema_defaults, unknown_keys

# Files a run writes into its run directory; a run_dir that holds any of them belongs to an earlier run.
RUN_FILES = ("memory.csv", "memory_report.json", "memory_curve.png", "strategies.json", "checkpoints", "csv", "wandb")


@dataclass
class RunSettings:
    """The top-level keys of ``configs/train.yaml`` (types checked before anything runs)."""

    seed: int
    dry_run: bool
    ckpt_path: str | None
    on_nonfinite: Literal["stop", "skip", "off"]
    low_precision_updates: Literal["stochastic", "kahan", "fp32_master", "nearest"]


class TrainingModule(L.LightningModule):
    """Runs a recipe's forward under a saved-bytes meter, lets strategies choose the samples to
    back-propagate and build the optimizer. ``activation_bytes`` and ``last_output`` are read by the
    MemoryMonitor callback."""

    def __init__(self, recipe: Recipe, model: torch.nn.Module, strategies: list[Strategy], optimizer_factory,
                 run_control: RunControl | None = None):
        super().__init__()
        self.recipe = recipe
        self.model = model
        self.strategies = strategies
        self.run_control = run_control
        self.sample_selectors = [s for s in strategies if type(s).select_samples is not Strategy.select_samples]
        self.forward_only = next((s for s in strategies
                                  if type(s).step_without_backward is not Strategy.step_without_backward), None)
        self.optimizer_factory = optimizer_factory
        self.saved_bytes = SavedBytesMeter(model)
        self.activation_bytes = 0
        self.last_output: StepOutput | None = None
        # Checkpoints hold what training changes (see ``state_dict``); ``checkpoints.check_fits`` checks keys.
        self.strict_loading = False

    def state_dict(self, *args, **kwargs):
        """Trainable parameters and buffers only: frozen weights (a LoRA base, possibly quantized) are rebuilt
        from the model source and the seed on resume, so checkpoints stay adapter-sized."""
        kept = {name for name, p in self.named_parameters() if p.requires_grad}
        kept |= {name for name, _ in self.named_buffers()}
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k[len(prefix):] not in kept]:
            del state[key]
        return state

    def batch_loss(self, batch) -> torch.Tensor:
        """The training loss of ``batch``, without logging or any other side effect (calibration passes)."""
        return self.recipe.forward(self.model, batch).mean_loss()

    def training_step(self, batch, batch_idx):
        if self.forward_only is not None:
            return self.forward_only_step(batch)
        scored, keep = self.score_and_select(batch) if self.sample_selectors else (None, None)
        with frozen_norm_statistics(self.model) if scored is not None else nullcontext(), self.saved_bytes:
            output = self.recipe.forward(self.model, batch if keep is None else self.recipe.subset(batch, keep))
        whole = output if scored is None else scored  # logged loss and throughput count every sample
        self.activation_bytes = self.saved_bytes.bytes
        self.last_output = whole.detached()  # no graph (and no logits) kept into the next step
        self.log("train/loss", self.last_output.mean_loss(), on_step=True, prog_bar=True, batch_size=whole.num_samples)
        # Summed loss terms over the whole batch's count: every target token weighs the same (prompt masking),
        # and with sample selection this is the full-batch loss minus the left-out terms.
        loss = output.per_sample_loss.sum() / whole.per_sample_count.sum().clamp_min(1)
        if self.run_control is not None and not self.run_control.admit_loss(self.trainer, loss):
            return None  # Lightning runs no backward and no optimizer step for this batch
        return loss

    def forward_only_step(self, batch) -> None:
        """A forward-only strategy's update (no graph: the meter sees what, if anything, is still saved); returns
        None, so Lightning runs no backward (the optimizer's step only runs this closure)."""
        with torch.no_grad(), self.saved_bytes:
            output = self.forward_only.step_without_backward(
                self.model, lambda: self.recipe.forward(self.model, batch), self.global_step)
        self.activation_bytes = self.saved_bytes.bytes
        self.last_output = output.detached()
        self.log("train/loss", self.last_output.mean_loss(), on_step=True, prog_bar=True, batch_size=output.num_samples)
        if self.run_control is not None:
            self.run_control.admit_loss(self.trainer, self.last_output.mean_loss())
        return None

    def score_and_select(self, batch) -> tuple[StepOutput, torch.Tensor]:
        """Score the whole batch without a graph and let the selecting strategies choose the samples to
        back-propagate; the training forward then runs on those only, batch-norm statistics frozen.

        The scoring pass updates batch-norm running statistics from the whole batch, runs on a forked RNG, so
        it draws no dropout masks from the model's stream, and asks loss heads for per-sample statistics
        (``StepOutput.sample_stats``) where the model has no logits to give.
        """
        with torch.no_grad(), undisturbed(self.model, buffers=False, modes=False), sample_statistics():
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

    def on_save_checkpoint(self, checkpoint):
        checkpoint[checkpoints.KEY] = checkpoints.run_identity(self.recipe.name, self.model, self.strategies)

    def on_fit_start(self):
        """Train in train mode whatever the model was built in: ``from_pretrained`` returns eval mode (dropout
        off) and Lightning no longer switches it; validation sets eval mode and restores this afterwards."""
        self.model.train()

    def configure_model(self):
        """Sharding (``trainer=fsdp``) wraps the model here: after the strategies' surgery, before the optimizer."""
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None:
            shard(self.model)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Free the gradients as soon as the optimizer has used them: Lightning zeroes them only inside the next
        step's closure, after its forward, so they would sit through the forward, at the step's peak."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def configure_optimizers(self):
        for strategy in self.strategies:
            optimizer = strategy.configure_optimizer(self.model, self.optimizer_factory)
            if optimizer is not None:
                return optimizer
        return self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])


def build_logger(cfg: DictConfig, run_dir: Path, run_name: str):
    """The configured Lightning logger; a W&B run is named after recipe and strategies and holds the whole
    resolved config."""
    kwargs = {"save_dir": str(run_dir)}
    if is_wandb(cfg) and not cfg.logger.get("name"):
        kwargs["name"] = run_name
    logger = instantiate(cfg.logger, **kwargs)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return logger


def is_wandb(cfg: DictConfig) -> bool:
    return cfg.logger.get("_target_", "").endswith("WandbLogger")


def wandb_netrc_entry(base_url: str) -> bool:
    """``wandb login`` stores the key in ~/.netrc (or $NETRC) under the server's host name."""
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(base_url).hostname) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_wandb(cfg: DictConfig) -> None:
    """W&B needs its package, a project name it accepts and either offline mode or an API key: without them it
    would prompt or fail once the run has started."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("logger=wandb needs the wandb package: pip install 'lowmem-train[wandb]'") from None
    try:
        wandb.Settings(project=cfg.logger.get("project"))  # W&B's own rules for a project name
    except (wandb.errors.UsageError, ValueError) as exc:  # ValueError: pydantic's, for a value of the wrong type
        raise ConfigError(f"logger.project: {one_line(exc)}") from None
    if cfg.logger.get("offline") or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY") or wandb_netrc_entry(wandb.Settings().base_url):
        return
    raise ConfigError("logger=wandb needs a W&B API key (WANDB_API_KEY or `wandb login`), or offline mode: "
                      "WANDB_MODE=offline or logger.offline=true")


def trainer_parameters() -> list[str]:
    """lightning.Trainer's keywords a config may set (logger, callbacks and the root dir are the run's)."""
    return [p for p in inspect.signature(L.Trainer.__init__).parameters
            if p not in ("self", "logger", "callbacks", "default_root_dir")]


def trainer_kwargs(cfg: DictConfig) -> dict:
    """``cfg.trainer`` checked against lightning.Trainer's signature: unknown keys and wrong types fail here."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(kwargs.get("strategy"), dict):  # a Lightning strategy object: trainer=fsdp
        kwargs["strategy"] = instantiate_choice(cfg.trainer, "strategy", label="trainer.strategy")
    parameters = trainer_parameters()
    hints = typing.get_type_hints(L.Trainer.__init__)
    for key, value in kwargs.items():
        if key not in parameters:
            raise ConfigError(f"unknown option 'trainer.{key}'; valid keys: {', '.join(parameters)}")
        try:
            kwargs[key] = coerce(value, hints.get(key, typing.Any))
        except TypeError as exc:
            raise ConfigError(f"trainer.{key} {exc}") from None
    return kwargs


def instantiate_choice(cfg: DictConfig, group: str, *, label: str | None = None, **kwargs):
    """``instantiate(cfg[group])`` with its failures (a missing optional package, a bad argument) as one line
    starting with ``label`` (default: the group)."""
    try:
        return instantiate(cfg[group], **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, LowmemError):
            raise cause from None
        raise ConfigError(f"{label or group}: {one_line(cause or exc)}") from None


BUDGET_PLANNER = "auto"  # the registered strategy that ``memory_budget=`` stands for


def strategy_spec(cfg: DictConfig):
    """The run's strategies: ``cfg.strategy``, and with ``memory_budget=<size or fraction>`` the budget planner
    with that budget beside them (it plans around the others)."""
    spec = cfg.get("strategy")
    budget = cfg.get("memory_budget")
    if budget is None:
        return spec
    strategies = spec_mapping(spec)
    if BUDGET_PLANNER in strategies:
        raise ConfigError(f"memory_budget={budget} is shorthand for strategy={BUDGET_PLANNER} with that budget; give "
                          f"either memory_budget or strategy.{BUDGET_PLANNER}.memory_budget, not both")
    return {**strategies, BUDGET_PLANNER: {"memory_budget": str(budget)}}


def build_recipe(cfg: DictConfig) -> Recipe:
    with building_for(strategy_spec(cfg)):  # what its offline advice keeps of the run
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


MAX_SEED = 2**32 - 1
# Trainer keywords Lightning takes when built but divides by only during fit (or, gradient_clip_val, applies with
# the sign flipped): what each must be.
TRAINER_RANGES = {
    "accumulate_grad_batches": (lambda v: v >= 1, "an integer >= 1"),
    "check_val_every_n_epoch": (lambda v: v >= 1, "an integer >= 1 or null"),
    "val_check_interval": (lambda v: v > 0, "> 0 (a fraction of an epoch or a number of batches) or null"),
    "gradient_clip_val": (lambda v: v >= 0, "a number >= 0 or null"),
}


def check_run_settings(cfg: DictConfig) -> RunSettings:
    hints = typing.get_type_hints(RunSettings)
    values = {}
    for key, hint in hints.items():
        try:
            values[key] = coerce(cfg.get(key), hint)
        except TypeError as exc:
            raise ConfigError(f"{key} {exc}") from None
    if not 0 <= values["seed"] <= MAX_SEED:  # what seed_everything (numpy's generator) takes
        raise ConfigError(f"seed must be an integer in [0, {MAX_SEED}], got {values['seed']}")
    return RunSettings(**values)


def check_trainer(cfg: DictConfig) -> torch.device:
    """Build the Trainer once, without logger or callbacks, so Lightning's own checks of its keys (ranges,
    devices, precision) fail here, before the run, as one line. Returns the device this process trains on."""
    kwargs = trainer_kwargs(cfg)
    for key, (valid, expected) in TRAINER_RANGES.items():
        if kwargs.get(key) is not None and not valid(kwargs[key]):
            raise ConfigError(f"trainer.{key} must be {expected}, got {kwargs[key]!r}")
    if kwargs.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={kwargs['accelerator']}: no CUDA GPU is visible here; "
                          "use trainer.accelerator=cpu or auto")
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no "GPU available" lines twice
    try:
        return L.Trainer(**{**kwargs, "enable_checkpointing": False}, logger=False, callbacks=[]).strategy.root_device
    except Exception as exc:  # Lightning raises MisconfigurationException, ValueError, TypeError...
        raise ConfigError(f"trainer: {one_line(exc)}") from None
    finally:
        quiet.setLevel(level)


def check_optimizer(cfg: DictConfig):
    """The optimizer factory, tried on one parameter: a negative or NaN learning rate, or betas=[0.9] where the
    schema's default holds a pair, fails here."""
    defaults = schema_defaults(cfg.optimizer)
    for key, value in cfg.optimizer.items():
        numbers = value if OmegaConf.is_list(value) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"optimizer.{key} must be a finite number, got {value}")
        default = defaults.get(key)
        if isinstance(default, list) and OmegaConf.is_list(value) and len(value) != len(default):
            raise ConfigError(f"optimizer.{key} must hold {len(default)} values (default {default}), got {list(value)}")
    factory = instantiate_choice(cfg, "optimizer")
    try:
        factory([torch.nn.Parameter(torch.zeros(2, 2))])
    except (ValueError, TypeError, RuntimeError, LookupError) as exc:
        raise ConfigError(f"optimizer: {one_line(exc)}") from None
    return factory


def validate_config(cfg: DictConfig) -> tuple[list[Strategy], Recipe]:
    """Everything that can be checked without building the model or reading data; raises LowmemError."""
    unknown = unknown_keys(cfg)
    if unknown is not None:
        raise ConfigError(unknown.message())
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError(f"{missing[0]} is required (it is ??? in the config); set it: {missing[0]}=...")
    settings = check_run_settings(cfg)
    check_trainer(cfg)
    check_optimizer(cfg)
    if is_wandb(cfg):
        check_wandb(cfg)
    strategies, recipe = build_strategies(strategy_spec(cfg)), build_recipe(cfg)  # strategy=[]: no strategy key
    sharded = isinstance(trainer_kwargs(cfg).get("strategy"), FSDP2)
    if sharded:
        check_shardable(strategies, check_optimizer(cfg))
    if settings.ckpt_path:
        checkpoint = checkpoints.read_checkpoint(settings.ckpt_path)
        checkpoints.check_recipe(checkpoint, settings.ckpt_path, recipe.name)
        if Path(settings.ckpt_path).expanduser().is_dir() and not sharded:
            raise ConfigError(f"ckpt_path={settings.ckpt_path} is a sharded checkpoint (a directory written under "
                              "trainer=fsdp); resume it with trainer=fsdp")
    return strategies, recipe


def check_shardable(strategies: list[Strategy], optimizer_factory) -> None:
    """Under trainer=fsdp, what cannot run on a sharded model is refused here, naming why."""
    for strategy in strategies:
        problem = strategy.sharding_problem()
        if problem:
            raise ConfigError(f"strategy '{strategy.name}' cannot run under trainer=fsdp: {problem}")
    problem = optimizer_sharding_problem(optimizer_factory([torch.nn.Parameter(torch.zeros(2, 2))]))
    if problem:
        raise ConfigError(f"optimizer cannot run under trainer=fsdp: {problem}")


def check_fresh_run_dir(run_dir: Path) -> None:
    """A run never writes over an earlier run's results."""
    taken = [name for name in RUN_FILES if (run_dir / name).exists()]
    if taken:
        raise ConfigError(f"run_dir={run_dir} already holds an earlier run's results ({taken[0]}); use a new "
                          "directory")


def first_batch_example(cfg: DictConfig, recipe: Recipe, train_loader) -> ExampleBatch:
    """The first training batch on the run's device, for strategies that measure before deciding. Drawn on a
    forked random stream, so the run's own shuffling and dropout are the same as without it."""
    device = check_trainer(cfg)
    with torch.random.fork_rng():
        batch = next(iter(train_loader))
    batch = tree_map_only(torch.Tensor, lambda t: t.to(device), batch)
    return ExampleBatch(loss=lambda model: recipe.forward(model, batch).mean_loss(),
                        build_optimizer=instantiate_choice(cfg, "optimizer"), device=device)


def format_plan(plans) -> str:
    lines = []
    for name, touches in plans.items():
        lines.append(f"strategy {name}: {sum(t.changed for t in touches)} module(s)")
        lines += [f"  {t.module or '<root>'} ({t.kind}): {t.action}" for t in touches if t.changed]
        lines += [f"  {t.module or '<root>'} ({t.kind}) unchanged: {t.action}" for t in touches if not t.changed]
    return "\n".join(lines)


def fit(trainer: L.Trainer, module: TrainingModule, train_loader, val_loader, ckpt_path):
    """Train, then validate unless stopped early: (the RunStopped or None, validation metrics)."""
    stopped = None
    try:
        with warnings.catch_warnings():
            if module.run_control.sampler is not None:  # EpochShuffle + RunControl resume mid-epoch exactly
                warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before")
            if module.forward_only is not None:  # its training step updates the model itself and returns None
                warnings.filterwarnings("ignore", message=".*`training_step` returned `None`")
            trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    except RunStopped as stop:
        stopped = stop
    validation = {}
    if val_loader is not None and stopped is None:
        (metrics,) = trainer.validate(module, val_loader, verbose=False)
        validation = {k: float(v) for k, v in metrics.items()}
    return stopped, validation


def run_report(module: TrainingModule, touched, monitor: MemoryMonitor, validation: dict, stopped, run_dir: Path):
    """The run's summary (``memory_report.json``), from what the module, monitor and strategies measured."""
    recipe = module.recipe
    return {
        "strategies": [s.name for s in module.strategies] or ["none"],
        "recipe": recipe.name,
        "model": type(module.model).__name__,
        **summarize(monitor.rows, device=module.device, peak_source=monitor.peak_source),
        "validation_metric": recipe.validation_metric if validation else None,
        "validation_metric_value": validation.get(recipe.validation_metric),
        "validation": validation,
        "modules_touched": {name: sum(t.changed for t in plan) for name, plan in touched.items()},
        "strategy_report": {s.name: figures for s in module.strategies if (figures := s.report())},
        "data": recipe.data_report(),
        "low_precision_updates": rounding_report(module.trainer.optimizers),
        "nonfinite_skipped_steps": module.run_control.skipped_steps,
        "stopped": None if stopped is None else {
            "reason": stopped.reason, "step": stopped.step, "exit_code": stopped.exit_code,
            "checkpoint": str(stopped.checkpoint)},
        "run_dir": str(run_dir),
    }


def strategy_files(strategies: list[Strategy]) -> dict[str, Any]:
    """The strategies' own files (a plan to reuse), by name."""
    return {name: content for s in strategies for name, content in s.files().items()}


def write_files(files: dict[str, Any], run_dir: Path) -> list[str]:
    """``strategy_files`` as JSON into ``run_dir`` (before training, so a crashed run keeps them too)."""
    for name, content in files.items():
        (run_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    return list(files)


def write_run_files(report: dict, run_dir: Path, files: list[str], touched, monitor: MemoryMonitor) -> None:
    """strategies.json, the plot and memory_report.json (whose ``files`` lists them and the strategies' own)."""
    (run_dir / "strategies.json").write_text(json.dumps(
        {name: [{**asdict(t), "phase": t.phase.name if t.phase else None} for t in plan]
         for name, plan in touched.items()}, indent=2) + "\n")
    plot = plot_curve(monitor.rows, run_dir, f"{report['recipe']}, strategy={'+'.join(report['strategies'])}")
    report["files"] = ["memory.csv", "memory_report.json", plot.name, "strategies.json", *files]
    if len(report["ranks"]) > 1:
        report["files"].append(write_ranks(report["ranks"], run_dir).name)
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        report["files"].append("checkpoints/last.ckpt")
    if (run_dir / EXPORT_DIR).is_dir():
        report["files"].append(f"{EXPORT_DIR}/")
    write_report(report, run_dir)


def estimate_run(cfg: DictConfig) -> dict:
    """``estimate=true``: the run's step and each ``estimate.compare`` row predicted on fake tensors, written to
    ``memory_report.json`` and printed; nothing trains, no weights or data are loaded."""
    settings = estimate.settings_of(cfg)

    def estimate_one(run_cfg: DictConfig) -> dict:
        run_settings = check_run_settings(run_cfg)
        strategies, recipe = validate_config(run_cfg)
        dtype = run_cfg.model.get("dtype")
        if dtype is not None and getattr(dtype, "value", dtype) == "bfloat16" and not settings.device.bf16:
            raise ConfigError(f"model.dtype=bfloat16: {settings.device.name} has no bfloat16; use model.dtype=float16 "
                              "or float32")
        optimizer_factory = keep_low_precision_updates(instantiate_choice(run_cfg, "optimizer"),
                                                       run_settings.low_precision_updates, run_settings.seed)
        report = estimate.estimate_report(run_cfg, recipe, strategies, optimizer_factory, settings)
        return {**report, "strategy_files": strategy_files(strategies)}  # auto's plan.json goes with the estimate

    report, rows = estimate.estimate_with_compare(settings, cfg, estimate.run_overrides(), estimate_one)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    estimate.write_estimate(report, rows, run_dir, write_files(report.pop("strategy_files"), run_dir))
    print(estimate.format_estimate(report, rows, settings))
    return report


def leave_process_group(together: bool) -> None:
    """Destroy the process group now, while the interpreter is whole: left to exit, gloo's worker threads
    can abort the process (``terminate called without an active exception``, torchrun then reports a
    finished run as failed). ``together``: the ranks first wait for each other (rank 0 writes the report
    while the others would already be tearing down their side of the connections)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if together:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def train(cfg: DictConfig) -> dict | None:
    """Run one training job; returns the memory report (None for a dry run and on DDP ranks other than 0).

    A run stopped early (a signal, a non-finite loss or gradient) still returns its report, with ``stopped``
    saying why, at which step, and which checkpoint resumes it.
    """
    settings = check_run_settings(cfg)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    strategies, recipe = validate_config(cfg)
    if cfg.estimate.enabled:
        return estimate_run(cfg)
    model = recipe.build_model()
    loaders = None
    if any(s.needs_example for s in strategies):
        loaders = recipe.build_dataloaders()
        give_example(strategies, first_batch_example(cfg, recipe, loaders[0]))
    if settings.dry_run:
        print(format_plan(plan_strategies(model, strategies)))
        return None
    run_dir = Path(cfg.run_dir)
    if rank_zero_only.rank == 0:  # DDP workers share rank 0's directory
        check_fresh_run_dir(run_dir)
    touched = apply_built(model, strategies)
    train_loader, val_loader = loaders or recipe.build_dataloaders()
    run_control = RunControl(run_dir, train_loader, settings.on_nonfinite,
                             every_epoch=bool(cfg.trainer.get("enable_checkpointing")))
    optimizer_factory = keep_low_precision_updates(instantiate_choice(cfg, "optimizer"), settings.low_precision_updates,
                                                   settings.seed)
    module = TrainingModule(recipe, model, strategies, optimizer_factory, run_control)
    if settings.ckpt_path:
        identity = checkpoints.run_identity(recipe.name, model, strategies)
        note = checkpoints.check_fits(checkpoints.read_checkpoint(settings.ckpt_path), settings.ckpt_path, identity,
                                      module)
        if note:
            print(note)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = write_files(strategy_files(strategies), run_dir) if rank_zero_only.rank == 0 else []
    monitor = MemoryMonitor(run_dir)
    callbacks = [monitor] + [c for s in strategies for c in s.callbacks()] + [run_control]
    prompts = list(cfg.data.get("sample_prompts") or [])
    samples = SampleGenerations(recipe, prompts) if prompts else None
    callbacks += [samples] if samples else []
    names = [s.name for s in strategies] or ["none"]
    logger = build_logger(cfg, run_dir, run_name=f"{recipe.name}-{'+'.join(names)}")
    # RunControl writes the checkpoints (see run_control.py for why not Lightning's ModelCheckpoint)
    trainer = L.Trainer(**{**trainer_kwargs(cfg), "enable_checkpointing": False}, logger=logger, callbacks=callbacks,
                        default_root_dir=str(run_dir))
    ended = False  # without an exception: only then do the ranks meet once more before leaving
    try:
        stopped, validation = fit(trainer, module, train_loader, val_loader, settings.ckpt_path)
        if not monitor.rows:
            raise ConfigError("no training step ran: check trainer.max_steps / trainer.max_epochs and the data size")
        ranks = gather_ranks(summarize(monitor.rows, device=module.device, peak_source=monitor.peak_source))
        sampled = samples.samples(module.model) if samples else None  # every rank: a sharded model generates together
        ended = True
        if not trainer.is_global_zero:
            return None  # DDP: rank 0 writes the report
        report = {**run_report(module, touched, monitor, validation, stopped, run_dir), "ranks": ranks}
        if sampled:
            report["samples"] = sampled
        if stopped is None:  # a stopped run resumes from its checkpoint; its model is not the result yet
            export_at_end(recipe, module.model, strategies, run_dir)
        write_run_files(report, run_dir, files, touched, monitor)
        if len(ranks) > 1:
            logger.log_metrics({f"rank{r['rank']}/{key}": value for r in ranks for key, value in r.items()
                                if key != "rank" and value is not None}, step=trainer.global_step)
            logger.save()
        print(format_report(report))
        if sampled:
            print(format_samples(sampled))
        return report
    finally:
        monitor.close()
        run_control.restore_signal_handlers()
        if hasattr(logger, "experiment") and is_wandb(cfg):
            logger.experiment.finish()  # else the runs of a multirun merge into one
        leave_process_group(together=ended)
