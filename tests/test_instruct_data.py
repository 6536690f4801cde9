"""Instruction and chat data for llama_finetune: responses trained, prompts masked, counts reported, cached."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import compose_config, read_report, run_cli
from lowmem_train.errors import ConfigError
from lowmem_train.text_data import ALPACA_PROMPT
from lowmem_train.training import build_recipe


def instruct_recipe(llm, data_file, *overrides):
    return build_recipe(compose_config("recipe=llama_finetune", f"model.name_or_path={llm.model_dir}", "data.path=json",
                                       f"data.data_files={data_file}", "data.seq_len=64", "data.batch_size=8", "model.dtype=float32",
                                       "data.val_fraction=0", *overrides))


def all_rows(recipe):
    loader, _ = recipe.build_dataloaders()
    batch = loader.collate_fn([loader.dataset[i] for i in range(len(loader.dataset))])  # every row, padded
    return loader, list(zip(batch["input_ids"], batch["labels"], batch["attention_mask"]))


def trained_text(tokenizer, ids, labels):
    return tokenizer.decode(ids[labels != -100])


def test_only_responses_are_targets_and_the_loss_is_their_mean(tiny_pretrained_llm):
    llm = tiny_pretrained_llm
    tokenizer = AutoTokenizer.from_pretrained(llm.model_dir)
    recipe = instruct_recipe(llm, llm.instruct_jsonl)
    loader, rows = all_rows(recipe)
    answers = {json.loads(line)["output"] for line in llm.instruct_jsonl.read_text().splitlines()}
    for ids, labels, mask in rows:
        response = trained_text(tokenizer, ids, labels).replace(" ", "")
        assert response.removesuffix("<|im_end|>") in {a.replace(" ", "") for a in answers}
        assert (labels[mask == 0] == -100).all()
    # the recipe's loss equals cross-entropy over the response targets alone, from the model's own logits
    model = recipe.build_model()
    batch = next(iter(loader))
    loss = recipe.forward(model, batch).mean_loss()
    logits = model.causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][targets != -100], targets[targets != -100])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    everything = torch.nn.functional.cross_entropy(logits[:, :-1][batch["attention_mask"][:, 1:] == 1],
                                                   batch["input_ids"][:, 1:][batch["attention_mask"][:, 1:] == 1])
    assert not torch.isclose(loss, everything)  # a leak of prompt tokens into the loss would show here


def test_chat_messages_train_every_assistant_turn_and_nothing_else(tiny_pretrained_llm):
    llm = tiny_pretrained_llm
    tokenizer = AutoTokenizer.from_pretrained(llm.model_dir)
    _, rows = all_rows(instruct_recipe(llm, llm.chat_jsonl, "data.seq_len=128"))
    first = json.loads(llm.chat_jsonl.read_text().splitlines()[0])["messages"]
    turns = [m["content"] for m in first if m["role"] == "assistant"]
    trained = [trained_text(tokenizer, ids, labels).replace(" ", "") for ids, labels, _ in rows]
    expected = "".join(f"{t}<|im_end|>" for t in turns).replace(" ", "")
    assert expected in trained
    assert not any("user" in text or "system" in text or "<|im_start|>" in text for text in trained)


def test_truncation_and_dropped_examples_are_counted(tiny_pretrained_llm):
    llm = tiny_pretrained_llm
    recipe = instruct_recipe(llm, llm.instruct_jsonl, "data.seq_len=16")
    _, rows = all_rows(recipe)
    counts = recipe.data_report()
    assert counts["examples"] == 64 and counts["truncated"] > 0
    assert counts["rows"] == counts["examples"] - counts["dropped"] == len(rows)
    assert all(len(ids) <= 16 and (labels[1:] != -100).any() for ids, labels, _ in rows)
    short = instruct_recipe(llm, llm.instruct_jsonl, "data.seq_len=12")
    short.build_dataloaders()
    assert short.data_report()["dropped"] > 0  # the response starts after token 10: nothing left to train
    assert set(short.data_report()["dropped_by_reason"]) == {"no_response_token"}


def test_packing_joins_whole_examples_and_keeps_every_target(tiny_pretrained_llm):
    llm = tiny_pretrained_llm
    plain, packed = (instruct_recipe(llm, llm.instruct_jsonl, "data.seq_len=128", f"data.packing={p}")
                     for p in ("false", "true"))
    _, plain_rows = all_rows(plain)
    _, packed_rows = all_rows(packed)
    assert len(packed_rows) < len(plain_rows) / 3
    assert all(int(mask.sum()) <= 128 for _, _, mask in packed_rows)
    assert packed.data_report()["trained_tokens"] == plain.data_report()["trained_tokens"]
    assert sum(int((labels != -100).sum()) for _, labels, _ in packed_rows) == \
        sum(int((labels != -100).sum()) for _, labels, _ in plain_rows)


def test_raw_text_blocks_equal_tokenising_text_by_text(tiny_llama_dir, corpus_file):
    recipe = build_recipe(compose_config("recipe=llama_finetune", f"model.name_or_path={tiny_llama_dir}", "data=text",
                                         "data.path=json", f"data.data_files={corpus_file}", "data.seq_len=16",
                                         "data.val_fraction=0", "data.batch_size=1000"))
    loader, _ = recipe.build_dataloaders()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = []
    for line in corpus_file.read_text().splitlines():
        text = json.loads(line)["text"]
        if text.strip():
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    expected = torch.tensor(ids[: len(ids) // 16 * 16]).view(-1, 16)
    blocks = torch.stack([loader.dataset[i]["input_ids"] for i in range(len(loader.dataset))])
    assert torch.equal(blocks, expected)
    assert recipe.data_report()["rows"] == len(expected)


def test_tokenisation_is_cached_and_runs_in_processes(tiny_pretrained_llm, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    llm = tiny_pretrained_llm
    data_file = tmp_path / "train.jsonl"
    data_file.write_text(llm.instruct_jsonl.read_text())
    instruct_recipe(llm, data_file).build_dataloaders()
    cached = sorted(Path(tmp_path).rglob("cache-*.arrow"))
    assert cached
    again = instruct_recipe(llm, data_file)
    again.build_dataloaders()
    assert sorted(Path(tmp_path).rglob("cache-*.arrow")) == cached  # the second run reads the cache
    parallel = instruct_recipe(llm, data_file, "data.num_proc=2", "data.seq_len=60")
    parallel.build_dataloaders()
    assert parallel.data_report()["rows"] == again.data_report()["rows"]


@pytest.mark.parametrize("override,message", [
    ("data.num_proc=0", "data.num_proc must be an integer >= 1, got 0"),
    ("data.instruction_field=question", "data.instruction_field=question and data.output_field=output: no such columns"),
])
def test_bad_instruct_settings_are_one_line_errors(tiny_pretrained_llm, override, message):
    llm = tiny_pretrained_llm
    with pytest.raises(ConfigError, match=message):
        instruct_recipe(llm, llm.instruct_jsonl, override).build_dataloaders()


def test_messages_without_a_chat_template_are_refused(tiny_llama_dir, tiny_pretrained_llm):
    recipe = build_recipe(compose_config("recipe=llama_finetune", f"model.name_or_path={tiny_llama_dir}", "data.path=json",
                                         f"data.data_files={tiny_pretrained_llm.chat_jsonl}", "data.seq_len=64"))
    with pytest.raises(ConfigError, match="the tokenizer has no chat template"):
        recipe.build_dataloaders()


def test_instruction_data_without_a_chat_template_uses_an_alpaca_prompt(tiny_llama_dir, tiny_pretrained_llm):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)  # no chat template; the model's 256 positions fit a row
    recipe = build_recipe(compose_config("recipe=llama_finetune", f"model.name_or_path={tiny_pretrained_llm.model_dir}",
                                         f"data.tokenizer={tiny_llama_dir}", "data.path=json",
                                         f"data.data_files={tiny_pretrained_llm.instruct_jsonl}", "data.seq_len=256",
                                         "data.val_fraction=0"))
    loader, _ = recipe.build_dataloaders()
    row, first = loader.dataset[0], json.loads(tiny_pretrained_llm.instruct_jsonl.read_text().splitlines()[0])
    prompt = ALPACA_PROMPT.format(paired=", paired with an input that provides further context" if first["input"] else "",
                                  instruction=first["instruction"],
                                  input=f"### Input:\n{first['input']}\n\n" if first["input"] else "")
    assert row["input_ids"][row["labels"] == -100].tolist() == tokenizer(prompt)["input_ids"]
    assert row["labels"][-1] == tokenizer.eos_token_id  # the response ends with EOS, trained


def test_offline_hub_corpus_says_how_to_use_a_local_file(tiny_pretrained_llm, tmp_path):
    result = run_cli("recipe=llama_finetune", f"model.name_or_path={tiny_pretrained_llm.model_dir}", "data.seq_len=128",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    assert "data.path=yahma/alpaca-cleaned" in lines[0] and "data.data_files=<your.jsonl>" in lines[0]


def test_cli_fine_tunes_on_instruction_jsonl_and_reports_the_counts(tiny_pretrained_llm, tmp_path):
    llm = tiny_pretrained_llm
    run_dir = tmp_path / "run"
    result = run_cli("recipe=llama_finetune", f"model.name_or_path={llm.model_dir}", "model.dtype=float32",
                     "data.path=json", f"data.data_files={llm.instruct_jsonl}", "data.seq_len=64", "data.batch_size=8",
                     "trainer.max_epochs=6", "optimizer.lr=3e-3", "logger=csv", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = read_report(run_dir)
    assert report["data"]["source"] == "instruct" and report["data"]["examples"] == 64
    assert "data                 source=instruct, examples=64" in result.stdout
    losses = [float(line.split(",")[1]) for line in (run_dir / "memory.csv").read_text().splitlines()[1:]]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert os.path.isfile(run_dir / "checkpoints" / "last.ckpt")
