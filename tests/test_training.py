"""The training run through the Python entry point: resume from a checkpoint, CUDA memory where there is a GPU."""

import csv

import pytest
import torch

from conftest import compose_config
from lowmem_train.training import train

TINY = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=4", "trainer.max_epochs=5",
        "data.num_samples=64")


def test_resume_reapplies_strategies_and_continues_from_the_saved_step(tmp_path):
    first = compose_config(*TINY, "strategy=checkpoint", "trainer.max_steps=2", "trainer.enable_checkpointing=true",
                           run_dir=tmp_path / "first")
    train(first)
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert (tmp_path / "first" / "checkpoints" / "step2.ckpt").exists()
    resumed = compose_config(*TINY, "strategy=checkpoint", "trainer.max_steps=4", f"ckpt_path={ckpt}",
                             run_dir=tmp_path / "resumed")
    report = train(resumed)
    with open(tmp_path / "resumed" / "memory.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [3, 4]
    assert report["modules_touched"] == {"checkpoint": 4} and report["optimizer_state_bytes"] > 0


@pytest.mark.parametrize("first_steps", [4, 6], ids=["mid-epoch", "epoch-end"])
def test_a_run_ended_by_max_steps_resumes_into_the_uninterrupted_loss_curve(tmp_path, first_steps):
    """The periodic checkpoint of a finished run (6 batches per epoch here) continues exactly: the same
    batches in the same order, also in the epochs after the resumed one."""
    run = (*TINY, "data.num_samples=24", "logger=csv", "trainer.enable_checkpointing=true", "optimizer.lr=0.01")

    def losses(name, *overrides):
        train(compose_config(*run, *overrides, run_dir=tmp_path / name))
        with open(tmp_path / name / "memory.csv") as f:
            return [float(row["loss"]) for row in csv.DictReader(f)]

    whole = losses("whole", "trainer.max_steps=14")
    first = losses("first", f"trainer.max_steps={first_steps}")
    checkpoints = tmp_path / "first" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", f"step{first_steps}.ckpt"]
    resumed = losses("resumed", "trainer.max_steps=14", f"ckpt_path={checkpoints / 'last.ckpt'}")
    assert first + resumed == whole


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_memory_is_measured_per_step(tmp_path):
    report = train(compose_config(*TINY, "trainer=debug", "trainer.accelerator=gpu", run_dir=tmp_path))
    assert report["peak_source"] == "cuda_max_allocated" and report["device"].startswith("cuda")
    assert report["peak_bytes"] >= report["param_bytes"] + report["activation_bytes"]
    assert report["cuda_reserved_peak_bytes"] >= report["peak_bytes"]


def test_trainer_calls_every_loop_hook_of_a_strategy(tmp_path, monkeypatch):
    import lightning as L

    from lowmem_train import Strategy
    from lowmem_train.strategy import _registry

    class CountSteps(L.Callback):
        def __init__(self):
            self.steps = 0

        def on_train_batch_end(self, *args):
            self.steps += 1

        def state_dict(self):
            return {"steps": self.steps}

    class HalfBatchFrozenSGD(Strategy):
        """Back-propagates the first half of each batch with a zero learning rate: both visible in the report."""

        counter = CountSteps()

        def select_samples(self, scored):
            return torch.arange(scored.num_samples) < scored.num_samples // 2

        def report(self):
            return {"steps_counted": self.counter.steps}

        def configure_optimizer(self, model, build_default):
            return torch.optim.SGD(model.parameters(), lr=0.0)

        def callbacks(self):
            return [self.counter]

    monkeypatch.setitem(_registry(), "half_frozen", HalfBatchFrozenSGD)
    HalfBatchFrozenSGD.name = "half_frozen"
    plain = train(compose_config(*TINY, "trainer=debug", run_dir=tmp_path / "plain"))
    cfg = compose_config(*TINY, "trainer=debug", run_dir=tmp_path / "hooked")
    cfg.strategy = {"half_frozen": {}}
    hooked = train(cfg)
    assert hooked["strategies"] == ["half_frozen"] and HalfBatchFrozenSGD.counter.steps == 2
    assert hooked["optimizer_state_bytes"] == 0  # SGD without momentum keeps no state (AdamW would)
    assert hooked["strategy_report"] == {"half_frozen": {"steps_counted": 2}}
    first = {}
    for run in ("plain", "hooked"):
        with open(tmp_path / run / "memory.csv") as f:
            first[run] = next(csv.DictReader(f))
    assert float(first["hooked"]["loss"]) == pytest.approx(float(first["plain"]["loss"]), rel=1e-5)  # whole batch
    assert int(first["hooked"]["activation_bytes"]) == pytest.approx(int(first["plain"]["activation_bytes"]) / 2, rel=0.02)
    assert plain["optimizer_state_bytes"] > 0
