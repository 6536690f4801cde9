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
    assert report["peak_source"] == "accounted" and report["activation_bytes"] > 0
    assert report["tokens_per_s"] > 0 and report["steps"] == 2
    with open(tmp_path / "adamw" / "memory.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS and len(rows) == 2
    components = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes")
    assert report["peak_bytes"] == max(sum(int(row[k]) for k in components) for row in rows)
    sgd = tiny_llama_run(tmp_path / "sgd", "optimizer=sgd")
    assert sgd["optimizer_state_bytes"] == sgd["param_bytes"]  # one momentum buffer per parameter


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
