"""Data helpers shared by recipes: loaders from the data config and synthetic data of the right shapes."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from .errors import ConfigError

def check_data_config(data: DictConfig) -> None:
    """The counts and sizes a data config holds are >= 1 (``num_workers`` >= 0, ``num_proc`` may be null); their
    types are the data schema's (``lowmem_train/configs/groups.py``)."""
    for key in ("batch_size", "num_samples", "image_size", "seq_len", "num_workers", "num_proc"):
        if key not in data or (key == "num_proc" and data[key] is None):
            continue
        value, least = data[key], 0 if key == "num_workers" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"data.{key} must be an integer >= {least}, got {value!r}")


class EpochShuffle(DistributedSampler):
    """A shuffle that depends only on (seed, epoch), never on the global RNG, and can skip what a resumed
    run already consumed: a run stopped mid-epoch and resumed sees the samples the uninterrupted run saw.

    Under DDP or FSDP (several processes) every rank takes every world-th sample of the same order (the last
    ``len % world`` samples of an epoch are left out, so ranks step together); being a DistributedSampler,
    Lightning keeps it instead of putting its own in. Rank and world size are read when iterating: loaders
    are built before the processes start. Lightning calls ``set_epoch``; the run's checkpoint callback sets
    ``resume_at`` (epoch, samples this rank consumed) from the checkpoint.
    """

    def __init__(self, data_source: Dataset, seed: int):  # not DistributedSampler.__init__: no process group yet
        self.dataset = data_source
        self.seed = seed
        self.epoch = 0
        self.resume_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def rank_and_world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        return len(self.dataset) // self.rank_and_world()[1]

    def __iter__(self):
        rank, world = self.rank_and_world()
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)[:len(self) * world].tolist()
        skip = 0
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            skip = self.resume_at[1] * world
        self.resume_at = None
        yield from order[skip:][rank::world]


def make_loader(dataset: Dataset, data: DictConfig, *, train: bool, collate_fn=None) -> DataLoader:
    workers = int(data.get("num_workers", 0))
    seed = int(data.get("seed", 0))
    return DataLoader(
        dataset,
        batch_size=int(data.batch_size),
        collate_fn=collate_fn,
        sampler=EpochShuffle(dataset, seed) if train else None,
        drop_last=train and len(dataset) > int(data.batch_size),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),  # worker seeds without drawing from the global RNG
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
