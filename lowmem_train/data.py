"""Data helpers shared by recipes: loaders from the data config and synthetic data of the right shapes."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from .errors import ConfigError

def check_data_config(data: DictConfig) -> None:
    """The counts and sizes a data config holds are integers >= 1 (``num_workers`` and ``val_rows`` >= 0,
    ``num_proc`` and ``val_rows`` may be null; ``seq_len`` >= 2: a row trains on the tokens after its first)
    and ``val_fraction`` lies in [0, 1); their types are the data schema's (``lowmem_train/configs/groups.py``).
    Called when a recipe is built, so every job of a sweep is checked before any runs."""
    least = {"num_workers": 0, "val_rows": 0, "seq_len": 2}
    for key in ("batch_size", "num_samples", "image_size", "seq_len", "num_workers", "num_proc", "val_rows"):
        if key not in data or (key in ("num_proc", "val_rows") and data[key] is None):
            continue
        value, minimum = data[key], least.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
    if "val_fraction" in data and not 0 <= data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {data.val_fraction}")


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


MIN_VAL_ROWS = 8  # a validation set smaller than this gives a metric too noisy to compare runs by


def split(dataset: Dataset, data: DictConfig) -> tuple[Dataset, Dataset | None]:
    """A fixed random train/validation split (by ``data.seed``): ``data.val_rows`` rows when the data config
    has that key set, else ``data.val_fraction`` of them (0 gives no validation set). A fraction that holds
    out nothing, or fewer than ``MIN_VAL_ROWS`` rows, is said in one printed line instead of passing unseen."""
    total, val_rows = len(dataset), data.get("val_rows")
    more = f"data.val_rows=N (N >= {MIN_VAL_ROWS}) or a larger data.val_fraction" if "val_rows" in data \
        else "a larger data.val_fraction"
    if val_rows is not None:
        if val_rows >= total:
            raise ConfigError(f"data.val_rows={val_rows} leaves no training rows: the data has {total} rows; "
                              f"set data.val_rows below {total}")
        num_val, asked = val_rows, f"data.val_rows={val_rows}"
    else:
        fraction = float(data.val_fraction)
        num_val, asked = min(int(round(total * fraction)), total - 1), f"data.val_fraction={fraction}"
        if fraction > 0 and num_val == 0:
            print(f"data: {asked} of {total} rows holds out none: no validation; for one set {more}")
    if num_val == 0:
        return dataset, None
    if num_val < MIN_VAL_ROWS:
        print(f"data: validation holds only {num_val} of {total} rows ({asked}), too few for a meaningful "
              f"validation metric; set {more}")
    generator = torch.Generator().manual_seed(int(data.seed))
    train, val = torch.utils.data.random_split(dataset, [total - num_val, num_val], generator=generator)
    return train, val
