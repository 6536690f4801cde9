"""Recipes load real data: digits from scikit-learn, text through datasets + the model's tokenizer, ImageFolder."""

import pytest
import torch

from conftest import compose_config
from lowmem_train import ConfigError
from lowmem_train.training import build_recipe


def test_digits_are_real_images_split_into_train_and_validation():
    recipe = build_recipe(compose_config())
    train, val = recipe.build_dataloaders()
    assert len(train.dataset) + len(val.dataset) == 1797
    images, labels = next(iter(train))
    assert images.shape == (64, 3, 16, 16) and set(labels.tolist()) <= set(range(10))
    assert -1.0 <= images.min() and images.max() <= 1.0


def test_llama_loads_a_local_model_and_tokenizes_local_json(tiny_llama_dir, corpus_file):
    recipe = build_recipe(compose_config("recipe=llama_finetune", f"model.name_or_path={tiny_llama_dir}", "data=text",
                                         "data.path=json",
                                         f"data.data_files={corpus_file}", "data.seq_len=16", "data.val_fraction=0.2"))
    model = recipe.build_model()
    assert type(model.causal_lm).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 32
    train, val = recipe.build_dataloaders()
    batch = next(iter(train))
    ids = batch["input_ids"]
    assert ids.shape == (8, 16) and ids.max() < model.config.vocab_size and torch.equal(batch["labels"], ids)
    assert len(val.dataset) > 0
    output = recipe.forward(model, batch)
    assert output.num_tokens == 8 * 15 and output.per_sample_loss.shape == (8,) and output.logits is None
    assert output.per_sample_count.tolist() == [15] * 8


def test_imagenet_recipe_reads_an_image_folder(image_folder):
    recipe = build_recipe(compose_config("recipe=imagenet_resnet", f"data.root={image_folder}", "model.num_classes=2",
                                         "data.image_size=32", "data.batch_size=4", "data.num_workers=0"))
    train, val = recipe.build_dataloaders()
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 32, 32) and len(val.dataset) == 4
    assert recipe.build_model().fc.out_features == 2


@pytest.mark.parametrize("overrides, message", [
    (["data=cifar10", "data.root=/nonexistent", "data.download=false"], "data.root=/nonexistent has no cifar-10-batches-py"),
    (["recipe=imagenet_resnet", "data.root=/nonexistent"], "data.root=/nonexistent has no train/ folder"),
    (["recipe=llama_finetune", "model=llama_tiny", "data.path=json", "data.data_files=/missing.jsonl"],
     "data.data_files: /missing.jsonl does not exist"),
    (["recipe=llama_finetune", "model.name_or_path=/missing/model"], "model.name_or_path=/missing/model: no such directory"),
])
def test_missing_data_or_model_gives_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):  # at config check or at load
        recipe = build_recipe(compose_config(*overrides))
        recipe.build_model()
        recipe.build_dataloaders()


def test_data_source_must_fit_the_recipe():
    with pytest.raises(ConfigError, match="data=text is not a data source of recipe cifar_resnet; valid: digits"):
        build_recipe(compose_config("data=text"))


def test_synthetic_tokens_use_the_model_vocabulary():
    recipe = build_recipe(compose_config("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=32"))
    ids = next(iter(recipe.build_dataloaders()[0]))["input_ids"]
    assert ids.shape == (32, 32) and ids.max() < 512 and ids.dtype == torch.long
