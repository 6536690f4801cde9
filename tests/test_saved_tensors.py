"""Saved-activation accounting with saved_tensors_hooks, and the one-pipeline composition of stages."""

import copy

import torch
from torch import nn

from lowmem_train import SavedBytesMeter
from lowmem_train.saved_tensors import install_pipeline


def test_meter_counts_activation_storages_once_and_never_parameters():
    linear = nn.Linear(256, 256)
    x = torch.randn(32, 256, requires_grad=True)
    with SavedBytesMeter(linear) as meter:
        y = linear(x)
    assert meter.bytes == x.nbytes  # linear saves its input (and its weight, which is a parameter)
    with SavedBytesMeter(linear) as meter:
        h = torch.tanh(linear(x))
        (h * h).sum()  # h saved by tanh (its output) and twice by mul: one storage
    assert meter.bytes == x.nbytes + h.nbytes
    y.sum().backward()


class CountingStage:
    def __init__(self):
        self.packed, self.unpacked = 0, 0

    def pack(self, tensor):
        self.packed += 1
        return tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor

    def unpack(self, tensor):
        self.unpacked += 1
        return tensor.float() if tensor.dtype == torch.bfloat16 else tensor


def test_installed_stage_sees_every_activation_and_meters_see_its_output():
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    x = torch.randn(16, 64)
    with SavedBytesMeter(model) as plain:
        model(x).sum()
    stage = CountingStage()
    install_pipeline(model).append(stage)
    weights = [p.detach().clone() for p in model.parameters()]
    with SavedBytesMeter(model) as staged:
        loss = model(x).sum()
    loss.backward()
    assert staged.bytes == plain.bytes // 2
    assert stage.packed == stage.unpacked > 0
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))  # parameters never staged
    assert all(p.grad is not None for p in model.parameters())


def test_pipeline_is_inactive_outside_the_model_forward():
    model = nn.Linear(8, 8)
    stage = CountingStage()
    install_pipeline(model).append(stage)
    x = torch.randn(4, 8, requires_grad=True)
    (torch.sin(x) * 2).sum().backward()
    assert stage.packed == 0


class CloneStage:
    """Exact, and keeps no reference to the original: its memory is free for the next tensor."""

    def pack(self, tensor):
        return tensor.clone()

    def unpack(self, tensor):
        return tensor


def test_a_freed_tensor_reusing_an_address_is_packed_anew():
    """A new tensor at a freed tensor's address (same shape) must not get the freed one's packed value."""
    torch.manual_seed(0)
    model = nn.Sequential(*[layer for _ in range(4) for layer in (nn.Linear(32, 32), nn.Tanh())], nn.Linear(32, 1))
    reference = copy.deepcopy(model)
    install_pipeline(model).append(CloneStage())
    x = torch.randn(8, 32)
    for _ in range(3):
        model(x).sum().backward()
        reference(x).sum().backward()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_batch_norm_running_statistics_are_model_state_not_activations():
    norm = nn.BatchNorm1d(64)
    x = torch.randn(16, 64, requires_grad=True)
    with SavedBytesMeter(norm) as meter:
        norm(x).sum()
    assert meter.bytes == x.nbytes + 2 * 64 * 4  # input + saved mean and inverse std; running stats excluded


def test_recompute_inputs_are_known_while_the_checkpointed_call_runs():
    from lowmem_train.saved_tensors import is_recompute_input, recompute_inputs
    kept, other = torch.randn(4), torch.randn(4)
    with recompute_inputs([kept]):
        assert is_recompute_input(kept) and is_recompute_input(kept.view(2, 2)) and not is_recompute_input(other)
        with recompute_inputs([other]):  # a block inside a block: both
            assert is_recompute_input(kept) and is_recompute_input(other)
        assert not is_recompute_input(other)
    assert not is_recompute_input(kept)


class Gram(nn.Module):
    """``h @ h.T``: matmul saves ``h`` and its transpose, two views of one memory."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x):
        h = self.linear(x)
        return h @ h.t()


def test_views_of_one_memory_are_packed_once_and_each_restored_as_its_view():
    torch.manual_seed(0)
    model, x = Gram(), torch.randn(8, 16)
    reference = copy.deepcopy(model)
    packed = []
    stage = CloneStage()
    stage.pack = lambda tensor: packed.append(tensor.shape) or tensor.clone()  # a copy: restored from its memory
    install_pipeline(model).append(stage)
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert len(packed) == 2  # x (by the linear) and h (once, for both of matmul's views)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
