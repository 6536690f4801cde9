"""The shared multiple-choice knapsack (lowmem_train.knapsack) against brute force."""

import itertools
import random

from lowmem_train.knapsack import choose_along_chain, choose_one_each, in_units


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


def chain_cost(costs, pairs, choice):
    return sum(costs[i][k] for i, k in enumerate(choice)) + sum(pairs[i][choice[i - 1]][choice[i]]
                                                                 for i in range(1, len(choice)))


def test_chain_solver_matches_brute_force_on_random_instances():
    rng = random.Random(1)
    for _ in range(200):
        items = rng.randint(1, 5)
        sizes = [rng.randint(1, 3) for _ in range(items)]
        costs = [[rng.randint(0, 6) for _ in range(n)] for n in sizes]
        pairs = [[[0]]] + [[[rng.randint(0, 4) for _ in range(sizes[i])] for _ in range(sizes[i - 1])]
                           for i in range(1, items)]
        losses = [[rng.random() for _ in range(n)] for n in sizes]
        budget = rng.randint(0, 25)
        fits = [c for c in itertools.product(*[range(n) for n in sizes]) if chain_cost(costs, pairs, c) <= budget]
        choice = choose_along_chain(costs, pairs, losses, budget)
        if not fits:
            assert choice is None
            continue
        best = min(sum(losses[i][k] for i, k in enumerate(c)) for c in fits)
        assert chain_cost(costs, pairs, choice) <= budget
        assert abs(sum(losses[i][k] for i, k in enumerate(choice)) - best) < 1e-12
