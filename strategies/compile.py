"""torch.compile with a persistent on-disk cache, so a second run of the same recipe reuses compiled code.

By default each repeated block (transformer layer, ResNet block) is compiled on its own ("regional"
compilation): identical blocks share one compiled graph, so compile time does not grow with depth, and
the rest of the model (embeddings, heads, the saved-tensor pipeline's hooks on the root) stays eager.
``scope=model`` compiles the whole model as one region instead. ``nn.Module.compile`` compiles in place:
parameters, ``state_dict`` keys and checkpoints are those of the uncompiled model.

Inductor's FX-graph cache and AOTAutograd's cache go to ``cache_dir``; by default the trainer puts them in
``compile_cache/`` next to the run directory (in its parent), shared by the runs of a day and the jobs of a
sweep. The strategy reports this run's compile wall time (Dynamo's compile-start to compile-end, lazily
compiled backward graphs included) and the cache hits and misses, so the first and a later run compare.

Compiled regions save their tensors through the model's saved-tensor pipeline at run time, so byte
counting and ``offload`` see the compiled graph's saved tensors, and ``checkpoint``, ``approx_bp``,
``reversible``, ``velora`` and the loop strategies give the gradients they give uncompiled. Refused:
``compress`` and ``selective_checkpoint``, whose per-operator Python logic inside the blocks (compress's
storage-keyed mask sharing, selective checkpointing's measured policy) Dynamo cannot trace: every block
would break into eager pieces, so compiling would cost time and bring nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch import nn

from lowmem_train import Strategy, StrategyError, Touch, outermost, repeated_blocks, select_modules

SCOPES = ("blocks", "model")
COUNTERS = {  # report key: (torch._dynamo counters group, counter or None for the group's sum)
    "graph_breaks": ("graph_break", None),
    "fx_graph_cache_hits": ("inductor", "fxgraph_cache_hit"),
    "fx_graph_cache_misses": ("inductor", "fxgraph_cache_miss"),
    "autograd_cache_hits": ("aot_autograd", "autograd_cache_hit"),
    "autograd_cache_misses": ("aot_autograd", "autograd_cache_miss"),
}


@dataclass
class CompileOptions:
    """torch.compile with an on-disk cache next to the run directory, reused by the next run of the same recipe.

    ``scope``: blocks (each repeated block on its own; identical blocks share one graph) or model (one
    graph). ``backend``: only inductor keeps compiled code on disk; aot_eager compiles fast, for debugging.
    ``mode``: null (default), reduce-overhead, max-autotune, max-autotune-no-cudagraphs. ``dynamic``: null,
    torch decides; true: compile for dynamic shapes from the start. ``fullgraph``: true makes a graph break
    an error instead of an eager fallback. ``cache_dir``: null, <run dir>/../compile_cache::

        lowmem-train strategy=compile
        lowmem-train 'strategy=[checkpoint,compile]'
        lowmem-train strategy=compile strategy.compile.scope=model strategy.compile.mode=max-autotune
    """

    scope: str = "blocks"           # blocks: each repeated block (or targets) on its own; model: the whole model
    targets: Optional[list[str]] = None  # with scope=blocks: class names / name regexes; None: repeated blocks
    exclude: list[str] = field(default_factory=list)
    backend: str = "inductor"       # only inductor writes the on-disk cache; aot_eager etc. for debugging
    mode: Optional[str] = None      # torch.compile mode: default, reduce-overhead, max-autotune, ...
    dynamic: Optional[bool] = None  # None: torch decides (recompiles with dynamic shapes on a shape change)
    fullgraph: bool = False         # true: fail instead of falling back to eager at a graph break
    cache_dir: Optional[str] = None  # None: <run dir>/../compile_cache in the trainer, torch's default elsewhere

    def validate(self, strategy: str) -> None:
        if self.scope not in SCOPES:
            raise StrategyError(f"strategy '{strategy}': scope={self.scope}; valid: {', '.join(SCOPES)}")
        if self.backend not in torch.compiler.list_backends(exclude_tags=()):
            valid = ", ".join(torch.compiler.list_backends())  # the debugging backends are accepted, not listed
            raise StrategyError(f"strategy '{strategy}': backend={self.backend}; valid: {valid}")
        if self.scope == "model" and (self.targets is not None or self.exclude):
            raise StrategyError(f"strategy '{strategy}': targets/exclude choose blocks; with scope=model leave them unset")


class CompileTimer(L.Callback):
    """Points Inductor's cache at the cache directory for the run and times Dynamo's compilations."""

    def __init__(self, strategy: Compile):
        self.strategy = strategy
        self._previous_cache_dir: str | None = None

    def setup(self, trainer, pl_module, stage):
        strategy = self.strategy
        configured = strategy.options.cache_dir
        cache_dir = Path(configured) if configured else Path(trainer.default_root_dir).parent / "compile_cache"
        strategy.cache_dir = str(cache_dir.resolve())
        self._previous_cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = strategy.cache_dir  # read by Inductor at every cache access
        strategy.start_counting()

    def teardown(self, trainer, pl_module, stage):
        self.strategy.stop_counting()
        if self._previous_cache_dir is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = self._previous_cache_dir


class Compile(Strategy):
    exact = True  # the same maths; fused kernels may round differently in the last bits
    order = 99  # last: compiles the blocks as the other strategies left them
    compiles = True
    # auto measures the plain model; zo_sgd swaps perturbed weights into modules at every forward (recompiles)
    incompatible_with = frozenset({"compress", "selective_checkpoint", "auto", "zo_sgd"})
    Options = CompileOptions
    summary = "torch.compile (per block by default) with an on-disk cache reused by later runs"

    def __init__(self, options=None):
        super().__init__(options)
        self.cache_dir: str | None = self.options.cache_dir
        self.compile_s = 0.0
        self._started: float | None = None
        self._counters_at_start: dict[str, int] | None = None
        self._counters: dict[str, int] = {}

    def plan(self, model: nn.Module) -> list[Touch]:
        action = f"torch.compile(backend={self.options.backend}, mode={self.options.mode or 'default'})"
        if self.options.scope == "model":
            return [Touch("", type(model).__name__, action)]
        regions = select_modules(model, strategy=self.name, targets=self.options.targets, exclude=self.options.exclude,
                                 default=repeated_blocks, what="repeated blocks")
        return [Touch(name, type(module).__name__, action) for name, module in outermost(regions)]

    def estimate_problem(self) -> str | None:
        return "the kernels torch.compile generates decide what they save and hold; fake tensors run the eager model"

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        if self.options.cache_dir:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(self.options.cache_dir).resolve())
        for touch in plan:
            model.get_submodule(touch.module).compile(
                backend=self.options.backend, mode=self.options.mode, dynamic=self.options.dynamic,
                fullgraph=self.options.fullgraph)

    def callbacks(self) -> list:
        return [CompileTimer(self)]

    def start_counting(self) -> None:
        torch._dynamo.callback.on_compile_start(self._compile_started)
        torch._dynamo.callback.on_compile_end(self._compile_ended)
        self._counters_at_start = self._read_counters()

    def stop_counting(self) -> None:
        handler = torch._dynamo.callback.callback_handler
        handler.remove_start_callback(self._compile_started)
        handler.remove_end_callback(self._compile_ended)
        if self._counters_at_start is not None:  # fit, then validate: both stages add up
            now = self._read_counters()
            for key in now:
                self._counters[key] = self._counters.get(key, 0) + now[key] - self._counters_at_start[key]
            self._counters_at_start = None

    def _compile_started(self, args) -> None:
        self._started = time.perf_counter()

    def _compile_ended(self, args) -> None:
        if self._started is not None:
            self.compile_s += time.perf_counter() - self._started
            self._started = None

    @staticmethod
    def _read_counters() -> dict[str, int]:
        counters = torch._dynamo.utils.counters
        return {key: int(sum(counters[group].values()) if name is None else counters[group][name])
                for key, (group, name) in COUNTERS.items()}

    def report(self) -> dict:
        return {"compile_s": self.compile_s, **self._counters, "cache_dir": self.cache_dir}
