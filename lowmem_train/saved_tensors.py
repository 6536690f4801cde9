"""One saved-tensor hook for the whole model: strategies add stages to it, meters count what it stores.

PyTorch activates only the innermost ``saved_tensors_hooks``, so two strategies that each installed their
own hook would silently shadow each other (and any byte counter). Instead every tensor autograd saves
goes through one ``SavedTensorsPipeline``: its stages (compress, offload, ...) run in order on pack and in
reverse on unpack, parameters and buffers pass through untouched, and every active ``SavedBytesMeter`` is told what
was finally stored. A meter entered around a forward without any pipeline counts through an empty one.
"""

from __future__ import annotations

import enum
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class StagePosition(enum.IntEnum):
    """Where a stage runs in the pipeline on pack (unpack runs in reverse), declared by the stage."""

    ENCODE = 1  # changes what is kept (compress): sees the tensor
    MOVE = 2  # moves what is kept elsewhere (offload): sees the encoded payload


class SavedTensorStage(Protocol):
    """Transforms what autograd keeps for backward. ``pack`` gets a tensor, or what the stage before
    it returned; ``unpack`` must undo it exactly enough for the strategy's declared bound. ``position``
    (a ``StagePosition``, ENCODE when absent) orders the stages."""

    def pack(self, value: Any) -> Any: ...

    def unpack(self, value: Any) -> Any: ...


_ACTIVE_METERS: ContextVar[tuple[SavedBytesMeter, ...]] = ContextVar("lowmem_active_meters", default=())
_RECOMPUTE_INPUTS: ContextVar[frozenset[int]] = ContextVar("lowmem_recompute_inputs", default=frozenset())


@contextmanager
def recompute_inputs(tensors):
    """While a checkpointed block is called: ``tensors`` are what its forward will be run again from in
    backward. A lossy stage must treat them apart: their rounding error is fed forward through the whole
    block again, not only into one op's backward."""
    token = _RECOMPUTE_INPUTS.set(_RECOMPUTE_INPUTS.get() | {storage_key(t.untyped_storage()) for t in tensors})
    try:
        yield
    finally:
        _RECOMPUTE_INPUTS.reset(token)


def is_recompute_input(tensor: torch.Tensor) -> bool:
    return storage_key(tensor.untyped_storage()) in _RECOMPUTE_INPUTS.get()


def storage_key(storage: torch.UntypedStorage) -> int:
    """Identifies a storage while it lives, also a fake one (``FakeTensorMode``: every data pointer is 0) and
    one whose memory is released and re-allocated in place (FSDP2's resized parameter storages)."""
    return storage._cdata


def memory_perm(x: torch.Tensor) -> tuple[int, ...] | None:
    """The dims of ``x`` from largest to smallest stride (its memory order); None when contiguous."""
    if x.is_contiguous():
        return None
    return tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))


def is_dense(x: torch.Tensor, perm: tuple[int, ...] | None) -> bool:
    """Whether ``x`` covers its memory without gaps (some permutation of it is contiguous)."""
    return perm is None or x.permute(perm).is_contiguous()


def memory_key(x: torch.Tensor) -> tuple:
    """Identifies a saved tensor's data: equal for dense views of the same memory whatever their shape
    (``x``, ``x.t()``, ``x.view(...)``), so the pipeline packs that memory once."""
    extent = x.numel() if is_dense(x, memory_perm(x)) else (tuple(x.shape), x.stride())
    return (x.device, storage_key(x.untyped_storage()), x.storage_offset(), extent, x.dtype, x._version)


def model_state_storages(model: nn.Module | None) -> set[int]:
    """Storages of the model's state (parameters and buffers, e.g. batch-norm running statistics): saved
    for backward by some ops, but model state, not activations, so never counted or transformed."""
    if model is None:
        return set()
    return {storage_key(s) for t in (*model.parameters(), *model.buffers()) for s in storages(t)}


SHARDED = "_lowmem_sharded"  # set on a model by lowmem_train.sharding.shard_model


class ModelState:
    """``ModelState(model).holds(tensor, storage)``: whether a saved tensor's storage is the model's state
    (``model_state_storages`` at entry) rather than an activation. On a sharded model (FSDP2) a block's whole
    weights are gathered into storages that come and go, and swapped in as the block's parameters during its
    forward: a saved parameter, or a view of one, is model state too."""

    def __init__(self, model: nn.Module | None):
        self.storages = model_state_storages(model)
        self.sharded = model is not None and model.__dict__.get(SHARDED, False)

    def holds(self, tensor: torch.Tensor, storage) -> bool:
        if storage_key(storage) in self.storages:
            return True
        return self.sharded and (isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter))


def iter_tensors(value: Any) -> list[torch.Tensor]:
    """Tensors inside a packed value: a tensor, or a pytree of them (other leaves ignored)."""
    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor)]


def storages(tensor: torch.Tensor):
    """A tensor's storages. A wrapper subclass (torchao's quantized optimizer states, for one) has none of its
    own: its inner tensors (codes, scales; a sharded DTensor's local shard) hold the bytes."""
    if is_traceable_wrapper_subclass(tensor):
        for name in tensor.__tensor_flatten__()[0]:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):  # a DTensor also lists its device mesh
                yield from storages(inner)
    else:
        yield tensor.untyped_storage()


class SavedTensorsPipeline(torch.autograd.graph.saved_tensors_hooks):
    """Runs ``stages`` on every tensor saved while active (not parameters or buffers) and reports to meters.

    ``stages`` is read at each forward, so strategies applied later join the same pipeline.
    """

    def __init__(self, stages: list[SavedTensorStage], model: nn.Module | None = None):
        self.stages = stages
        self.model = model
        self._state = ModelState(None)
        self._packed: dict[tuple, tuple] = {}
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        self._state = ModelState(self.model)
        self._packed = {}
        return super().__enter__()

    def __exit__(self, *exc):
        self._packed = {}
        return super().__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        saved: tuple = ((), tensor, None)
        if self.stages and not self._state.holds(tensor, tensor.untyped_storage()):
            # Memory saved by several ops (an activation's output and the next layer's input, a weight's
            # transpose) is packed once and the packed value shared, so it is stored once, as without stages;
            # a view of it gets the packed value and its own shape and strides. The weak reference tells a
            # live storage from a freed one whose address was reused since.
            key = memory_key(tensor)
            entry = self._packed.get(key)
            if entry is None or entry[0].expired():
                stages = tuple(self.stages)
                packed: Any = tensor
                for stage in stages:
                    packed = stage.pack(packed)
                entry = self._packed[key] = (StorageWeakRef(tensor.untyped_storage()), (stages, packed, _geometry(tensor)))
            stages, packed, geometry = entry[1]
            saved = (stages, packed, None if geometry == _geometry(tensor) else _geometry(tensor))
        for meter in _ACTIVE_METERS.get():
            meter.add(saved[1])
        return saved

    @staticmethod
    def _unpack(saved):
        stages, packed, view = saved
        for stage in reversed(stages):
            packed = stage.unpack(packed)
        if view is not None:  # another view of the memory packed first (restored with that memory's layout)
            packed = packed.as_strided(view[0], view[1], packed.storage_offset())
        return packed


def _geometry(tensor: torch.Tensor) -> tuple:
    return (tuple(tensor.shape), tensor.stride())


class SavedBytesMeter:
    """Counts the bytes autograd holds for backward during a forward, on any device.

    Each storage counts once (a tensor saved by two ops is stored once) and parameters and buffers count
    zero: what is left is the activation memory a strategy can change. Use it around the forward only::

        with SavedBytesMeter(model) as meter:
            loss = model(x).sum()
        meter.bytes   # held until loss.backward() frees them
    """

    def __init__(self, model: nn.Module | None = None, *, listen_only: bool = False):
        """``listen_only``: count only what an already active pipeline reports (used inside a forward,
        where a hook of the meter's own would shadow the model's stages)."""
        self.model = model
        self.bytes = 0
        self.tensors = 0
        self._seen: set[tuple[torch.device, int]] = set()
        self._exclude = ModelState(None)
        self._pipeline = None if listen_only else SavedTensorsPipeline([], model)

    def add(self, packed: Any) -> None:
        for tensor, storage in self.kept_storages(packed):
            key = (tensor.device, storage_key(storage))
            if key in self._seen:
                continue
            self._seen.add(key)
            self.bytes += storage.nbytes()
            self.tensors += 1

    def kept_storages(self, packed: Any):
        """(tensor, storage) pairs of what a pipeline stored, the model's own parameters and buffers left out."""
        for tensor in iter_tensors(packed):
            for storage in storages(tensor):
                if not self._exclude.holds(tensor, storage):
                    yield tensor, storage

    def __enter__(self) -> SavedBytesMeter:
        self.bytes, self.tensors, self._seen = 0, 0, set()
        self._exclude = ModelState(self.model)
        self._token = _ACTIVE_METERS.set(_ACTIVE_METERS.get() + (self,))
        if self._pipeline is not None:
            self._pipeline.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._pipeline is not None:
            self._pipeline.__exit__(*exc)
        _ACTIVE_METERS.reset(self._token)
        self._seen = set()


_PIPELINE = "_lowmem_pipeline"


def install_pipeline(model: nn.Module) -> list[SavedTensorStage]:
    """The model's stage list, creating the pipeline (entered around the root forward) on first use.

    The hooks find the pipeline through the module they are called with, so a ``copy.deepcopy`` of the
    model runs its own copy of the pipeline, never the original's."""
    pipeline = model.__dict__.get(_PIPELINE)
    if pipeline is None:
        pipeline = model.__dict__[_PIPELINE] = SavedTensorsPipeline([], model)
        model.register_forward_pre_hook(_enter_pipeline)
        model.register_forward_hook(_exit_pipeline, always_call=True)
    return pipeline.stages


def add_stage(model: nn.Module, stage: SavedTensorStage) -> None:
    """Add ``stage`` to the model's pipeline at its declared position (``StagePosition``)."""
    stages = install_pipeline(model)
    stages.append(stage)
    stages.sort(key=lambda s: getattr(s, "position", StagePosition.ENCODE))  # stable: equal positions keep order


def saved_tensor_stages(model: nn.Module) -> list[SavedTensorStage]:
    pipeline = model.__dict__.get(_PIPELINE)
    return pipeline.stages if pipeline is not None else []


def _enter_pipeline(module: nn.Module, args) -> None:
    module.__dict__[_PIPELINE].__enter__()


def _exit_pipeline(module: nn.Module, args, output) -> None:
    module.__dict__[_PIPELINE].__exit__()
