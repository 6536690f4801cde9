"""The shared multiple-choice knapsack (lowmem_train.knapsack) against brute force."""

import itertools
import random

from lowmem_train.knapsack import choose_one_each, in_units


def brute_force(costs, losses, budget):
    fits = [c for c in itertools.product(*[range(len(item)) for item in costs])
            if sum(costs[i][k] for i, k in enumerate(c)) <= budget]
    return min((sum(losses[i][k] for i, k in enumerate(c)) for c in fits), default=None)


def test_matches_brute_force_on_random_instances():
    rng = random.Random(0)
    for _ in range(200):
        items = rng.randint(1, 5)
        costs = [[rng.randint(0, 9) for _ in range(rng.randint(1, 4))] for _ in range(items)]
        losses = [[rng.random() for _ in item] for item in costs]
        budget = rng.randint(0, 20)
        choice = choose_one_each(costs, losses, budget)
        best = brute_force(costs, losses, budget)
        if best is None:
            assert choice is None
            continue
        assert sum(costs[i][k] for i, k in enumerate(choice)) <= budget
        assert abs(sum(losses[i][k] for i, k in enumerate(choice)) - best) < 1e-12


def test_units_round_costs_up_so_a_choice_that_fits_in_units_fits():
    costs, budget = in_units([[0, 1000], [0, 3001]], 4000, resolution=4)
    assert costs == [[0, 1], [0, 4]] and budget == 4
    assert choose_one_each(costs, [[5.0, 0.0], [9.0, 0.0]], budget) == [0, 1]  # 1000 + 3001 > 4000: not both
