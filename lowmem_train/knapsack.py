"""The multiple-choice knapsack that memory decisions share: one option per item (store or recompute an
operator's output; 1, 2, 4 or 8 bits for a tensor class; a strategy per block), the least summed loss
(time, gradient variance) within a byte budget."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily


def on_real_tensors(solver):
    """Run ``solver``'s tables as real tensors, also where a model is planned on fake ones (``estimate=true``)."""
    @functools.wraps(solver)
    def run(*args, **kwargs):
        with unset_fake_temporarily():
            return solver(*args, **kwargs)
    return run


def in_units(costs: Sequence[Sequence[float]], budget: float, resolution: int = 4096) -> tuple[list[list[int]], int]:
    """Costs and budget in whole units of ``budget / resolution``, costs rounded up: a choice that fits in
    units fits in the original figures."""
    unit = budget / resolution if budget > 0 else 1.0
    return [[math.ceil(c / unit - 1e-9) for c in item] for item in costs], resolution if budget > 0 else 0


@on_real_tensors
def choose_one_each(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int) -> list[int] | None:
    """For each item the index of one option, so that the summed integer cost is <= ``budget`` and the summed
    loss is least (dynamic programming, O(items x options x budget)); None when no choice fits."""
    best = torch.full((budget + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for cost, loss in zip(costs, losses):
        options = torch.full((len(cost), budget + 1), math.inf, dtype=torch.float64)
        for i, (c, value) in enumerate(zip(cost, loss)):
            if c <= budget:
                options[i, c:] = best[: budget + 1 - c] + value
        best, pick = options.min(dim=0)
        picks.append(pick)
    if not torch.isfinite(best).any():
        return None
    used = int(best.argmin())
    choice = []
    for cost, pick in zip(reversed(costs), reversed(picks)):
        index = int(pick[used])
        choice.append(index)
        used -= cost[index]
    return choice[::-1]


@on_real_tensors
def choose_along_chain(costs: Sequence[Sequence[int]], pair_costs: Sequence[Sequence[Sequence[int]]],
                       losses: Sequence[Sequence[float]], budget: int) -> list[int] | None:
    """``choose_one_each`` for items in a chain whose neighbours share a cost (a tensor at the border of two
    blocks is stored once if either keeps it): option b of item i costs ``costs[i][b]`` plus
    ``pair_costs[i][a][b]`` when item i-1 took option a (``pair_costs[0]`` is unused). Dynamic programming over
    (item, option, cost used), O(items x options^2 x budget); None when no choice fits."""
    best = torch.full((len(costs[0]), budget + 1), math.inf, dtype=torch.float64)
    for b, (c, value) in enumerate(zip(costs[0], losses[0])):
        if c <= budget:
            best[b, c] = value
    came_from = []
    for i in range(1, len(costs)):
        options = torch.full((len(costs[i]), len(best), budget + 1), math.inf, dtype=torch.float64)
        for b, (cost, value) in enumerate(zip(costs[i], losses[i])):
            for a in range(len(best)):
                c = cost + pair_costs[i][a][b]
                if c <= budget:
                    options[b, a, c:] = best[a, : budget + 1 - c] + value
        best, pick = options.min(dim=1)
        came_from.append(pick)
    if not torch.isfinite(best).any():
        return None
    flat = int(best.argmin())
    option, used = divmod(flat, budget + 1)
    choice = [option]
    for i in range(len(costs) - 1, 0, -1):
        previous = int(came_from[i - 1][option, used])
        used -= costs[i][option] + pair_costs[i][previous][option]
        option = previous
        choice.append(option)
    return choice[::-1]
