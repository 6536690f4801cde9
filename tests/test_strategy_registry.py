"""One generic test over the strategy registry: every registered strategy, on a tiny CNN and a tiny transformer."""

import copy

import pytest
import torch

from conftest import compose_config
from lowmem_train import StrategyError, apply_strategies, available_strategies, get_strategy_class
from lowmem_train.cli import CONFIG_DIR
from strategy_settings import STRATEGY_SETTINGS
from tiny_models import MODELS, loss_of


def first_step_grads(model, kind, batch, steps=2):
    """Gradients of the first step, after running ``steps`` SGD steps (so the strategy runs twice)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    grads = None
    for _ in range(steps):
        torch.manual_seed(7)  # same dropout masks in the baseline and the strategy run
        loss = loss_of(kind, model, batch)
        loss.backward()
        if grads is None:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(loss)
    return grads


def check_adapter(baseline, model, params_before, kind, batch):
    """Same loss at initialisation; the original parameters kept and frozen; only added ones get gradients."""
    torch.testing.assert_close(loss_of(kind, model, batch), loss_of(kind, baseline, batch))
    originals = {id(p) for p in params_before.values()}
    kept = [p for p in model.parameters() if id(p) in originals]
    assert len(kept) == len(originals) and not any(p.requires_grad for p in kept)
    grads = first_step_grads(model, kind, batch)
    assert grads and all(id(p) not in originals for n, p in model.named_parameters() if n in grads)


@pytest.mark.parametrize("name", available_strategies())
def test_strategy_has_settings_and_config(name):
    assert name in STRATEGY_SETTINGS, f"strategy '{name}' has no entry in tests/strategy_settings.py"
    assert (CONFIG_DIR / "strategy" / f"{name}.yaml").exists(), f"no configs/strategy/{name}.yaml"
    cfg = compose_config(f"strategy={name}")
    assert list(cfg.strategy) == [name]
    get_strategy_class(name)(cfg.strategy[name])  # the shipped options are valid


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("name", available_strategies())
def test_strategy_on_tiny_models(name, kind):
    settings = STRATEGY_SETTINGS[name]
    build, make_batch = MODELS[kind]
    torch.manual_seed(0)
    baseline = build()
    model = copy.deepcopy(baseline)
    params_before = {n: p for n, p in model.named_parameters()}
    values_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = {name: settings["options"]}
    if kind not in settings["applies_to"]:
        with pytest.raises(StrategyError):
            apply_strategies(model, spec)
        return
    assert apply_strategies(model, spec) is model
    assert apply_strategies(model, spec) is model  # applying again does not wrap twice
    if settings.get("adapter"):
        check_adapter(baseline, model, params_before, kind, make_batch())
        return
    assert {n: p for n, p in model.named_parameters()}.keys() == params_before.keys()
    for n, p in model.named_parameters():
        assert p is params_before[n], f"{name} replaced parameter {n}"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}  # e.g. norm weights folded away
    batch = make_batch()
    expected = first_step_grads(baseline, kind, batch)
    got = first_step_grads(model, kind, batch)
    assert got.keys() == expected.keys() - frozen
    strategy = get_strategy_class(name)
    if strategy.exact:
        assert not frozen, f"exact strategy {name} froze {sorted(frozen)}"
        unchanged = all(torch.equal(values_before[n], p) for n, p in model.named_parameters())
        assert not unchanged, "two training steps left every parameter unchanged"
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6, msg=f"{name}: grad of {n}")
    elif settings["min_grad_cosine"] is not None:
        bound = settings["min_grad_cosine"]
        for n in got:
            cosine = torch.nn.functional.cosine_similarity(got[n].flatten(), expected[n].flatten(), dim=0)
            assert cosine >= bound, f"{name}: grad cosine of {n} is {cosine:.4f} < {bound}"
