"""FSDP2 sharding (``trainer=fsdp``): PyTorch's ``fully_shard`` per repeated block and on the root, driven by
Lightning's ``ModelParallelStrategy`` (data parallel only: every process holds 1/world of each parameter, its
gradient and its optimizer state, and gathers a block's weights just for that block's forward and backward).

Order, as torchtitan and torchtune do it: the strategies' surgery and forward wrappers (checkpoint, LoRA,
Approx-BP...) are applied to the whole model first, then ``configure_model`` shards it, then the optimizer is
built on the sharded (DTensor) parameters. Saved-tensor stages (compress, offload) see the block's ordinary
local tensors, so they work unchanged. What cannot run sharded is refused before the run, in one line
(``sharding_problem``).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor

from .saved_tensors import SHARDED
from .targets import is_block

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FSDP2(ModelParallelStrategy):
    """Lightning strategy: FSDP2 data parallelism over every process of every node (``trainer.devices`` x
    ``trainer.num_nodes``), sharded checkpoints (one directory per checkpoint, each rank writes its shard).

    ``param_dtype``: the dtype blocks compute in (weights gathered in it; the sharded master copy keeps its own
    dtype); ``reduce_dtype``: the dtype gradients are reduce-scattered in; null keeps the parameters' dtype.
    ``reshard_after_forward``: free a block's gathered weights after its forward (gather again for backward);
    false keeps them until backward, trading memory for one all-gather per block.
    """

    def __init__(self, param_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
                 reduce_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
                 reshard_after_forward: bool = True):
        for key, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"{key}={value!r}; valid: {', '.join(DTYPES)} or null")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True)
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # all processes shard; no tensor parallel
        super().setup_environment()

    def shard(self, model: nn.Module) -> list[str]:
        """Shard ``model`` in place over every process (``LightningModule.configure_model`` calls this)."""
        return shard_model(model, self.device_mesh["data_parallel"], param_dtype=self.param_dtype,
                           reduce_dtype=self.reduce_dtype, reshard_after_forward=self.reshard_after_forward)


def shard_model(model: nn.Module, mesh, *, param_dtype: str | None = None, reduce_dtype: str | None = None,
                reshard_after_forward: bool = True) -> list[str]:
    """``fully_shard`` each repeated block of ``model`` (``shard_units``), then the root, over ``mesh`` (a 1-D
    DeviceMesh); a model sharded already is left alone. Apply strategies first, build the optimizer after.
    Returns the names of the modules sharded on their own. In a plain loop::

        apply_strategies(model, ["checkpoint"])
        shard_model(model, init_device_mesh("cuda", (world_size,)))
        optimizer = torch.optim.AdamW(model.parameters())
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return []
    policy = MixedPrecisionPolicy(param_dtype=DTYPES.get(param_dtype), reduce_dtype=DTYPES.get(reduce_dtype))
    names = shard_units(model)
    for name in names:
        fully_shard(model.get_submodule(name), mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    model.__dict__[SHARDED] = True  # the saved-tensor pipeline then knows gathered weights for model state
    return names


def shard_units(model: nn.Module) -> list[str]:
    """The repeated blocks (children of a ModuleList / Sequential that are blocks), outermost first: each becomes
    one all-gather unit; what is left (embeddings, stem, head) goes with the root."""
    names: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(n + ".") for n in names):
            continue
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            names += [f"{name}.{child}" if name else child for child, sub in module.named_children() if is_block(sub)]
    return names


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded parameter (DTensor) gathered whole on every rank (all ranks must call it); others as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
