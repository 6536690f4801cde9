"""velora: exact input gradient, rank-1-per-sub-token weight gradient, saved bytes / (C/G), state, errors."""

import copy

import pytest
import torch
from torch import nn

from lowmem_train import SavedBytesMeter, StrategyError, apply_strategies
from tiny_models import loss_of, tiny_transformer, transformer_batch


class OneLinear(nn.Module):
    """A layer named like Llama's value projection, fed a tensor nothing else keeps."""

    def __init__(self, width=24, out=8):
        super().__init__()
        self.v_proj = nn.Linear(width, out)

    def forward(self, x):
        return self.v_proj(x * 2)


def run(model, x):
    with SavedBytesMeter(model) as meter:
        out = model(x)
    out.pow(2).sum().backward()
    return meter.bytes, {n: p.grad.clone() for n, p in model.named_parameters()}


def input_grad(model, x):
    x = x.clone().requires_grad_()
    model(x).pow(2).sum().backward()
    return x.grad


def test_saved_bytes_shrink_by_the_sub_token_length_and_input_grad_is_exact():
    torch.manual_seed(0)
    plain = OneLinear()
    model = apply_strategies(copy.deepcopy(plain), {"velora": {"groups": 4}})
    x = torch.randn(3, 10, 24)
    plain_bytes, plain_grads = run(plain, x)
    velora_bytes, grads = run(model, x)
    assert plain_bytes == x.numel() * 4
    assert velora_bytes == (x.numel() // 6 + 6) * 4  # z: one value per sub-token of 6, plus v itself
    torch.testing.assert_close(grads["v_proj.bias"], plain_grads["v_proj.bias"])
    assert not torch.allclose(grads["v_proj.weight"], plain_grads["v_proj.weight"])
    torch.testing.assert_close(input_grad(model, x), input_grad(plain, x))


def test_weight_grad_is_exact_when_sub_tokens_lie_along_the_projection():
    torch.manual_seed(0)
    plain = OneLinear()
    model = apply_strategies(copy.deepcopy(plain), {"velora": {"groups": 4}})
    direction = torch.rand(6) + 0.1
    x = (torch.rand(3, 10, 4, 1) * direction).flatten(-2)  # every sub-token a positive multiple of one vector
    _, plain_grads = run(plain, x)
    _, grads = run(model, x)
    torch.testing.assert_close(grads["v_proj.weight"], plain_grads["v_proj.weight"], rtol=1e-4, atol=1e-5)


def test_projection_is_set_by_the_first_training_batch_and_resumes():
    torch.manual_seed(0)
    model = apply_strategies(OneLinear(), {"velora": {"groups": 4}})
    model.eval()
    model(torch.randn(2, 24))  # evaluation does not initialise
    assert not model.v_proj.velora_initialized
    model.train()
    first = torch.randn(5, 24)
    run(model, first)
    sub_tokens = (first * 2).reshape(-1, 6)
    expected = sub_tokens.mean(0) / sub_tokens.mean(0).norm()
    torch.testing.assert_close(model.v_proj.velora_v, expected)
    run(model, torch.randn(5, 24) + 3)  # frozen after the first batch
    torch.testing.assert_close(model.v_proj.velora_v, expected)

    resumed = apply_strategies(OneLinear(), {"velora": {"groups": 4}})
    resumed.load_state_dict(model.state_dict())
    x = torch.randn(4, 24)
    model.zero_grad()
    assert torch.equal(run(resumed, x)[1]["v_proj.weight"], run(model, x)[1]["v_proj.weight"])


def test_batch_average_follows_every_batch():
    model = apply_strategies(OneLinear(), {"velora": {"groups": 4, "init": "batch_average"}})
    run(model, torch.randn(5, 24))
    before = model.v_proj.velora_v.clone()
    run(model, torch.randn(5, 24) + 3)
    assert not torch.allclose(before, model.v_proj.velora_v)


def test_defaults_pick_value_and_mlp_down_projections_of_llama():
    model = apply_strategies(tiny_transformer(), {"velora": {"groups": 16}})
    chosen = sorted(n for n, m in model.named_modules() if hasattr(m, "velora_v"))
    assert chosen == [f"model.layers.{i}.{name}" for i in (0, 1) for name in ("mlp.down_proj", "self_attn.v_proj")]


def test_lora_adapters_input_is_projected():
    peft = pytest.importorskip("peft", reason="the LoRA path needs peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_transformer(), peft.LoraConfig(r=4, target_modules=["v_proj", "down_proj"]))
    plain = copy.deepcopy(model)
    apply_strategies(model, {"velora": {"groups": 16}})
    chosen = sorted(n for n, m in model.named_modules() if hasattr(m, "velora_v"))
    assert len(chosen) == 4 and all(n.endswith("lora_A.default") for n in chosen)
    batch = transformer_batch()
    with SavedBytesMeter(plain) as plain_meter:
        loss_of("transformer", plain, batch).backward()
    with SavedBytesMeter(model) as meter:
        loss = loss_of("transformer", model, batch)
    loss.backward()
    assert meter.bytes < plain_meter.bytes
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("options, message", [
    ({"groups": 5}, "has 32 input features, not divisible by groups=5 \\(no padding support\\)"),
    ({"init": "random"}, "init=random; valid: first_batch, batch_average"),
    ({"targets": [".*act_fn"]}, "not an nn.Linear"),
])
def test_bad_input_is_a_one_line_error(options, message):
    with pytest.raises(StrategyError, match=message):
        apply_strategies(tiny_transformer(), {"velora": options})


def test_a_linear_whose_weight_the_parent_reads_is_never_projected():
    """torchvision's Swin attention reads qkv.weight itself: VeLoRA's forward would never run there."""
    import torchvision
    swin = torchvision.models.SwinTransformer([4, 4], 16, [2], [2], [4, 4], num_classes=4)
    with pytest.raises(StrategyError, match="default value/MLP-down projections .* match no module"):
        apply_strategies(swin, {"velora": {"groups": 4}})
    with pytest.raises(StrategyError, match=r"^strategy 'velora': features.1.0.attn.qkv's weight is read directly by "
                                            r"its parent's forward, which never calls the layer; exclude it$"):
        apply_strategies(swin, {"velora": {"groups": 4, "targets": [".*qkv"]}})
