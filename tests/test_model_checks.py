"""Models the causal-LM recipe cannot train are refused before the run: one line on stderr naming the key,
exit status 2, no run folder. And the offline advice keeps the user's strategies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import run_cli
from lowmem_train.hub import looks_local, offline_advice, strategy_overrides


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A BERT saved with save_pretrained (an encoder: is_decoder false), a directory holding only a GGUF file, a
    Llama config saved as a sequence classifier, and an encoder-decoder (T5) config."""
    from transformers import BertConfig, BertLMHeadModel, LlamaConfig, T5Config

    root = tmp_path_factory.mktemp("models")
    BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(root / "bert")
    (root / "gguf_only").mkdir()
    (root / "gguf_only" / "tiny.Q4_1.gguf").write_bytes(b"")
    LlamaConfig(architectures=["LlamaForSequenceClassification"]).save_pretrained(root / "classifier")
    T5Config().save_pretrained(root / "t5")
    return {path.name: path for path in root.iterdir()}


TINY = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic")


@pytest.mark.parametrize("args, message", [
    (["recipe=llama_finetune", "model.name_or_path={bert}"],
     "model.name_or_path={bert}: bert is a bidirectional encoder (is_decoder=false)"),
    (["recipe=llama_finetune", "model.name_or_path={t5}"], "model.name_or_path={t5}: t5 is an encoder-decoder model"),
    (["recipe=llama_finetune", "model.name_or_path={classifier}"],
     "its weights are a LlamaForSequenceClassification, which has no causal-LM head"),
    ([*TINY, "model.gguf_file=tiny.Q4_1.gguf"],
     "model.gguf_file=tiny.Q4_1.gguf needs model.name_or_path=<the directory holding it>"),
    (["recipe=llama_finetune", "model.name_or_path={gguf_only}"],
     "model.name_or_path={gguf_only} holds GGUF files and no config.json (tiny.Q4_1.gguf): name one with "
     "model.gguf_file=tiny.Q4_1.gguf (needs `pip install gguf`)"),
    (["recipe=llama_finetune", "model.name_or_path={gguf_only}/tiny.Q4_1.gguf"],
     "is a file; name its directory: model.name_or_path={gguf_only} model.gguf_file=tiny.Q4_1.gguf"),
    (["recipe=llama_finetune", "model.name_or_path=./modles/x"],
     "model.name_or_path=./modles/x: no such directory (the nearest existing folder is {cwd})"),
    (["recipe=llama_finetune", "model.name_or_path=/nonexistent/model"],
     "model.name_or_path=/nonexistent/model: no such directory (the nearest existing folder is /)"),
    ([*TINY, "model.config.num_attention_heads=3"],
     "model.config.num_attention_heads=3 does not divide hidden_size=64 into equal heads; valid: 2, 4, 8"),
    ([*TINY, "model.config.num_key_value_heads=3"], "model.config.num_key_value_heads=3 does not divide "
                                                    "num_attention_heads=4"),
    ([*TINY, "model.config.hidden_size=0"], "model.config.hidden_size must be a positive integer, got 0"),
    ([*TINY, "model.config.model_type=bert"], "model.config.model_type=bert: bert is a bidirectional encoder"),
])
def test_unbuildable_or_non_causal_models_are_one_line_and_leave_no_folder(tmp_path, args, message, model_dirs,
                                                                            monkeypatch, capfd):
    """``lowmem_train.cli.main`` in this process (what the console script calls), to keep the suite fast."""
    from lowmem_train import cli

    names = {**{name: str(path) for name, path in model_dirs.items()}, "cwd": str(tmp_path)}
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lowmem-train", *[a.format(**names) for a in args], f"hydra.run.dir={run_dir}"])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    lines = capfd.readouterr().err.splitlines()
    assert exit_info.value.code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("lowmem-train: error: "), lines
    assert message.format(**names) in lines[0], lines
    assert not run_dir.exists()


def test_offline_hub_model_advice_keeps_the_strategies_and_names_the_local_options(tmp_path):
    result = run_cli("recipe=llama_finetune", "strategy=[lora,checkpoint]", "strategy.lora.r=4",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    for part in ("model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct: cannot load it (the hub cannot be reached",
                 "model.name_or_path=<dir>", "model.gguf_file=<file>.gguf", "pip install gguf",
                 "lowmem-train recipe=llama_finetune model=llama_tiny data=synthetic 'strategy=[lora,checkpoint]' "
                 "strategy.lora.r=4"):
        assert part in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_strategy_overrides_give_back_the_choice_and_changed_options():
    assert strategy_overrides({"none": {}}) == []
    assert strategy_overrides({"checkpoint": {"targets": None, "exclude": ["layer1.*"]}}) == [
        "strategy=checkpoint", "'strategy.checkpoint.exclude=[layer1.*]'"]
    assert offline_advice(None).endswith(": lowmem-train recipe=llama_finetune model=llama_tiny data=synthetic")


def test_what_looks_like_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert all(map(looks_local, ["/x/y", "./x", "../x", "~/x", "a/b/c", "models/missing"]))
    assert not any(map(looks_local, ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"]))

