"""The strategy plugin interface, the registry (Python entry points) and ``apply_strategies``.

A strategy is a subclass of ``Strategy`` registered under the entry-point group ``lowmem_train.strategies``.
It overrides only the hooks it needs:

- ``plan`` / ``apply``: model surgery (module swap keeping weights, wrapping forwards). Runs before the
  optimizer is built, in ``order`` (lower first), and is what ``apply_strategies`` does for a plain loop.
- ``saved_tensor_stage``: a pack/unpack stage on every tensor saved for backward (compression, offload).
- ``configure_optimizer``: build the optimizer itself (low-memory optimizer states).
- ``callbacks``: Lightning callbacks for loop hooks (first-batch initialisation, per-step statistics);
  a callback's ``state_dict`` is saved in Lightning checkpoints, so strategy state survives resume.
- ``select_samples``: from a no-grad scoring forward of the whole batch, choose the samples to
  back-propagate; the trainer then runs the graph-building forward and the backward on those only.
- ``report``: figures for the run's ``memory_report.json`` (under ``strategy_report``) and final summary.
- ``files``: JSON files of its own for the run directory (a plan that a later run can reuse).
- ``sharding_problem``: why it cannot run under FSDP2 sharding (``trainer=fsdp``), refused before the run.
- ``step_without_backward``: forward-only training: the strategy's own update replaces forward, backward and
  optimizer step (the trainer calls it under ``torch.no_grad``).

A strategy that measures the model before deciding (``needs_example = True``) gets ``example``, the run's
first training batch as an ``ExampleBatch``, before ``plan`` is called.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from .errors import StrategyError, one_line
from .forward_wrap import Phase, phase_clash, wrapper_owner
from .recipe import StepOutput
from .saved_tensors import SavedTensorStage, add_stage
from .validation import schema_problem

ENTRY_POINT_GROUP = "lowmem_train.strategies"
LOOP_HOOKS = ("configure_optimizer", "callbacks", "select_samples", "step_without_backward")  # what a plain PyTorch loop must call itself


@dataclass(frozen=True)
class Touch:
    """One module a strategy changes (or, with ``changed=False``, looked at and left alone, saying why)."""

    module: str
    kind: str
    action: str
    changed: bool = True
    phase: Phase | None = None  # the forward phase it wraps (lowmem_train.forward_wrap), if it wraps one


@dataclass
class NoOptions:
    pass


@dataclass(frozen=True)
class ExampleBatch:
    """The run's first training batch, already on the run's device, as a strategy may use it for measuring:
    ``loss(model)`` is the recipe's mean training loss of the batch through ``model`` (the model or a copy);
    ``build_optimizer`` is the run's optimizer factory (parameters -> optimizer); ``clock``: seconds on the
    device so far, where not the wall clock (``estimate=true``: a time model of fake tensors' work)."""

    loss: Callable[[nn.Module], torch.Tensor]
    build_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    device: torch.device
    clock: Callable[[], float] | None = None


class Strategy:
    """Base class of memory strategies. Class attributes describe it; hooks default to doing nothing."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True  # gradients equal to plain backprop (up to float rounding)
    changes_architecture: ClassVar[bool] = False  # its state_dict is another model's: resume needs the same choice
    order: ClassVar[int] = 50  # surgery order: module swaps (low) before forward wrappers (high)
    incompatible_with: ClassVar[frozenset[str]] = frozenset()
    Options: ClassVar[type] = NoOptions
    summary: ClassVar[str] = ""  # one line for the catalogue: what it saves and what it costs
    compiles: ClassVar[bool] = False  # runs torch.compile'd code (CPU peaks are then accounted, not tracked)
    needs_example: ClassVar[bool] = False  # measures the model on the first batch: ``example`` is set before plan
    example: ExampleBatch | None = None

    def __init__(self, options: Mapping[str, Any] | None = None):
        self.options = parse_options(self.name, self.Options, options or {})

    def plan(self, model: nn.Module) -> list[Touch]:
        """The modules ``apply`` would change. Raise StrategyError if the strategy matches nothing."""
        return []

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        """Change ``model`` in place as planned, keeping every parameter object."""

    def saved_tensor_stage(self) -> SavedTensorStage | None:
        return None

    def configure_optimizer(
        self, model: nn.Module, build_default: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    ) -> torch.optim.Optimizer | None:
        return None

    def callbacks(self) -> list:
        return []

    def select_samples(self, scored: StepOutput) -> torch.Tensor | None:
        """A boolean mask over the batch of the samples to back-propagate (at least one), or None for all.

        Called with the output of a no-grad forward of the whole batch (per-sample loss sums and counts, the
        logits where the recipe has them, else ``sample_stats``); the loss the trainer back-propagates is the
        kept samples' loss sums over the whole batch's count.
        """
        return None

    def report(self) -> dict[str, Any]:
        """Figures this strategy measured during the run (JSON values), for the run's report."""
        return {}

    def files(self) -> dict[str, Any]:
        """File name -> JSON value, written into the run directory (and listed in the report)."""
        return {}

    def step_without_backward(self, model: nn.Module, loss: Callable[[], StepOutput], step: int) -> StepOutput:
        """Forward-only training: update ``model`` from forwards alone (``loss()`` runs the recipe's forward of
        the batch, as often as needed) at optimizer step ``step``; return the output to log. Only a strategy
        that overrides it replaces backprop; the trainer calls it under ``torch.no_grad``."""
        raise NotImplementedError

    def nonfinite_hint(self) -> str | None:
        """What to change when a run under this strategy diverges (the non-finite stop's line says it), or None."""
        return None

    def sharding_problem(self) -> str | None:
        """Why this strategy, with its options, cannot run on a model sharded by FSDP2 (``trainer=fsdp``), or None."""
        return None

    def estimate_problem(self) -> str | None:
        """Why ``estimate=true`` cannot predict this strategy's step, or None. A strategy returns None once a
        step of it on fake tensors (no data, so no data-dependent decisions; no custom kernels) is checked
        against a real step's measured bytes (``tests/test_estimate.py``)."""
        return "its step on fake tensors is not checked against a real one yet"


def parse_options(strategy: str, options_class: type, options: Mapping[str, Any]):
    """Typed options: ``options`` merged onto the ``Options`` dataclass by OmegaConf, the schema Hydra composes
    ``strategy.<name>`` with, so a plain loop and the command line refuse the same keys and values in one line;
    then the Options' own range checks (``validate``)."""
    if not isinstance(options, (Mapping, DictConfig)):
        raise StrategyError(f"strategy '{strategy}': options must be a mapping, got {options!r}")
    try:
        parsed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(options_class), options))
    except OmegaConfBaseException as exc:
        problem = schema_problem(exc)
        if problem is None:
            raise StrategyError(f"strategy '{strategy}': {one_line(exc)}") from None
        key = problem.key.rpartition(".")[2]
        if problem.valid is not None:
            raise StrategyError(f"strategy '{strategy}': unknown option '{key}'; valid options: "
                                f"{', '.join(problem.valid) or 'none'}") from None
        raise StrategyError(f"strategy '{strategy}': option '{key}' {problem.expected}") from None
    if hasattr(parsed, "validate"):
        parsed.validate(strategy)
    return parsed


@cache
def _registry() -> dict[str, type[Strategy]]:
    registry = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        cls = entry.load()
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"entry point {entry.name} = {entry.value} is not a lowmem_train.Strategy subclass")
        cls.name = entry.name
        registry[entry.name] = cls
    return registry


def available_strategies() -> list[str]:
    return sorted(_registry())


def get_strategy_class(name: str) -> type[Strategy]:
    registry = _registry()
    if name not in registry:
        raise StrategyError(f"unknown strategy '{name}'; available: {', '.join(sorted(registry))}")
    return registry[name]


def build_strategies(spec: str | Iterable[str | Mapping[str, Any]] | Mapping[str, Any] | None) -> list[Strategy]:
    """Strategy objects from a name, a mapping name -> options, or a list of names and such mappings,
    sorted by ``order``.

    Checks declared incompatibilities and refuses a strategy named twice. ``none`` combined with others is
    dropped: it means plain backprop.
    """
    strategies = [get_strategy_class(name)(options) for name, options in spec_mapping(spec).items()]
    names = {s.name for s in strategies}
    for strategy in strategies:
        clash = sorted(names & strategy.incompatible_with)
        if clash:
            raise StrategyError(f"strategy '{strategy.name}' cannot be combined with '{clash[0]}'")
    builders = [s.name for s in strategies if type(s).configure_optimizer is not Strategy.configure_optimizer]
    if len(builders) > 1:
        raise StrategyError(f"strategies '{builders[0]}' and '{builders[1]}' both build the optimizer; choose one")
    if len(strategies) > 1:
        strategies = [s for s in strategies if s.name != "none"]
    return sorted(strategies, key=lambda s: s.order)


def spec_mapping(spec) -> dict[str, Any]:
    """A strategy spec (see ``build_strategies``) as one mapping name -> options."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        return {spec: {}}
    if isinstance(spec, (DictConfig, Mapping)):
        return dict(spec)
    return merge_spec_items(spec)


def merge_spec_items(items: Iterable[Any]) -> dict[str, Any]:
    """``["checkpoint", {"compress": {"bits": 4}}]`` as one mapping name -> options; a name given twice is an error."""
    merged: dict[str, Any] = {}
    for item in items:
        if isinstance(item, str):
            entries = {item: {}}
        elif isinstance(item, (DictConfig, Mapping)):
            entries = dict(item)
        else:
            raise StrategyError(f"a strategy list holds names or mappings name -> options, got {item!r}")
        for name, options in entries.items():
            if name in merged:
                raise StrategyError(f"strategy '{name}' is listed twice; list each strategy once")
            merged[name] = options
    return merged


def give_example(strategies: list[Strategy], example: ExampleBatch | None) -> None:
    """Hand ``example`` to the strategies that measure the model before deciding."""
    for strategy in strategies:
        if strategy.needs_example and example is not None:
            strategy.example = example


def plan_strategies(model: nn.Module, strategies: list[Strategy]) -> dict[str, list[Touch]]:
    """What each strategy would touch, without changing the model (the dry run)."""
    plans = {s.name: s.plan(model) for s in strategies}
    held: dict[tuple[str, Phase], str] = {}
    for name, plan in plans.items():
        check_phases(model, name, plan, held)
    return plans


def check_phases(model: nn.Module, strategy: str, plan: list[Touch], held: dict | None = None) -> None:
    """Refuse a plan that wraps a module's forward at a phase another strategy holds (see forward_wrap).

    ``held`` collects the phases planned so far, for plans not applied yet (the dry run)."""
    held = {} if held is None else held
    for touch in plan:
        if touch.phase is None or not touch.changed:
            continue
        holder = held.get((touch.module, touch.phase)) or wrapper_owner(model.get_submodule(touch.module), touch.phase)
        if holder is not None and holder != strategy:
            raise StrategyError(phase_clash(touch.module, touch.phase, holder, strategy))
        held[(touch.module, touch.phase)] = strategy


def apply_built(model: nn.Module, strategies: list[Strategy]) -> dict[str, list[Touch]]:
    """Apply already built strategies in order; the same strategy with the same options applies once."""
    applied: dict[str, Any] = model.__dict__.setdefault("_lowmem_applied", {})
    touched = {}
    for strategy in strategies:
        if strategy.name in applied:
            if applied[strategy.name] != strategy.options:
                raise StrategyError(
                    f"strategy '{strategy.name}' is already applied to this model with other options "
                    f"({applied[strategy.name]}); apply it once"
                )
            continue
        plan = strategy.plan(model)
        check_phases(model, strategy.name, plan)
        strategy.apply(model, plan)
        stage = strategy.saved_tensor_stage()
        if stage is not None:
            add_stage(model, stage)
        applied[strategy.name] = strategy.options
        touched[strategy.name] = plan
    return touched


def apply_strategies(
    model: nn.Module, strategies: str | Iterable[str | Mapping[str, Any]] | Mapping[str, Any] | None,
    *, example: ExampleBatch | None = None,
) -> nn.Module:
    """Apply model-level strategies to any ``nn.Module`` for use in a plain PyTorch loop.

    ``strategies`` is a name, a mapping name -> options, or a list of names and such mappings. The model
    is changed in place (same parameter objects and values) and returned; applying the same strategy again
    is a no-op. ``example``: a batch for the strategies that measure the model before deciding (``auto``).
    Build the optimizer after this call.
    """
    built = build_strategies(strategies)
    give_example(built, example)
    for strategy in built:
        loop_hooks = [hook for hook in LOOP_HOOKS if getattr(type(strategy), hook) is not getattr(Strategy, hook)
                      and (hook != "callbacks" or strategy.callbacks())]
        if loop_hooks:
            warnings.warn(
                f"strategy '{strategy.name}' also acts on the training loop ({', '.join(loop_hooks)}); "
                "apply_strategies applies only its model surgery: train with lowmem-train, or call those hooks",
                stacklevel=2,
            )
    apply_built(model, built)
    return model
