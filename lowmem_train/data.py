"""Data helpers shared by recipes: loaders from the data config and synthetic data of the right shapes."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import ConfigError


def make_loader(dataset: Dataset, data: DictConfig, *, train: bool) -> DataLoader:
    workers = int(data.get("num_workers", 0))
    return DataLoader(
        dataset,
        batch_size=int(data.batch_size),
        shuffle=train,
        drop_last=train and len(dataset) > int(data.batch_size),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def synthetic_images(num_samples: int, image_size: int, num_classes: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_samples, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return TensorDataset(images, labels)


def synthetic_tokens(num_samples: int, seq_len: int, vocab_size: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator))


def split(dataset: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """A fixed random train/validation split (``val_fraction`` 0 gives no validation set)."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    num_val = int(round(len(dataset) * val_fraction))
    if num_val == 0:
        return dataset, None
    generator = torch.Generator().manual_seed(seed)
    train, val = torch.utils.data.random_split(dataset, [len(dataset) - num_val, num_val], generator=generator)
    return train, val
