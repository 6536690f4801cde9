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

import os

import torch
from omegaconf import OmegaConf
from torch import nn

from lowmem_train.causal_lm import CausalLMWithLossHead
from lowmem_train.data import make_loader, split, synthetic_tokens
from lowmem_train.errors import ConfigError, one_line
from lowmem_train.hub import OFFLINE_COMMAND, hub_reachable, is_local
from lowmem_train.recipe import Recipe, StepOutput
from lowmem_train.text_data import PadToLongest, TokenRows, instruct_rows, load_corpus, load_tokenizer, pad_id, text_rows


class LlamaFinetune(Recipe):
    name = "llama_finetune"
    data_sources = ("instruct", "text", "synthetic")
    validation_metric = "val/loss"

    def build_model(self) -> nn.Module:
        causal_lm = self.build_causal_lm()
        try:
            return CausalLMWithLossHead(causal_lm)
        except ValueError as exc:
            raise ConfigError(f"recipe {self.name}: {exc}") from None

    def build_causal_lm(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        path = self.model_cfg.get("name_or_path")
        dtype = self.model_cfg.get("dtype") or "float32"  # a Dtype of the model schema (its valid choices)
        dtype = getattr(torch, getattr(dtype, "value", dtype))
        if path:
            offline = not is_local(path) and not hub_reachable()
            try:
                return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **self.gguf())
            except (OSError, ValueError) as exc:  # ValueError: a directory without a model config
                reason = "the hub cannot be reached and it is not in the local cache" if offline else one_line(exc)
                raise ConfigError(f"model.name_or_path={path}: cannot load it ({reason}); use a local directory, "
                                  f"or offline: {OFFLINE_COMMAND}") from None
        return AutoModelForCausalLM.from_config(self.model_config(), dtype=dtype)

    def gguf(self) -> dict:
        """``gguf_file=`` for transformers when the model is a GGUF file inside ``model.name_or_path``."""
        gguf_file = self.model_cfg.get("gguf_file")
        if not gguf_file:
            return {}
        path = os.path.join(os.path.expanduser(self.model_cfg.name_or_path), gguf_file)
        if is_local(self.model_cfg.name_or_path) and not os.path.isfile(path):
            raise ConfigError(f"model.gguf_file={gguf_file}: no such file in {self.model_cfg.name_or_path}")
        return {"gguf_file": gguf_file}

    def model_config(self):
        """The transformers config: from ``model.name_or_path``, or built from ``model.config`` (random init)."""
        from transformers import AutoConfig

        path = self.model_cfg.get("name_or_path")
        if path:
            if not is_local(path):
                hub_reachable()  # offline: fail at once instead of retrying
            return AutoConfig.from_pretrained(path, **self.gguf())
        settings = self.model_cfg.get("config")
        if not settings:
            raise ConfigError("model.name_or_path or model.config is required by recipe llama_finetune")
        settings = OmegaConf.to_container(settings, resolve=True)
        return AutoConfig.for_model(settings.pop("model_type", "llama"), **settings)

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
        train, val = split(rows, float(data.val_fraction), int(data.seed))
        return (make_loader(train, data, train=True, collate_fn=collate),
                None if val is None else make_loader(val, data, train=False, collate_fn=collate))

    def data_report(self) -> dict:
        return getattr(self, "data_counts", {})

    def forward(self, model: nn.Module, batch) -> StepOutput:
        output = model(**batch)
        return StepOutput(output.per_sample_loss, output.per_sample_count, num_samples=batch["input_ids"].shape[0],
                          num_tokens=int(output.per_sample_count.sum()), sample_stats=output.sample_stats)

    def validation_step(self, model: nn.Module, batch):
        output = self.forward(model, batch)
        return {"val/loss": output.mean_loss()}, output.num_samples
