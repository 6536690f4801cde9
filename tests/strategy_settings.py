"""Test settings of every registered strategy, read by tests/test_strategy_registry.py.

A strategy registered without an entry here fails that test. Keys:
- options: passed to the strategy on the tiny models;
- applies_to: the tiny models it converts ("cnn", "transformer"); on the others it must raise StrategyError;
- min_grad_cosine: for approximate strategies (exact=False), the least cosine similarity between the
  strategy's and plain backprop's gradient, per parameter, on the first step; None for a strategy that
  changes the model's function by design (an architecture conversion), whose own tests hold its bounds:
  then only two finite training steps are checked here.
"""

STRATEGY_SETTINGS = {
    "none": {"options": {}, "applies_to": ("cnn", "transformer")},
    "checkpoint": {"options": {}, "applies_to": ("cnn", "transformer")},
    "approx_bp": {"options": {}, "applies_to": ("transformer",), "min_grad_cosine": 0.6},
}
