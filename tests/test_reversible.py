"""Reversible stacks: memory flat in depth, gradients equal to the converted model under plain autograd."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from transformers import LlamaForCausalLM, T5Config, T5EncoderModel

from lowmem_train import SavedBytesMeter, StrategyError, apply_strategies, get_strategy_class
from lowmem_train.strategy import apply_built
from lowmem_train.strategies.reversible import use_plain_autograd
from tiny_models import TinyResNet, tiny_llama_config


def llama(layers, dtype=torch.float32):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=172, num_hidden_layers=layers,
                                               attention_dropout=0.1)).to(dtype).train()
    ids = torch.randint(0, 96, (2, 128))
    return model, lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss


def step(model, loss_fn):
    """Saved bytes of one forward, and the gradients of its backward (dropout seeded alike)."""
    model.zero_grad()
    torch.manual_seed(3)
    with SavedBytesMeter(model) as meter:
        loss = loss_fn(model)
    loss.backward()
    return meter.bytes, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def converted_and_reference(model):
    converted = apply_strategies(copy.deepcopy(model), {"reversible": {"drift_check_every": 2}})
    reference = copy.deepcopy(converted)
    use_plain_autograd(reference)
    return converted, reference


def test_saved_bytes_nearly_flat_in_depth():
    saved = {}
    for layers in (2, 4):
        model, loss_fn = llama(layers)
        converted = apply_strategies(model, {"reversible": {"drift_check_every": 2}})
        step(converted, loss_fn)  # a drift-check step: it stores the true inputs
        saved[layers] = step(converted, loss_fn)[0]
    assert saved[4] < 1.1 * saved[2], saved


@pytest.mark.parametrize("build", ["llama", "cnn"])
def test_grads_match_plain_autograd_of_the_converted_architecture(build):
    if build == "llama":
        model, loss_fn = llama(3)
    else:
        torch.manual_seed(0)
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
        model, loss_fn = TinyResNet(16).train(), lambda m: nn.functional.cross_entropy(m(x), y)
    converted, reference = converted_and_reference(model)
    for _ in range(2):  # a checked and an unchecked step
        rev_bytes, got = step(converted, loss_fn)
        plain_bytes, expected = step(reference, loss_fn)
        for name in expected:
            error = (got[name] - expected[name]).norm() / expected[name].norm().clamp_min(1e-12)
            assert error < 1e-4, f"{name}: relative gradient error {error:.2e}"
    assert rev_bytes < plain_bytes
    for (name, a), b in zip(reference.named_buffers(), converted.buffers()):
        assert torch.equal(a, b), f"buffer {name}: batch norm updated twice"
    stack = next(m._lowmem_rev.stack for m in converted.modules() if "_lowmem_rev" in m.__dict__)
    assert 0 <= stack.max_error < 1e-5 and not stack.plain


def test_bf16_drift_beyond_tolerance_warns_and_falls_back_to_storing():
    model, loss_fn = llama(2, torch.bfloat16)
    strategy = get_strategy_class("reversible")({"drift_check_every": 1, "drift_tolerance": 1e-6})
    apply_built(model, [strategy])
    assert strategy.report() == {"stacks": 1, "stacks_storing_activations": [], "max_rebuild_error": 0.0}
    with pytest.warns(UserWarning, match="falling back to storing"):
        step(model, loss_fn)
    stack = model.model.layers[0]._lowmem_rev.stack
    assert stack.plain and stack.max_error > 1e-6
    report = strategy.report()  # what the run's memory_report.json says of it
    assert report["stacks_storing_activations"] == ["model.layers.0"] and report["max_rebuild_error"] > 1e-6


def test_model_without_residual_blocks_is_refused():
    with pytest.raises(StrategyError, match="no residual blocks|match no module"):
        apply_strategies(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "reversible")


def test_pretrained_model_is_refused():
    model, _ = llama(2)
    model.config.name_or_path = "some/pretrained-llama"
    with pytest.raises(StrategyError, match="only applies to models trained from scratch"):
        apply_strategies(model, "reversible")


def test_checkpoint_on_the_same_blocks_is_refused():
    with pytest.raises(StrategyError, match="'checkpoint' cannot rebuild its forward, 'reversible' already does"):
        apply_strategies(TinyResNet(), ["reversible", "checkpoint"])


def test_gpt2_tuple_returning_blocks_with_a_kv_cache_in_the_call():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=100, bos_token_id=0,
                                       eos_token_id=0)).train()
    ids = torch.randint(0, 100, (2, 16))
    # use_cache defaults to True: the recomputation must not append to the cache the forward filled
    converted, reference = converted_and_reference(model)
    _, got = step(converted, lambda m: m(input_ids=ids, labels=ids).loss)
    _, expected = step(reference, lambda m: m(input_ids=ids, labels=ids).loss)
    for name in expected:
        error = (got[name] - expected[name]).norm() / expected[name].norm().clamp_min(1e-12)
        assert error < 1e-4, f"{name}: relative gradient error {error:.2e}"


def test_stacks_are_runs_of_neighbouring_blocks_that_keep_their_shape():
    import torchvision

    from lowmem_train import get_strategy_class

    plan = get_strategy_class("reversible")().plan
    vit = torchvision.models.VisionTransformer(32, 8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32)
    assert [t.action.split(":")[0] for t in plan(vit)] == [f"reversible stack 0 block {i}/3" for i in (1, 2, 3)]
    resnet = {t.module: t.action.split(":")[0] for t in plan(torchvision.models.resnet18()) if t.changed}
    assert resnet == {"layer1.0": "reversible stack 0 block 1/2", "layer1.1": "reversible stack 0 block 2/2",
                      "layer2.1": "reversible stack 1 block 1/1", "layer3.1": "reversible stack 2 block 1/1",
                      "layer4.1": "reversible stack 3 block 1/1"}  # layerN.0 downsamples: not reversible


class Widen(nn.Module):
    """A residual-looking block that changes the width, with no ``downsample`` attribute to tell."""

    def __init__(self, width_in, width_out):
        super().__init__()
        self.linear = nn.Linear(width_in, width_out)

    def forward(self, x):
        return self.linear(x)


def test_blocks_that_change_the_hidden_state_are_left_out_before_training_and_said_so():
    model = nn.Sequential(Widen(8, 8), Widen(8, 8), Widen(8, 16), Widen(16, 16), nn.Linear(16, 2))
    plan = get_strategy_class("reversible")().plan(model)
    assert {t.module: t.changed for t in plan} == {"0": True, "1": True, "2": False, "3": True}
    assert next(t.action for t in plan if t.module == "2") == "left alone: it maps (2, 8) to (2, 16)"
    converted = apply_strategies(model, "reversible")
    converted(torch.randn(3, 8)).sum().backward()  # trains: the widening block runs as it is


@pytest.mark.parametrize("build, message", [
    (lambda: torchvision.models.DenseNet(8, (2,), 16), "denselayer1: it takes a list, not a hidden-state tensor"),
    (lambda: T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)),
     "encoder.block.0: it returns 3 outputs that the model reads on"),
])
def test_blocks_that_do_not_map_one_tensor_to_one_tensor_are_refused_when_applied(build, message):
    with pytest.raises(StrategyError, match=message) as refusal:
        apply_strategies(build(), "reversible")
    assert "\n" not in str(refusal.value)


def test_inverted_residuals_without_a_skip_are_left_out():
    model = torchvision.models.mobilenet_v2(width_mult=0.25)
    names = [t.module for t in get_strategy_class("reversible")().plan(model) if t.changed]
    assert names and all(model.get_submodule(n).use_res_connect for n in names)


def test_mixed_precision_rebuilds_under_the_forwards_autocast():
    """Under bf16 autocast (trainer.precision=bf16-mixed) the backward recomputes each block as its forward
    ran: in autocast, so its convolutions see bf16 weights and inputs alike."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    model = TinyResNet(16).train()

    def loss_fn(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.cross_entropy(m(x), y)

    # bf16 sums rebuild a block's input within ~2e-3 (bf16's rounding), above the default tolerance
    converted = apply_strategies(copy.deepcopy(model), {"reversible": {"drift_check_every": 1,
                                                                        "drift_tolerance": 0.02}})
    reference = copy.deepcopy(converted)
    use_plain_autograd(reference)
    _, got = step(converted, loss_fn)
    _, expected = step(reference, loss_fn)
    stack = next(m._lowmem_rev.stack for m in converted.modules() if "_lowmem_rev" in m.__dict__)
    assert not stack.plain and 0 < stack.max_error < 0.02
    for name in expected:
        cosine = nn.functional.cosine_similarity(got[name].flatten(), expected[name].flatten(), dim=0)
        assert cosine > 0.99, f"{name}: gradient cosine {cosine:.4f} against plain autograd under autocast"
