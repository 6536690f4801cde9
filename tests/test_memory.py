"""Memory accounting: per-step rows, the report, optimizer-state bytes, documentation of every key."""

import csv
import re
from pathlib import Path

import torch

from conftest import compose_config
from lowmem_train.memory import COLUMNS, format_report, frozen_weight_bytes, optimizer_state_bytes
from lowmem_train.sweep import sweep_table
from lowmem_train.training import build_recipe, train

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def tiny_llama_run(tmp_path, *overrides):
    cfg = compose_config("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=64",
                         "data.batch_size=4", "data.num_samples=32", "trainer=debug", *overrides, run_dir=tmp_path)
    return train(cfg)


def test_report_and_csv_measure_each_component(tmp_path):
    report = tiny_llama_run(tmp_path / "adamw")
    model = build_recipe(compose_config("recipe=llama_finetune", "model=llama_tiny")).build_model()
    assert report["param_bytes"] == report["grad_bytes"] == sum(p.nbytes for p in model.parameters())
    assert report["optimizer_state_bytes"] >= 2 * report["param_bytes"]  # AdamW: exp_avg + exp_avg_sq (+ steps)
    assert report["peak_source"] == "live_tensors" and report["activation_bytes"] > 0
    assert report["tokens_per_s"] > 0 and report["steps"] == 2
    with open(tmp_path / "adamw" / "memory.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS and len(rows) == 2
    components = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes")
    assert report["accounted_bytes"] == max(sum(int(row[k]) for k in components) for row in rows)
    # the second step holds weights, AdamW's state and every saved activation at once when its forward ends,
    # and the logits' temporaries on top: its real peak is above that
    second = {k: int(v) for k, v in rows[1].items() if k in (*components, "peak_bytes")}
    held = second["param_bytes"] + second["optimizer_state_bytes"] + second["activation_bytes"]
    assert held < second["peak_bytes"] <= held + second["grad_bytes"] + second["activation_bytes"] * 2
    sgd = tiny_llama_run(tmp_path / "sgd", "optimizer=sgd")
    assert sgd["optimizer_state_bytes"] == sgd["param_bytes"]  # one momentum buffer per parameter


def test_the_cpu_peak_counts_temporaries_the_accounted_sum_misses(tmp_path):
    """A temporary of 64 MiB inside the forward is freed before backward: no category holds it, the peak does."""
    import lightning as L

    from lowmem_train.memory import MemoryMonitor

    class MakesATemporary(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 8)
            self.activation_bytes = 0

        def training_step(self, batch, batch_idx):
            big = batch.new_ones(16 * 2**20).sum()  # 64 MiB of fp32, gone before backward
            loss = self.layer(batch).square().mean() + 0 * big
            self.last_output = type("Output", (), {"mean_loss": lambda: loss.detach(), "num_samples": 4,
                                                   "num_tokens": 0})
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        @property
        def model(self):
            return self.layer

    monitor = MemoryMonitor(tmp_path)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])
    trainer.fit(MakesATemporary(), torch.utils.data.DataLoader(torch.randn(4, 8), batch_size=4))
    row = monitor.rows[0]
    assert row["accounted_bytes"] < 2**20 and 64 * 2**20 <= row["peak_bytes"] < 65 * 2**20


def test_checkpoint_reduces_measured_activation_bytes(tmp_path):
    plain = tiny_llama_run(tmp_path / "none")
    checkpointed = tiny_llama_run(tmp_path / "ckpt", "strategy=checkpoint")
    assert checkpointed["activation_bytes"] < plain["activation_bytes"] / 2
    assert abs(checkpointed["final_train_loss"] - plain["final_train_loss"]) < 1e-5


def test_a_trained_tied_embedding_is_not_also_a_frozen_head():
    """Llama-3.2 ties its output head to the embedding: one storage under two state-dict names."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert frozen_weight_bytes(model) == 0
    model.requires_grad_(False)
    assert frozen_weight_bytes(model) == sum(p.nbytes for p in model.parameters())  # counted once


def test_optimizer_state_bytes_counts_every_state_tensor():
    param = torch.nn.Parameter(torch.randn(100, 10))
    optimizer = torch.optim.Adam([param])
    param.grad = torch.randn_like(param)
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == 2 * param.nbytes + optimizer.state[param]["step"].nbytes


def test_every_report_key_and_csv_column_is_documented(tmp_path):
    report = tiny_llama_run(tmp_path)
    documented = set(re.findall(r"`([a-z_/]+)`", README))
    assert set(report) - documented == set()
    assert set(COLUMNS) - documented == set()
    assert "GiB" in format_report(report)


def test_sweep_table_has_one_row_per_job(tmp_path):
    for i, strategy in enumerate(["none", "checkpoint"]):
        tiny_llama_run(tmp_path / str(i), f"strategy={strategy}")
    table = sweep_table(tmp_path).splitlines()
    assert len(table) == 4 and table[0].startswith("| job | peak GiB") and "| 0 |" in table[2]
