"""The data a recipe trains on is checked against what training needs (issue 31): rows that cannot train are
dropped and said, lengths beyond the model's positions, mismatched image classes and unreadable files are
refused before anything runs, and a validation split too small to mean anything is said."""

import json
import sys
from pathlib import Path

import datasets
import pytest
from PIL import Image

from conftest import compose_config
from lowmem_train.errors import ConfigError
from lowmem_train.training import build_recipe, validate_config

GOOD = {"instruction": "What colour is the sky?", "input": "", "output": "The sky is blue."}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def instruct_recipe(llm, data_file, *overrides):
    return build_recipe(compose_config("recipe=llama_finetune", f"model.name_or_path={llm.model_dir}", "data.path=json",
                                       f"data.data_files={data_file}", "data.seq_len=64", "data.val_fraction=0",
                                       *overrides))


def refused_in_cli(args, tmp_path, monkeypatch, capfd, *, sweep: bool = False) -> str:
    """``lowmem-train ARGS`` through ``lowmem_train.cli.main`` in this process (what the console script runs):
    exit status 2, exactly one stderr line, and no run (or sweep) folder left behind; returns that line."""
    from lowmem_train import cli

    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lowmem-train", *args, f"hydra.{'sweep' if sweep else 'run'}.dir={run_dir}"])
    capfd.readouterr()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # as the console script has them (off before datasets is imported)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        if bars:
            datasets.enable_progress_bars()
    lines = capfd.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("lowmem-train: error: "), lines
    assert not run_dir.exists() or not any(run_dir.iterdir())  # nothing written, nothing trained
    return lines[0]


# --- rows that cannot train ---------------------------------------------------------------------------------


def test_rows_that_cannot_train_are_dropped_counted_by_reason_and_said_once(tiny_pretrained_llm, tmp_path, capsys):
    rows = [GOOD] * 5 + [{"instruction": "No answer here."}, {**GOOD, "output": ""}, {**GOOD, "output": "  \n"},
                         {**GOOD, "instruction": "Why? " * 80}]  # its response starts after data.seq_len
    recipe = instruct_recipe(tiny_pretrained_llm, write_jsonl(tmp_path / "train.jsonl", rows))
    capsys.readouterr()
    loader, _ = recipe.build_dataloaders()
    report = recipe.data_report()
    assert report["examples"] == 9 and report["dropped"] == 4 and report["rows"] == len(loader.dataset) == 5
    assert report["dropped_by_reason"] == {"no_output": 1, "empty_output": 2, "no_response_token": 1}
    assert capsys.readouterr().out.splitlines() == [
        "data: dropped 4 of 9 rows: 1 without an output, 2 with an empty output, "
        "1 with no response token within data.seq_len=64"]


def test_chat_rows_without_an_assistant_turn_are_dropped(tiny_pretrained_llm, tmp_path, capsys):
    ask = {"role": "user", "content": "What colour is the sky?"}
    rows = [{"messages": [ask, {"role": "assistant", "content": "Blue."}]}] * 3 + [
        {"messages": [ask]}, {"messages": [ask, {"role": "assistant", "content": " "}]}]
    recipe = instruct_recipe(tiny_pretrained_llm, write_jsonl(tmp_path / "chat.jsonl", rows))
    capsys.readouterr()
    recipe.build_dataloaders()
    assert recipe.data_report()["dropped_by_reason"] == {"empty_output": 1, "no_assistant_turn": 1}
    assert capsys.readouterr().out.splitlines() == [
        "data: dropped 2 of 5 rows: 1 with an empty output, 1 with no assistant turn"]


def test_clean_data_prints_nothing_and_reports_no_drops(tiny_pretrained_llm, capsys):
    recipe = instruct_recipe(tiny_pretrained_llm, tiny_pretrained_llm.instruct_jsonl)
    capsys.readouterr()
    recipe.build_dataloaders()
    assert recipe.data_report()["dropped"] == 0 and recipe.data_report()["dropped_by_reason"] == {}
    assert "data:" not in capsys.readouterr().out


def test_no_row_that_can_train_is_one_line_naming_the_file_and_why(tiny_pretrained_llm, tmp_path, monkeypatch, capfd):
    """Found once the rows are tokenised, inside the run: its folder is removed again."""
    data_file = write_jsonl(tmp_path / "empty_answers.jsonl", [{**GOOD, "output": ""}] * 3 + [{"instruction": "x"}])
    line = refused_in_cli(["recipe=llama_finetune", f"model.name_or_path={tiny_pretrained_llm.model_dir}",
                           "data.path=json", f"data.data_files={data_file}", "data.seq_len=64"], tmp_path, monkeypatch, capfd)
    assert line == (f"lowmem-train: error: data.data_files={data_file}: none of its 4 rows can train (1 without an "
                    "output, 3 with an empty output); each row needs a non-empty output with tokens within "
                    "data.seq_len=64")


# --- lengths the model cannot take ---------------------------------------------------------------------------


def test_seq_len_beyond_the_models_positions_is_refused_before_the_run(tiny_pretrained_llm, tmp_path, monkeypatch,
                                                                        capfd):
    llm = tiny_pretrained_llm  # max_position_embeddings=256
    line = refused_in_cli(["recipe=llama_finetune", f"model.name_or_path={llm.model_dir}", "data.path=json",
                           f"data.data_files={llm.instruct_jsonl}", "data.packing=true", "data.seq_len=100000"],
                          tmp_path, monkeypatch, capfd)
    assert line.endswith(f"data.seq_len=100000 is more than the 256 positions of the model (model.name_or_path="
                         f"{llm.model_dir}: max_position_embeddings=256); set data.seq_len=256 or less")


@pytest.mark.parametrize("model,limit", [("llama_tiny", 1024), ("llama_1b", 131072)])
def test_seq_len_beyond_a_random_init_models_positions_fails_the_config_check(model, limit):
    with pytest.raises(ConfigError, match=f"data.seq_len={limit + 1} is more than the {limit} positions of the model "
                                          f"\\(model.config: max_position_embeddings={limit}\\)"):
        validate_config(compose_config("recipe=llama_finetune", f"model={model}", "data=synthetic",
                                       f"data.seq_len={limit + 1}"))
    validate_config(compose_config("recipe=llama_finetune", f"model={model}", "data=synthetic", f"data.seq_len={limit}"))


def test_seq_len_below_two_in_a_sweep_is_refused_before_any_job_runs(tmp_path, monkeypatch, capfd):
    line = refused_in_cli(["-m", "recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=64,1",
                           "trainer=debug"], tmp_path, monkeypatch, capfd, sweep=True)
    assert line == "lowmem-train: error: data.seq_len must be an integer >= 2, got 1"  # the seq_len=64 job did not run


# --- image folders -------------------------------------------------------------------------------------------


def image_tree(root: Path, classes: dict[str, list[str]]) -> Path:
    for split, names in classes.items():
        for name in names:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (len(name) * 20, 40, 90)).save(root / split / name / "0.png")
    return root


def test_validation_classes_absent_from_training_are_refused(tmp_path, monkeypatch, capfd):
    root = image_tree(tmp_path / "images", {"train": ["blue", "red"], "val": ["blue", "horse", "red"]})
    line = refused_in_cli(["recipe=imagenet_resnet", "model.arch=resnet18", f"data.root={root}", "data.image_size=32",
                           "data.num_workers=0", "trainer=debug"], tmp_path, monkeypatch, capfd)
    assert line.endswith(f"data.root={root}: the validation classes differ from the training classes: val/ has horse "
                         "(not in train/); give val/ the same class folders as train/")


def test_validation_missing_a_training_class_is_refused(tmp_path):
    root = image_tree(tmp_path / "images", {"train": ["blue", "green", "red"], "val": ["blue", "red"]})
    recipe = build_recipe(compose_config("recipe=imagenet_resnet", f"data.root={root}", "data.num_workers=0"))
    with pytest.raises(ConfigError, match="val/ lacks green;"):
        recipe.build_dataloaders()


# --- validation split ----------------------------------------------------------------------------------------


def test_a_tiny_validation_split_is_said_and_val_rows_holds_out_an_exact_number(tiny_pretrained_llm, capsys):
    llm = tiny_pretrained_llm  # 64 instruction rows
    capsys.readouterr()
    train, val = instruct_recipe(llm, llm.instruct_jsonl, "data.val_fraction=0.02").build_dataloaders()
    assert len(val.dataset) == 1 and len(train.dataset) == 63
    assert capsys.readouterr().out.splitlines() == [
        "data: validation holds only 1 of 64 rows (data.val_fraction=0.02), too few for a meaningful validation "
        "metric; set data.val_rows=N (N >= 8) or a larger data.val_fraction"]
    train, val = instruct_recipe(llm, llm.instruct_jsonl, "data.val_fraction=0.02", "data.val_rows=10").build_dataloaders()
    assert (len(train.dataset), len(val.dataset)) == (54, 10) and "data:" not in capsys.readouterr().out
    for overrides in (["data.val_fraction=0"], ["data.val_fraction=0.5", "data.val_rows=0"]):
        assert instruct_recipe(llm, llm.instruct_jsonl, *overrides).build_dataloaders()[1] is None
    assert "data:" not in capsys.readouterr().out


def test_a_fraction_that_holds_out_nothing_is_said(tiny_pretrained_llm, capsys):
    llm = tiny_pretrained_llm
    capsys.readouterr()
    assert instruct_recipe(llm, llm.instruct_jsonl, "data.val_fraction=0.005").build_dataloaders()[1] is None
    assert capsys.readouterr().out.splitlines() == [
        "data: data.val_fraction=0.005 of 64 rows holds out none: no validation; for one set data.val_rows=N "
        "(N >= 8) or a larger data.val_fraction"]


def test_val_rows_that_leave_nothing_to_train_are_refused(tiny_pretrained_llm):
    with pytest.raises(ConfigError, match="data.val_rows=64 leaves no training rows: the data has 64 rows"):
        instruct_recipe(tiny_pretrained_llm, tiny_pretrained_llm.instruct_jsonl, "data.val_rows=64").build_dataloaders()


@pytest.mark.parametrize("override,message", [
    ("data.val_rows=-1", "data.val_rows must be an integer >= 0, got -1"),
    ("data.val_fraction=1.0", "data.val_fraction must be in [0, 1), got 1.0"),
    ("data.seq_len=1", "data.seq_len must be an integer >= 2, got 1"),
])
def test_bad_split_and_length_values_fail_the_config_check(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("(", "\\(").replace(")", "\\)")):
        validate_config(compose_config("recipe=llama_finetune", "model=llama_tiny", "data=text", override))


# --- unreadable files ----------------------------------------------------------------------------------------


def test_a_jsonl_that_is_not_utf8_names_the_file_and_line(tiny_pretrained_llm, tmp_path, monkeypatch, capfd):
    data_file = tmp_path / "latin1.jsonl"
    data_file.write_bytes((json.dumps(GOOD) + "\n").encode() * 2 + '{"instruction": "caf\u00e9", "output": "x"}\n'.encode("latin-1"))
    line = refused_in_cli(["recipe=llama_finetune", f"model.name_or_path={tiny_pretrained_llm.model_dir}",
                           "data.path=json", f"data.data_files={data_file}", "data.seq_len=64"], tmp_path, monkeypatch, capfd)
    assert line.endswith(f"data.data_files: {data_file} line 3 is not UTF-8 (byte 0xe9 at column 21); save the file as UTF-8")


@pytest.mark.parametrize("bad_line,problem", [
    ('{"instruction": "a", "output": }', "line 2 is not valid JSON (Expecting value, column 32)"),
    ('["a", "b"]', "line 2 is not a JSON object (one {...} per line)"),
])
def test_a_malformed_jsonl_names_the_file_and_line(tiny_pretrained_llm, tmp_path, bad_line, problem):
    data_file = tmp_path / "bad.jsonl"
    data_file.write_text(json.dumps(GOOD) + "\n" + bad_line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(ConfigError) as error:
        instruct_recipe(tiny_pretrained_llm, data_file).build_dataloaders()
    assert str(error.value) == f"data.data_files: {data_file} {problem}"
