"""Test settings of every registered strategy, read by the conformance suite (tests/conformance.py,
tests/test_strategy_registry.py) and scripts/conformance_table.py.

A strategy registered without an entry here fails that test. Keys:
- options: passed to the strategy on the zoo models (tests/zoo.py);
- needs: the architecture traits (see tests/zoo.py) it needs to apply; on a model lacking one it must
  raise a one-line StrategyError. Absent: it applies to every architecture;
- min_grad_cosine: for approximate strategies (exact=False), the least cosine similarity between the
  strategy's and plain backprop's gradient, per parameter, on the first step; None for a strategy that
  changes the model's function by design (an architecture conversion), whose own tests hold its bounds:
  then only two finite training steps are checked here, and in a combination it is the reference;
- adapter: True for a strategy that freezes the model and trains parameters it adds (LoRA): the forward is
  unchanged at initialisation, every original parameter is kept and frozen; in a combination the model
  with adapters alone is the reference;
- saves_activations: True for a strategy whose point is fewer saved bytes: applying it must lower what the
  forward saves, so a strategy that silently converts nothing fails.
"""

STRATEGY_SETTINGS = {
    "none": {"options": {}},
    "checkpoint": {"options": {}, "saves_activations": True},
    # 4 bits: per-parameter cosine >= 0.91 over 6 rounding seeds on these batches (tests/test_compress.py
    # holds 8/4/2-bit bounds); min_numel 256 so that the tiny models' activations are compressed at all
    "compress": {"options": {"bits": 4, "min_numel": 256}, "min_grad_cosine": 0.85, "saves_activations": True},
    "selective_checkpoint": {"options": {"memory_budget": 0.5}, "saves_activations": True},
    "offload": {"options": {}},
    "reversible": {"options": {}, "needs": ("residual_blocks",), "min_grad_cosine": None},
    "approx_bp": {"options": {}, "needs": ("gelu_silu",), "min_grad_cosine": 0.6, "saves_activations": True},
    "step_in_backward": {"options": {}},
    "skip_backward": {"options": {}, "min_grad_cosine": 0.9},
    "velora": {"options": {"groups": 16}, "needs": ("velora_layers",), "min_grad_cosine": 0.4,
               "saves_activations": True},
    # aot_eager: Dynamo and AOTAutograd as with inductor, without its minutes of C++ code generation on CPU
    "compile": {"options": {"backend": "aot_eager"}},
    # 8 tokens of the tiny models' 96-word vocabulary per chunk: the tiny batch's 32 tokens make 4 chunks
    "chunked_ce": {"options": {"chunk_bytes": 8 * 96 * 4}, "needs": ("causal_lm",), "saves_activations": True},
    # LoRA's default targets are the Linear layers inside the repeated blocks
    "lora": {"options": {"r": 4}, "needs": ("linear_blocks",), "adapter": True},
    # exact menu only (the default): the plan mixes keep / selective / checkpoint, gradients stay plain
    "auto": {"options": {"memory_budget": "0.75", "repeats": 1}, "saves_activations": True},
    # forward-only: applying it leaves the model's forward and backprop's gradients as they are (its
    # perturbations act only inside its own step, tests/test_zo_sgd.py); through the trainer it saves nothing
    # at all (test_strategy_registry.LOOP_EFFECTS)
    "zo_sgd": {"options": {"n_perturbations": 2}, "min_grad_cosine": 0.99},
}


def applies(names, traits) -> bool:
    """Whether every strategy of ``names`` finds what it needs in a model with ``traits``."""
    return all(set(STRATEGY_SETTINGS[name].get("needs", ())) <= set(traits) for name in names)
