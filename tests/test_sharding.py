"""FSDP2 sharding (lowmem_train/sharding.py, ``trainer=fsdp``) on CPU with two gloo processes.

The plain-loop tests train a tiny Llama for a few steps sharded over 2 processes, each on half of the global
batch, and compare with one process on the whole batch: exact strategies give the same loss curve (<= 1e-5),
lossy ones stay within their declared bound. The CLI tests run the trainer: sharded checkpoints resume
exactly, every rank reports its shard, refusals are one line.
"""

from __future__ import annotations

import json
import os
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowmem_train import apply_strategies, available_strategies, get_strategy_class
from lowmem_train.memory import optimizer_state_bytes, tensor_bytes
from lowmem_train.saved_tensors import SavedBytesMeter
from lowmem_train.sharding import shard_model, shard_units
from strategy_settings import STRATEGY_SETTINGS
from test_strategy_registry import TRAIN_OPTIONS
from tiny_models import tiny_llama_config

pytestmark = pytest.mark.filterwarnings("ignore:strategy .* also acts on the training loop")
WORLD = 2
STEPS = 4
# name -> (strategy spec, the bound on |loss - single-process loss| / loss over the steps, shard_model options).
# Exact strategies 1e-5; compress draws its own rounding noise on each rank's half batch, so the curves differ
# by that noise; bf16 compute (the fp32 single process is the reference) by bf16 rounding.
CASES = {
    "none": ("none", 1e-5, {}),
    "checkpoint": ("checkpoint", 1e-5, {}),
    "selective_checkpoint": ({"selective_checkpoint": {"memory_budget": 0.5}}, 1e-5, {}),
    "approx_bp": ("approx_bp", 1e-5, {}),  # deterministic: the same approximate gradient as one process
    "chunked_ce": ({"chunked_ce": {"chunk_bytes": 8 * 96 * 4}}, 1e-5, {}),  # 8 tokens per chunk
    "lora": ({"lora": {"r": 4}}, 1e-5, {}),
    "compress": ({"compress": {"bits": 4, "min_numel": 256}}, 0.02, {}),
    "checkpoint+compress": (["checkpoint", {"compress": {"bits": 8, "min_numel": 256}}], 0.01, {}),
    "checkpoint, bf16 compute": ("checkpoint", 0.01, {"param_dtype": "bfloat16", "reduce_dtype": "float32"}),
}


def build_model() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))


def global_batch() -> torch.Tensor:
    return torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))


def train_losses(spec, *, rank: int = 0, world: int = 1, mesh=None, shard_options=None) -> dict:
    """``STEPS`` AdamW steps of the tiny Llama under ``spec``; sharded over ``mesh`` when given. The losses are
    of the global batch (the ranks' halves averaged); unsharded with ``world`` > 1, of rank ``rank``'s rows."""
    model = build_model()
    apply_strategies(model, spec)
    if mesh is not None:
        shard_model(model, mesh, **(shard_options or {}))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    rows = global_batch().chunk(world)[rank]
    losses = []
    meter = SavedBytesMeter(model)
    for _ in range(STEPS):
        with meter:
            loss = model(input_ids=rows, labels=rows, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().clone()
        if mesh is not None:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    return {"losses": losses, "activation_bytes": meter.bytes, "param_bytes": tensor_bytes(parameters),
            "optimizer_bytes": optimizer_state_bytes(optimizer)}


def sharded_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {name: train_losses(spec, rank=rank, world=WORLD, mesh=mesh, shard_options=options)
                   for name, (spec, _, options) in CASES.items()}
        with open(f"{out}.{rank}", "w") as file:
            json.dump(results, file)
        dist.barrier()  # no rank tears down while another still talks to it
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "results"
    mp.spawn(sharded_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads(open(f"{out}.{rank}").read()) for rank in range(WORLD)]


def test_shard_units_are_the_repeated_blocks():
    assert shard_units(build_model()) == ["model.layers.0", "model.layers.1", "model.layers.2"]


@pytest.mark.parametrize("name", CASES)
def test_sharded_training_tracks_one_process_on_the_global_batch(name, sharded_runs):
    spec, bound, _ = CASES[name]
    single = train_losses(spec)["losses"]
    sharded = sharded_runs[0][name]["losses"]
    assert sharded_runs[1][name]["losses"] == sharded  # every rank saw the same averaged loss
    for got, want in zip(sharded, single):
        assert abs(got - want) <= bound * abs(want), (sharded, single)


@pytest.mark.parametrize("name", CASES)
def test_sharded_activations_are_those_of_a_half_batch(name, sharded_runs):
    """Saved activations are the local batch's (the gathered weights are not counted as activations); with
    bf16 compute, fewer."""
    spec, _, options = CASES[name]
    half = train_losses(spec, rank=0, world=WORLD)["activation_bytes"]  # one process on rank 0's rows, unsharded
    if options.get("param_dtype") == "bfloat16":
        assert sharded_runs[0][name]["activation_bytes"] < 0.75 * half
    else:
        assert sharded_runs[0][name]["activation_bytes"] == pytest.approx(half, rel=0.02)


@pytest.mark.parametrize("name", ["none", "lora"])
def test_each_rank_holds_half_the_parameters_and_optimizer_state(name, sharded_runs):
    whole = train_losses(CASES[name][0])
    for rank in range(WORLD):
        shard = sharded_runs[rank][name]
        assert shard["param_bytes"] == pytest.approx(whole["param_bytes"] / WORLD, rel=0.05)
        assert shard["optimizer_bytes"] == pytest.approx(whole["optimizer_bytes"] / WORLD, rel=0.05)


# --- through the trainer (trainer=fsdp, two gloo processes launched by Lightning) ---------------------------

TWO_RANKS = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=8",
             "data.num_samples=64", "optimizer=adamw", "trainer.accelerator=cpu", "trainer.devices=2",
             "trainer.enable_progress_bar=false")
# skip_backward: a strategy with state of its own (its threshold window), which the checkpoint must keep
FSDP_RUN = (*TWO_RANKS, "strategy=[checkpoint,skip_backward]", "strategy.skip_backward.warmup_steps=1")


def cli_losses(run_dir) -> list[float]:
    import csv

    with open(run_dir / "memory.csv") as file:
        return [float(row["loss"]) for row in csv.DictReader(file)]


@pytest.mark.slow  # CI time: over 30 s on 2 cores
def test_fsdp_run_matches_ddp_reports_every_rank_and_resumes_exactly(tmp_path):
    from conftest import compose_config, read_report, run_cli
    from lowmem_train.cli import with_trainer_keywords
    from lowmem_train.errors import LowmemError
    from lowmem_train.training import validate_config

    runs = {"whole": ["trainer=fsdp", "trainer.max_steps=4"], "ddp": ["+trainer.strategy=ddp", "trainer.max_steps=4"],
            "first": ["trainer=fsdp", "trainer.max_steps=2"]}
    runs["resumed"] = ["trainer=fsdp", "trainer.max_steps=4", f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}"]
    results = {name: run_cli(*FSDP_RUN, *extra, f"run_dir={tmp_path / name}", cwd=tmp_path)
               for name, extra in runs.items()}
    for result in results.values():
        assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "first/checkpoints/step2.ckpt/meta.pt").exists()  # a sharded checkpoint: one directory
    with pytest.raises(LowmemError, match="is a sharded checkpoint"):  # the CLI's one line, before any process starts
        validate_config(compose_config(*with_trainer_keywords(
            [*FSDP_RUN, "+trainer.strategy=ddp", f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}"])))
    whole = cli_losses(tmp_path / "whole")
    assert whole == pytest.approx(cli_losses(tmp_path / "ddp"), abs=1e-5)
    assert cli_losses(tmp_path / "resumed") == pytest.approx(whole[2:], abs=1e-6)
    sharded, replicated = read_report(tmp_path / "whole"), read_report(tmp_path / "ddp")
    assert [r["rank"] for r in sharded["ranks"]] == [0, 1] and "memory_ranks.csv" in sharded["files"]
    for rank in sharded["ranks"]:
        for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):
            assert rank[key] == pytest.approx(replicated["ranks"][rank["rank"]][key] / 2, rel=0.02), key
        assert rank["activation_bytes"] == replicated["ranks"][rank["rank"]]["activation_bytes"]
    assert results["whole"].stdout.count("memory report") == 1 and "per rank (GiB)" in results["whole"].stdout
    logged = (tmp_path / "whole/csv").rglob("metrics.csv")
    assert any("rank1/param_bytes" in path.read_text() for path in logged)  # the logger has every rank's figures


def test_what_cannot_run_sharded_is_refused_in_one_line(tmp_path):
    from conftest import run_cli

    result = run_cli(*TWO_RANKS, "trainer=fsdp", "optimizer=galore", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("lowmem-train")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert "optimizer cannot run under trainer=fsdp: " in errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["optimizer=adamw8bit", "optimizer.backend=bitsandbytes"], "optimizer cannot run under trainer=fsdp: "),
    (["strategy=lora", "strategy.lora.quantize=nf4"], "strategy 'lora' cannot run under trainer=fsdp: "),
    (["trainer.strategy.param_dtype=bf16"], "trainer.strategy: param_dtype='bf16'; valid: float32, bfloat16"),
    (["strategy=zo_sgd"], "strategy 'zo_sgd' cannot run under trainer=fsdp: "),
])
def test_what_cannot_run_sharded_is_refused_before_the_processes_start(extra, message):
    """In this process, by the checks the CLI runs before it launches anything (it prints their one line)."""
    from conftest import compose_config
    from lowmem_train.cli import with_trainer_keywords
    from lowmem_train.errors import LowmemError
    from lowmem_train.training import validate_config

    with pytest.raises(LowmemError, match=re.escape(message)):
        validate_config(compose_config(*with_trainer_keywords([*TWO_RANKS, "trainer=fsdp", *extra])))


def test_slurm_launcher_asks_one_task_per_device_on_every_node():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lowmem_train.cli import CONFIG_DIR, CONFIG_NAME

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAME, overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=fsdp",
                                              "trainer.devices=4", "++trainer.num_nodes=2"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)


@pytest.mark.slow  # CI time: over 30 s on 2 cores
def test_submitit_local_sweep_runs_every_job_and_writes_the_summary(tmp_path):
    from conftest import run_cli

    sweep = tmp_path / "sweep"
    result = run_cli("-m", "hydra/launcher=submitit_local", "strategy=none,checkpoint", "trainer=debug",
                     "data.image_size=8", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (sweep / "sweep_summary.md").read_text()
    assert "| strategy=none |" in summary and "| strategy=checkpoint |" in summary
    assert all((sweep / job / "memory_report.json").exists() for job in ("0", "1"))


def test_torchrun_launches_the_ranks_and_needs_one_run_directory(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import read_report

    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node=2",
                str(Path(sys.executable).with_name("lowmem-train"))]
    args = [*FSDP_RUN, "trainer=fsdp", "trainer.max_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([*torchrun, *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["rank"] for r in read_report(tmp_path / "run")["ranks"]] == [0, 1]
    result = subprocess.run([*torchrun, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "lowmem-train: error: under torchrun every process must write into one run directory" in result.stderr


def test_step_in_backward_is_refused_under_ddp(tmp_path):
    """It would step each rank on its own gradient before DDP averages them (under FSDP2 it steps the shards
    after the reduce-scatter, so it runs there)."""
    from conftest import run_cli

    result = run_cli(*TWO_RANKS, "+trainer.strategy=ddp", "strategy=step_in_backward", "trainer.max_steps=1",
                     f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "strategy 'step_in_backward' would step on each rank's own gradient before DDP averages" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in available_strategies()
                                  if n != "none" and get_strategy_class(n)().sharding_problem() is None])
def test_every_strategy_trains_sharded_as_under_ddp(name, tmp_path):
    """The same run under trainer=fsdp and under DDP: the same losses (lossy ones within 2e-3: velora draws its
    projections per run) and the same saved activations; each rank holds half the parameters. step_in_backward,
    refused under DDP, is compared with plain sharded training instead."""
    from conftest import read_report, run_cli

    options = {**STRATEGY_SETTINGS[name]["options"], **TRAIN_OPTIONS.get(name, {})}
    chosen = [f"strategy={name}", *(f"strategy.{name}.{k}={v}" for k, v in options.items())]
    reference = ["trainer=fsdp"] if name == "step_in_backward" else [*chosen, "+trainer.strategy=ddp"]
    for kind, extra in (("fsdp", [*chosen, "trainer=fsdp"]), ("ddp", reference)):
        result = run_cli(*TWO_RANKS, "trainer.max_steps=3", *extra, f"run_dir={tmp_path / kind}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    sharded, replicated = cli_losses(tmp_path / "fsdp"), cli_losses(tmp_path / "ddp")
    assert sharded == pytest.approx(replicated, abs=1e-5 if get_strategy_class(name).exact else 2e-3)
    fsdp, ddp = read_report(tmp_path / "fsdp"), read_report(tmp_path / "ddp")
    assert fsdp["activation_bytes"] == pytest.approx(ddp["activation_bytes"], rel=0.05)
    if name != "step_in_backward":
        assert fsdp["ranks"][1]["param_bytes"] < 0.6 * ddp["ranks"][1]["param_bytes"]
    if name == "lora":  # rank 0 saves the whole adapters, gathered from the shards
        from safetensors.torch import load_file

        sharded, replicated = (load_file(tmp_path / kind / "adapter/adapter_model.safetensors") for kind in ("fsdp", "ddp"))
        assert sharded.keys() == replicated.keys() and all(torch.equal(sharded[k], replicated[k]) for k in sharded)
