"""What a recipe (a training task) provides: a model, data loaders and a loss. No memory code.

Concrete recipes live in ``recipes/`` and are chosen by ``_target_`` in ``configs/recipe/*.yaml``.
The trainer calls ``build_model``, then ``build_dataloaders``, then ``forward`` on every training batch
and ``validation_step`` on every validation batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils._pytree import tree_map_only
from torch.utils.data import DataLoader

from .data import check_data_config
from .errors import ConfigError


@dataclass
class StepOutput:
    """A training forward, reduced by the trainer as ``sum(per_sample_loss) / sum(per_sample_count)``.

    ``per_sample_loss`` is each sample's SUM of loss terms (its target tokens' for a language model, its one
    loss for classification) and ``per_sample_count`` the number of those terms, so prompt masking and
    ragged samples weigh every target token alike. ``logits`` is None where the model never materialises
    them (a chunked loss head); ``sample_stats`` then carries the per-sample statistics that sample-selecting
    strategies need (see ``lowmem_train.causal_lm.token_statistics``).
    """

    per_sample_loss: torch.Tensor
    per_sample_count: torch.Tensor
    num_samples: int
    logits: torch.Tensor | None = None
    num_tokens: int | torch.Tensor | None = None  # a tensor is read (synchronised) only when reported
    sample_stats: dict[str, torch.Tensor] | None = None

    def mean_loss(self) -> torch.Tensor:
        """The loss per loss term (per target token for a language model) over the whole output."""
        return self.per_sample_loss.sum() / self.per_sample_count.sum().clamp_min(1)

    def detached(self) -> StepOutput:
        """Only the small per-sample tensors, cut from the graph: what may outlive a training step."""
        stats = self.sample_stats and {key: value.detach() for key, value in self.sample_stats.items()}
        return StepOutput(self.per_sample_loss.detach(), self.per_sample_count.detach(), self.num_samples,
                          num_tokens=self.num_tokens.detach() if isinstance(self.num_tokens, torch.Tensor)
                          else self.num_tokens, sample_stats=stats)


class Recipe:
    """Base class: reads ``model`` and ``data`` configs; checks the data source is one it can load."""

    name: ClassVar[str]
    data_sources: ClassVar[tuple[str, ...]]
    validation_metric: ClassVar[str]  # key logged by validation_step, e.g. "val/acc"

    def __init__(self, model: DictConfig, data: DictConfig):
        self.model_cfg = model
        self.data_cfg = data
        source = data.get("name")
        if source not in self.data_sources:
            raise ConfigError(
                f"data={source} is not a data source of recipe {self.name}; valid: {', '.join(self.data_sources)}"
            )
        check_data_config(data)

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_untrained_model(self) -> nn.Module:
        """The model's architecture without loading any weights (``estimate=true`` builds it on fake tensors,
        so even an 8B model costs nothing); random init where the recipe has nothing else."""
        return self.build_model()

    def shape_batch(self):
        """A batch of the largest shape the data config gives (random content): what ``estimate=true`` steps on."""
        raise NotImplementedError

    def build_dataloaders(self) -> tuple[DataLoader, DataLoader | None]:
        raise NotImplementedError

    def forward(self, model: nn.Module, batch) -> StepOutput:
        raise NotImplementedError

    def data_report(self) -> dict:
        """What ``build_dataloaders`` made of the data (counts of examples, rows, tokens), for the run report."""
        return {}

    def validation_step(self, model: nn.Module, batch) -> tuple[dict[str, torch.Tensor], int]:
        """Metrics of one validation batch (averaged over batches by Lightning) and its size."""
        raise NotImplementedError

    def generate(self, model: nn.Module, prompts: list[str]) -> list[str]:
        """The model's answer to each prompt (``data.sample_prompts``), shown before and after training."""
        raise ConfigError(f"data.sample_prompts: recipe {self.name} does not generate text")

    def export(self, model: nn.Module, directory: Path) -> None:
        """Write the trained ``model`` into the new ``directory`` in the form its library loads without
        lowmem-train (a Hugging Face model directory for a causal LM). Called at the end of a full fine-tune
        and by ``lowmem-train export``; a recipe without one keeps this refusal."""
        raise ConfigError(f"recipe {self.name} has no model export")

    def subset(self, batch, keep: torch.Tensor):
        """The samples of ``batch`` where the boolean ``keep`` is true (for strategies that select samples).

        Indexes every tensor of a (nested) tuple, list or dict (a pytree) along its first dimension; override it for
        batches whose tensors are not laid out sample-first.
        """
        return tree_map_only(torch.Tensor, lambda tensor: tensor[keep.to(tensor.device)], batch)


class ImageClassification(Recipe):
    """Cross-entropy on (images, labels) batches; validation accuracy and loss."""

    validation_metric = "val/acc"
    default_image_size: ClassVar[int] = 32  # where the data config has no image_size (cifar10)

    def shape_batch(self):
        size, batch = int(self.data_cfg.get("image_size", self.default_image_size)), int(self.data_cfg.batch_size)
        return torch.randn(batch, 3, size, size), torch.randint(0, int(self.model_cfg.num_classes), (batch,))

    def forward(self, model: nn.Module, batch) -> StepOutput:
        images, labels = batch
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels, reduction="none")
        return StepOutput(loss, torch.ones_like(loss), num_samples=len(labels), logits=logits)

    def validation_step(self, model: nn.Module, batch):
        images, labels = batch
        logits = model(images)
        metrics = {
            "val/loss": nn.functional.cross_entropy(logits, labels),
            "val/acc": (logits.argmax(-1) == labels).float().mean(),
        }
        return metrics, len(labels)
