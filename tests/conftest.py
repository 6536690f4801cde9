"""Shared fixtures: real configs composed with Hydra, small files the tests write, the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from llm_fixtures import tiny_pretrained_llm  # noqa: F401  (a fixture)
from lowmem_train.cli import CONFIG_DIR, CONFIG_NAME

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf_datasets_"))  # tokenised corpora, not in ~
CORPUS = (
    "Memory is the wall that training runs into first. Activations saved for backward grow with batch, "
    "sequence and depth, while parameters stay fixed. Checkpointing recomputes, compression quantizes, "
    "and reversible layers rebuild what they need from their outputs. "
) * 6


def compose_config(*overrides: str, run_dir: Path | None = None):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAME, overrides=list(overrides))
    if run_dir is not None:
        cfg.run_dir = str(run_dir)
    return cfg


def run_cli(*args: str, cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``lowmem-train ARGS`` as a user runs it (the installed console script), in ``cwd``; ``env`` adds to
    or replaces variables of this process's environment."""
    script = Path(sys.executable).with_name("lowmem-train")
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "memory_report.json").read_text())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama and a character-level BPE tokenizer saved with save_pretrained, as a user's local copy."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from tiny_models import tiny_llama_config

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in CORPUS.split(". ")))
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """An ImageFolder tree with two classes of small solid-colour images, train/ and val/."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, count in (("train", 4), ("val", 2)):
        for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 40), tuple(c + 5 * i for c in colour)).save(folder / f"{i}.png")
    return root
