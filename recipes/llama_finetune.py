"""Causal-LM fine-tuning of a Hugging Face model (Llama and any ``AutoModelForCausalLM``).

    lowmem-train recipe=llama_finetune                                  # SmolLM2-135M-Instruct on alpaca-cleaned
    lowmem-train recipe=llama_finetune data.path=json data.data_files=train.jsonl     # your instruction JSONL
    lowmem-train recipe=llama_finetune data=text                        # raw text: wikitext-2
    lowmem-train recipe=llama_finetune model=llama_tiny data=synthetic  # random-init tiny model, no downloads

Instruction/chat examples train on the responses only (prompt tokens labelled -100); raw text is
concatenated and cut into ``data.seq_len`` blocks (``lowmem_train/text_data.py``). Batches are dicts of
``input_ids``, ``labels`` and ``attention_mask``; the loss is next-token cross-entropy, computed inside the
model by its loss head (``CausalLMWithLossHead``), in training and validation alike.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from torch import nn

from lowmem_train.causal_lm import (CausalLMWithLossHead, causal_lm_of, decoder_problem, greedy_answer,
                                    record_source, size_problem, unsupported_reason)
from lowmem_train.data import make_loader, split, synthetic_tokens
from lowmem_train.errors import ConfigError, one_line
from lowmem_train.hub import (hub_reachable, is_local, looks_local, nearest_existing_parent, offline_advice,
                              run_strategy)
from lowmem_train.recipe import Recipe, StepOutput
from lowmem_train.text_data import (PadToLongest, TokenRows, check_data_files, instruct_rows, load_corpus,
                                     load_tokenizer, pad_id, text_rows)


class LlamaFinetune(Recipe):
    name = "llama_finetune"
    data_sources = ("instruct", "text", "synthetic")
    validation_metric = "val/loss"

    def __init__(self, model, data):
        super().__init__(model, data)
        self.check_model()
        if data.name != "synthetic":
            check_data_files(data)
        self.check_seq_len()

    def build_model(self) -> nn.Module:
        causal_lm = self.build_causal_lm()
        try:
            return CausalLMWithLossHead(causal_lm)
        except ValueError as exc:
            raise ConfigError(f"recipe {self.name}: {exc}") from None

    def build_untrained_model(self) -> nn.Module:
        """From the config alone (``model.config``, or ``config.json``/GGUF header of ``model.name_or_path``)."""
        from transformers import AutoModelForCausalLM

        return CausalLMWithLossHead(AutoModelForCausalLM.from_config(self.model_config(), dtype=self.weights_dtype()))

    def shape_batch(self) -> dict:
        """Full rows of ``data.seq_len`` tokens and no padding: the most a batch holds (a mask of all ones is
        what the model leaves out anyway)."""
        ids = torch.randint(0, self.model_config().vocab_size, (int(self.data_cfg.batch_size), int(self.data_cfg.seq_len)))
        return {"input_ids": ids, "labels": ids.clone()}

    def build_causal_lm(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        path = self.model_cfg.get("name_or_path")
        dtype = self.weights_dtype()
        if path:
            offline = not is_local(path) and not hub_reachable()
            try:
                causal_lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **self.gguf())
            except (OSError, ValueError) as exc:  # ValueError: a directory without a model config
                raise self.unloadable(exc, offline) from None
            record_source(causal_lm, path, self.model_cfg.get("gguf_file"), dtype)
            return without_gguf_quantizer(causal_lm) if self.model_cfg.get("gguf_file") else causal_lm
        return AutoModelForCausalLM.from_config(self.model_config(), dtype=dtype)

    def weights_dtype(self) -> torch.dtype:
        dtype = self.model_cfg.get("dtype") or "float32"  # a Dtype of the model schema (its valid choices)
        return getattr(torch, getattr(dtype, "value", dtype))

    def unloadable(self, exc: Exception, offline: bool) -> ConfigError:
        path = self.model_cfg.name_or_path
        if is_local(path):
            return ConfigError(f"model.name_or_path={path}: cannot load it ({one_line(exc)}); it takes a directory "
                               "written by save_pretrained (config.json), or one holding a GGUF file named by "
                               "model.gguf_file=<file>")
        reason = "the hub cannot be reached and it is not in the local cache" if offline else one_line(exc)
        return ConfigError(f"model.name_or_path={path}: cannot load it ({reason}); offline, use "
                           f"{offline_advice(self.run_strategy)}")

    def check_model(self) -> None:
        """Refuse, before anything is written, a model that cannot be built or is no causal decoder, naming the
        key: a mistyped local path, a GGUF file not named or not there, an encoder (BERT), sizes that do not fit."""
        self.run_strategy = run_strategy()  # kept in the offline advice
        path, gguf_file = self.model_cfg.get("name_or_path"), self.model_cfg.get("gguf_file")
        if not path:
            if gguf_file:
                raise ConfigError(f"model.gguf_file={gguf_file} needs model.name_or_path=<the directory holding it>; "
                                  "this model (model.config, random init) has none")
            self.model_config()
            return
        if not is_local(path):
            if looks_local(path):
                raise ConfigError(f"model.name_or_path={path}: no such directory (the nearest existing folder is "
                                  f"{nearest_existing_parent(path)}); a hub id is <org>/<name>")
        elif os.path.isfile(os.path.expanduser(path)):
            folder, name = os.path.split(path)
            gguf_key = f" model.gguf_file={name}" if name.endswith(".gguf") else ""
            raise ConfigError(f"model.name_or_path={path} is a file; name its directory: "
                              f"model.name_or_path={folder or '.'}{gguf_key}")
        elif not gguf_file and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            ggufs = sorted(p.name for p in Path(os.path.expanduser(path)).glob("*.gguf"))
            if ggufs:
                raise ConfigError(f"model.name_or_path={path} holds GGUF files and no config.json "
                                  f"({', '.join(ggufs)}): name one with model.gguf_file={ggufs[0]} (needs `pip install "
                                  "gguf`)")
        self.gguf()
        problem = decoder_problem(self.model_config())
        if problem:
            raise ConfigError(f"model.name_or_path={path}: {problem}; recipe {self.name} trains causal decoders "
                              "(Llama, Qwen, Mistral, GPT-2, ...)")

    def gguf(self) -> dict:
        """``gguf_file=`` for transformers when the model is a GGUF file inside ``model.name_or_path``."""
        gguf_file = self.model_cfg.get("gguf_file")
        if not gguf_file:
            return {}
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(f"model.gguf_file={gguf_file} needs the gguf package: pip install gguf")
        path = os.path.join(os.path.expanduser(self.model_cfg.name_or_path), gguf_file)
        if is_local(self.model_cfg.name_or_path) and not os.path.isfile(path):
            raise ConfigError(f"model.gguf_file={gguf_file}: no such file in {self.model_cfg.name_or_path}")
        return {"gguf_file": gguf_file}

    def model_config(self):
        """The transformers config: from ``model.name_or_path`` (read once per process), or built from
        ``model.config`` (random init), checked to build a causal LM."""
        from transformers import AutoConfig, AutoModelForCausalLM

        path = self.model_cfg.get("name_or_path")
        if path:
            offline = not is_local(path) and not hub_reachable()  # offline: fail at once instead of retrying
            try:
                return cached_config(path, self.model_cfg.get("gguf_file"), local_files_only=offline)
            except (OSError, ValueError) as exc:
                raise self.unloadable(exc, offline) from None
        settings = self.model_cfg.get("config")
        if not settings:
            raise ConfigError("model.name_or_path or model.config is required by recipe llama_finetune")
        settings = OmegaConf.to_container(settings, resolve=True)
        kind = settings.pop("model_type", "llama")
        check_sizes(SimpleNamespace(**settings), settings)  # before transformers' own, less telling, validation
        try:
            config = AutoConfig.for_model(kind, **settings)
        except Exception as exc:  # noqa: BLE001 -- transformers validates configs with several exception types
            raise ConfigError(f"model.config: {one_line(exc)}") from None
        check_sizes(config, settings)  # with the defaults of the keys not given
        problem = decoder_problem(config)
        if problem:
            raise ConfigError(f"model.config.model_type={kind}: {problem}")
        try:
            with torch.device("meta"):  # what the constructor refuses, found without allocating the weights
                problem = unsupported_reason(AutoModelForCausalLM.from_config(config))
        except Exception as exc:  # noqa: BLE001 -- transformers raises many types for a config it cannot build
            raise ConfigError(f"model.config: {one_line(exc)}") from None
        if problem:
            raise ConfigError(f"model.config: {problem}")
        return config

    def check_seq_len(self) -> None:
        """``data.seq_len`` within the model's positions (``max_position_embeddings``), else one line naming both
        and the key to change (rows, packed ones too, are at most ``seq_len`` tokens). The model config is known
        here: ``check_model`` has read it (a hub id that cannot be reached is refused there)."""
        limit = max_positions(self.model_config())
        seq_len = int(self.data_cfg.seq_len)
        if limit is not None and seq_len > limit:
            path = self.model_cfg.get("name_or_path")
            model = f"model.name_or_path={path}" if path else "model.config"
            raise ConfigError(f"data.seq_len={seq_len} is more than the {limit} positions of the model ({model}: "
                              f"max_position_embeddings={limit}); set data.seq_len={limit} or less")

    def build_dataloaders(self):
        data = self.data_cfg
        if data.name == "synthetic":
            ids = synthetic_tokens(int(data.num_samples), int(data.seq_len), self.model_config().vocab_size,
                                   int(data.seed)).tensors[0]
            rows, collate = TokenRows(ids, ids), PadToLongest(pad_id=0)
            self.data_counts = {"source": "synthetic", "rows": len(ids), "tokens": ids.numel()}
            return make_loader(rows, data, train=True, collate_fn=collate), None
        tokenizer = load_tokenizer(data, self.model_cfg)
        corpus = load_corpus(data)
        make_rows = instruct_rows if data.name == "instruct" else text_rows
        rows, self.data_counts = make_rows(corpus, tokenizer, data)
        collate = PadToLongest(pad_id(tokenizer))
        train, val = split(rows, data)
        return (make_loader(train, data, train=True, collate_fn=collate),
                None if val is None else make_loader(val, data, train=False, collate_fn=collate))

    def data_report(self) -> dict:
        return getattr(self, "data_counts", {})

    def tokenizer(self):
        """The run's tokenizer (``data.tokenizer``, else the model's own), loaded once."""
        if getattr(self, "loaded_tokenizer", None) is None:
            self.loaded_tokenizer = load_tokenizer(self.data_cfg, self.model_cfg)
        return self.loaded_tokenizer

    def generate(self, model: nn.Module, prompts: list[str]) -> list[str]:
        causal_lm = causal_lm_of(model) or model
        return [greedy_answer(causal_lm, self.tokenizer(), prompt) for prompt in prompts]

    def export(self, model: nn.Module, directory: Path) -> None:
        """A Hugging Face model directory that ``AutoModelForCausalLM.from_pretrained`` reads as it is, in the
        trained dtype, with the tokenizer where the run has one (a GGUF model is written as safetensors)."""
        causal_lm = causal_lm_of(model)
        if causal_lm is None or hasattr(causal_lm, "peft_config"):
            raise ConfigError(f"recipe {self.name}: the trained model carries adapters (strategy lora), which are "
                              "saved in <run_dir>/adapter; strategy.lora.save_merged=true writes a merged model")
        causal_lm.save_pretrained(directory)
        if self.data_cfg.get("tokenizer") or self.model_cfg.get("name_or_path"):
            self.tokenizer().save_pretrained(directory)

    def forward(self, model: nn.Module, batch) -> StepOutput:
        output = model(**batch)
        return StepOutput(output.per_sample_loss, output.per_sample_count, num_samples=batch["input_ids"].shape[0],
                          num_tokens=output.per_sample_count.sum(), sample_stats=output.sample_stats)

    def validation_step(self, model: nn.Module, batch):
        output = self.forward(model, batch)
        return {"val/loss": output.mean_loss()}, output.num_samples


def max_positions(config) -> int | None:
    """The most token positions a transformers config takes (None where it names no limit)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@cache
def cached_config(path: str, gguf_file: str | None, local_files_only: bool):
    """A transformers config, read once per process (a GGUF file's takes seconds); failures are not cached."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=local_files_only,
                                      **({"gguf_file": gguf_file} if gguf_file else {}))


def without_gguf_quantizer(causal_lm: nn.Module) -> nn.Module:
    """A GGUF model whose weights were loaded as plain float tensors is a plain model: forget transformers' GGUF
    quantizer, whose ``save_pretrained`` refuses, so ``hf_model`` and a merged LoRA model can be written."""
    if getattr(causal_lm, "hf_quantizer", None) is not None and all(
            type(p.data) is torch.Tensor and p.is_floating_point() for p in causal_lm.parameters()):
        causal_lm.hf_quantizer = None
        if hasattr(causal_lm.config, "quantization_config"):
            del causal_lm.config.quantization_config
    return causal_lm


def check_sizes(config, settings: dict) -> None:
    """Refuse sizes in ``model.config`` that no model builds with, naming the key."""
    problem = size_problem(config, head_dim_given="head_dim" in settings)
    if problem:
        key, why = problem
        raise ConfigError(f"model.config.{key}{'' if why.startswith('=') else ' '}{why}")
