"""Test settings of every registered strategy, read by tests/test_strategy_registry.py.

A strategy registered without an entry here fails that test. Keys:
- options: passed to the strategy on the tiny models;
- applies_to: the tiny models it converts ("cnn", "transformer"); on the others it must raise StrategyError;
- min_grad_cosine: for approximate strategies (exact=False), the least cosine similarity between the
  strategy's and plain backprop's gradient, per parameter, on the first step; None for a strategy that
  changes the model's function by design (an architecture conversion), whose own tests hold its bounds:
  then only two finite training steps are checked here;
- adapter: True for a strategy that freezes the model and trains parameters it adds (LoRA): the forward is
  unchanged at initialisation, every original parameter is kept and frozen, only the added ones train.
"""

STRATEGY_SETTINGS = {
    "none": {"options": {}, "applies_to": ("cnn", "transformer")},
    "checkpoint": {"options": {}, "applies_to": ("cnn", "transformer")},
    # 4 bits: per-parameter cosine >= 0.91 over 6 rounding seeds on these batches (tests/test_compress.py
    # holds 8/4/2-bit bounds); min_numel 256 so that the tiny models' activations are compressed at all
    "compress": {"options": {"bits": 4, "min_numel": 256}, "applies_to": ("cnn", "transformer"),
                 "min_grad_cosine": 0.85},
    "selective_checkpoint": {"options": {"memory_budget": 0.5}, "applies_to": ("cnn", "transformer")},
    "offload": {"options": {}, "applies_to": ("cnn", "transformer")},
    "reversible": {"options": {}, "applies_to": ("cnn", "transformer"), "min_grad_cosine": None},
    "approx_bp": {"options": {}, "applies_to": ("transformer",), "min_grad_cosine": 0.6},
    "step_in_backward": {"options": {}, "applies_to": ("cnn", "transformer")},
    "skip_backward": {"options": {}, "applies_to": ("cnn", "transformer"), "min_grad_cosine": 0.9},
    "velora": {"options": {"groups": 16}, "applies_to": ("transformer",), "min_grad_cosine": 0.4},
    # aot_eager: Dynamo and AOTAutograd as with inductor, without its minutes of C++ code generation on CPU
    "compile": {"options": {"backend": "aot_eager"}, "applies_to": ("cnn", "transformer")},
    # chunk_size 8: the tiny batch's 32 tokens make 4 chunks
    "chunked_ce": {"options": {"chunk_size": 8}, "applies_to": ("transformer",)},
    # the CNN's blocks hold no Linear layer: LoRA's default targets match nothing there
    "lora": {"options": {"r": 4}, "applies_to": ("transformer",), "adapter": True},
}
