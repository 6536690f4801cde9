"""Plain backprop: the baseline every other strategy is measured against (no options).

    lowmem-train strategy=none
"""

from lowmem_train import Strategy


class NoStrategy(Strategy):
    exact = True
    summary = "plain backprop: saves every activation autograd asks for; the baseline"

    def estimate_problem(self) -> str | None:
        return None  # tests/test_estimate.py checks its fake step against a real one
