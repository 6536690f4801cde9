"""Causal-LM fine-tuning of a Hugging Face model (Llama and any ``AutoModelForCausalLM``).

    lowmem-train recipe=llama_finetune                                  # meta-llama/Llama-3.2-1B on wikitext-2
    lowmem-train recipe=llama_finetune model.name_or_path=/models/llama data.path=json data.data_files=train.jsonl
    lowmem-train recipe=llama_finetune model=llama_tiny data=synthetic  # random-init tiny model, no downloads

Text is tokenised with the model's tokenizer, concatenated and cut into blocks of ``data.seq_len`` tokens;
the loss is next-token cross-entropy, computed inside the model by its loss head (``CausalLMWithLossHead``),
in training and validation alike.
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


class LlamaFinetune(Recipe):
    name = "llama_finetune"
    data_sources = ("text", "synthetic")
    validation_metric = "val/loss"
    dtypes = ("float32", "bfloat16", "float16")

    def __init__(self, model, data):
        super().__init__(model, data)
        if (model.get("dtype") or "float32") not in self.dtypes:
            raise ConfigError(f"model.dtype={model.get('dtype')} is not a weights dtype; valid: {', '.join(self.dtypes)}")

    def build_model(self) -> nn.Module:
        causal_lm = self.build_causal_lm()
        try:
            return CausalLMWithLossHead(causal_lm)
        except ValueError as exc:
            raise ConfigError(f"recipe {self.name}: {exc}") from None

    def build_causal_lm(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        path = self.model_cfg.get("name_or_path")
        dtype = getattr(torch, self.model_cfg.get("dtype") or "float32")
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
            train = synthetic_tokens(int(data.num_samples), int(data.seq_len), self.model_config().vocab_size,
                                     int(data.seed))
            return make_loader(train, data, train=True), None
        train, val = split(self.text_blocks(), float(data.val_fraction), int(data.seed))
        return make_loader(train, data, train=True), None if val is None else make_loader(val, data, train=False)

    def text_blocks(self) -> torch.utils.data.TensorDataset:
        import datasets
        from transformers import AutoTokenizer

        data = self.data_cfg
        tokenizer_path = data.get("tokenizer") or self.model_cfg.get("name_or_path")
        if not tokenizer_path:
            raise ConfigError("data.tokenizer is required when model.name_or_path is not set (a tokenizer directory "
                              f"or hub id); a random-init model trains offline on data=synthetic: {OFFLINE_COMMAND}")
        if not data.get("path"):
            raise ConfigError("data.path is required: a datasets hub name (wikitext) or a builder for local files "
                              "(json, text) with data.data_files")
        data_files = data.get("data_files")
        if data_files is not None:
            data_files = OmegaConf.to_container(data_files) if OmegaConf.is_config(data_files) else data_files
            missing = [f for f in ([data_files] if isinstance(data_files, str) else data_files)
                       if isinstance(f, str) and "://" not in f and not os.path.exists(os.path.expanduser(f))]
            if missing:
                raise ConfigError(f"data.data_files: {missing[0]} does not exist")
            local = [f for f in ([data_files] if isinstance(data_files, str) else data_files) if is_local(f)]
            if local and all(os.path.getsize(os.path.expanduser(f)) == 0 for f in local):
                raise ConfigError(f"data.data_files: {local[0]} is empty")
        if not (is_local(tokenizer_path) and (data_files or is_local(data.path))):
            hub_reachable()  # offline: fail at once instead of retrying
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except OSError as exc:
            raise ConfigError(f"tokenizer {tokenizer_path}: cannot load it ({one_line(exc)}); offline: "
                              f"{OFFLINE_COMMAND}") from None
        try:
            corpus = datasets.load_dataset(data.path, data.get("subset"), data_files=data_files, split=data.split)
        except Exception as exc:  # datasets raises many types (missing files, offline hub, an empty or bad file)
            raise ConfigError(f"data.path={data.path}: cannot load ({one_line(exc)}); offline: "
                              f"{OFFLINE_COMMAND}") from None
        if data.text_field not in corpus.column_names:
            raise ConfigError(f"data.text_field={data.text_field} is not a column; columns: {corpus.column_names}")
        ids: list[int] = []
        for text in corpus[data.text_field]:
            if text and text.strip():
                ids += tokenizer(text, add_special_tokens=False)["input_ids"]
                if tokenizer.eos_token_id is not None:
                    ids.append(tokenizer.eos_token_id)
        seq_len = int(data.seq_len)
        blocks = len(ids) // seq_len
        if blocks == 0:
            raise ConfigError(f"data.path={data.path} has {len(ids)} tokens, fewer than data.seq_len={seq_len}")
        return torch.utils.data.TensorDataset(torch.tensor(ids[: blocks * seq_len]).view(blocks, seq_len))

    def forward(self, model: nn.Module, batch) -> StepOutput:
        (input_ids,) = batch
        output = model(input_ids=input_ids, labels=input_ids)
        return StepOutput(output.per_sample_loss, output.per_sample_count, num_samples=input_ids.shape[0],
                          num_tokens=int(output.per_sample_count.sum()), sample_stats=output.sample_stats)

    def validation_step(self, model: nn.Module, batch):
        output = self.forward(model, batch)
        return {"val/loss": output.mean_loss()}, output.num_samples
