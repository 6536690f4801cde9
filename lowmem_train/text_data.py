"""Token rows for causal-LM recipes: a tokenizer, a corpus through ``datasets``, and what trains on it.

Two kinds of corpus:

- raw text (``data=text``): every text tokenised, joined with the end-of-sequence token and cut into
  ``data.seq_len`` blocks; every token is a target.
- instruction or chat examples (``data=instruct``): ``instruction``/``input``/``output`` fields, or a
  ``messages`` list of ``{role, content}`` turns, rendered with the tokenizer's chat template (an
  Alpaca-style prompt when it has none). Prompt tokens get label -100, so only the responses (every
  assistant turn) are trained; rows longer than ``data.seq_len`` are truncated and counted; rows that cannot
  train (no output, an empty one, no assistant turn, no response token within ``seq_len``) are dropped,
  counted by reason and named in one printed line; ``data.packing`` joins short examples into rows of up to
  ``seq_len``.

Local JSON and text files are read once here before ``datasets`` sees them, so a byte that is not UTF-8 (or a
JSON line that does not parse) is an error naming the file and the line.

Tokenisation runs through ``datasets.map(batched=True)``: its results are cached by the datasets library
(keyed by the corpus, the tokenizer and these settings; ``HF_DATASETS_CACHE`` says where), and
``data.num_proc`` tokenises in parallel processes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from .causal_lm import IGNORE_INDEX
from .errors import ConfigError, one_line
from .hub import OFFLINE_COMMAND, hub_reachable, is_local

ALPACA_PROMPT = ("Below is an instruction that describes a task{paired}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


def load_tokenizer(data: DictConfig, model: DictConfig):
    """``data.tokenizer``, or the model's own (``model.name_or_path``, read from ``model.gguf_file`` if set)."""
    from transformers import AutoTokenizer

    path = data.get("tokenizer") or model.get("name_or_path")
    if not path:
        raise ConfigError("data.tokenizer is required when model.name_or_path is not set (a tokenizer directory "
                          f"or hub id); a random-init model trains offline on data=synthetic: {OFFLINE_COMMAND}")
    gguf = {"gguf_file": model.gguf_file} if not data.get("tokenizer") and model.get("gguf_file") else {}
    if not is_local(path):
        hub_reachable()  # offline: fail at once instead of retrying
    try:
        return AutoTokenizer.from_pretrained(path, **gguf)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer {path}: cannot load it ({one_line(exc)}); offline: {OFFLINE_COMMAND}") from None


def data_file_paths(data: DictConfig) -> list[str]:
    """``data.data_files`` as one flat list: a file, a list of files, or a dict of split name -> file(s)."""
    files = data.get("data_files")
    files = OmegaConf.to_container(files) if OmegaConf.is_config(files) else files
    if files is None:
        return []
    listed = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, dict) else list(files)
    return [path for item in listed for path in ([item] if isinstance(item, str) else item)]


def check_data_files(data: DictConfig) -> None:
    """Every local ``data.data_files`` entry exists and not all are empty; cheap, so a recipe calls it when
    it is built and a sweep's bad file is refused before any job runs."""
    paths = data_file_paths(data)
    missing = [f for f in paths if "://" not in f and not os.path.exists(os.path.expanduser(f))]
    if missing:
        raise ConfigError(f"data.data_files: {missing[0]} does not exist")
    local = [f for f in paths if is_local(f)]
    if local and all(os.path.getsize(os.path.expanduser(f)) == 0 for f in local):
        raise ConfigError(f"data.data_files: {local[0]} is empty")


# Builders that read data_files as text; a compressed file is decompressed by datasets, so not read here.
TEXT_BUILDERS = ("json", "text")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip", ".tar")


def local_text_files(data: DictConfig) -> list[str]:
    if data.path not in TEXT_BUILDERS:
        return []
    return [os.path.expanduser(f) for f in data_file_paths(data) if is_local(f) and not f.endswith(COMPRESSED)]


def check_utf8(path: str) -> None:
    """A ConfigError naming the line and column of ``path``'s first byte that is not UTF-8 (datasets would
    otherwise fail without saying where, or read it as something else). Read in whole lines of ~1 MiB."""
    line = 1
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20) + file.readline():
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as exc:
                before = chunk[: exc.start]
                line, column = line + before.count(b"\n"), exc.start - before.rfind(b"\n")
                raise ConfigError(f"data.data_files: {path} line {line} is not UTF-8 (byte 0x{chunk[exc.start]:02x} "
                                  f"at column {column}); save the file as UTF-8") from None
            line += chunk.count(b"\n")


def json_problem(path: str) -> str | None:
    """Where a UTF-8 JSON-lines (or JSON) file cannot be parsed, as 'line N ...', else None: streamed line by
    line for JSON lines (a first line that is a whole object), read whole for one JSON document."""
    with open(path, encoding="utf-8") as file:
        first = next((line for line in file if line.strip()), "")
    try:
        json_lines = isinstance(json.loads(first), dict)
    except ValueError:
        json_lines = False
    if not json_lines:
        try:
            json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as exc:
            return f"line {exc.lineno} is not valid JSON ({exc.msg}, column {exc.colno})"
        return None
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                return f"line {number} is not valid JSON ({exc.msg}, column {exc.colno})"
            if not isinstance(row, dict):
                return f"line {number} is not a JSON object (one {{...}} per line)"
    return None


def load_corpus(data: DictConfig):
    """``datasets.load_dataset(data.path, data.subset, data_files=data.data_files, split=data.split)``; a local
    JSON or text file that is not UTF-8, or JSON that does not parse, is a ConfigError naming file and line."""
    import datasets

    if not data.get("path"):
        raise ConfigError("data.path is required: a datasets hub name (wikitext) or a builder for local files "
                          "(json, text) with data.data_files")
    check_data_files(data)
    files = data.get("data_files")
    files = OmegaConf.to_container(files) if OmegaConf.is_config(files) else files
    for path in local_text_files(data):
        check_utf8(path)
    if not (files or is_local(data.path)):
        hub_reachable()
    try:
        return datasets.load_dataset(data.path, data.get("subset"), data_files=files, split=data.split)
    except Exception as exc:  # datasets raises many types (missing files, offline hub, an empty or bad file)
        for path in local_text_files(data) if data.path == "json" else []:
            problem = json_problem(path)
            if problem:
                raise ConfigError(f"data.data_files: {path} {problem}") from None
        local_hint = "data.path=json data.data_files=<your.jsonl> for a local file, or " if data.name == "instruct" else ""
        raise ConfigError(f"data.path={data.path}: cannot load ({one_line(exc)}); offline: {local_hint}"
                          f"{OFFLINE_COMMAND}") from None


class TokenRows(Dataset):
    """Rows of token ids with their labels (-100 where no loss is taken), as dicts for ``PadToLongest``."""

    def __init__(self, input_ids, labels):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": torch.as_tensor(self.input_ids[index]), "labels": torch.as_tensor(self.labels[index])}


@dataclass
class PadToLongest:
    """Collate rows into a batch padded to its longest row: pad id, label -100, attention mask 0."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        batch = {"input_ids": torch.full((len(rows), length), self.pad_id, dtype=torch.long),
                 "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
                 "attention_mask": torch.zeros((len(rows), length), dtype=torch.long)}
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = row["input_ids"]
            batch["labels"][i, :n] = row["labels"]
            batch["attention_mask"][i, :n] = 1
        return batch


def pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def text_rows(corpus, tokenizer, data: DictConfig) -> tuple[TokenRows, dict]:
    """Raw text joined with EOS and cut into ``seq_len`` blocks; every token is a target."""
    field = data.text_field
    if field not in corpus.column_names:
        raise ConfigError(f"data.text_field={field} is not a column; columns: {corpus.column_names}")
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def tokenize(batch):
        texts = [text for text in batch[field] if text and text.strip()]
        return {"input_ids": [ids + eos for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]}

    tokenized = corpus.map(tokenize, batched=True, remove_columns=corpus.column_names, num_proc=data.get("num_proc"),
                           desc="tokenizing")
    ids = torch.tensor(list(chain.from_iterable(tokenized["input_ids"])), dtype=torch.long)
    seq_len = int(data.seq_len)
    blocks = len(ids) // seq_len
    if blocks == 0:
        raise ConfigError(f"data.path={data.path} has {len(ids)} tokens, fewer than data.seq_len={seq_len}")
    rows = ids[: blocks * seq_len].view(blocks, seq_len)
    counts = {"source": "text", "texts": len(corpus), "rows": blocks, "tokens": blocks * seq_len,
              "trained_tokens": blocks * (seq_len - 1), "dropped_tokens": len(ids) - blocks * seq_len}
    return TokenRows(rows, rows), counts


# Why a row cannot train (the data report's ``dropped_by_reason`` keys) and how the printed line says it.
DROP_REASONS = {"no_output": "without an output", "empty_output": "with an empty output",
                "no_assistant_turn": "with no assistant turn",
                "no_response_token": "with no response token within data.seq_len={seq_len}"}


def output_drop_reason(output) -> str | None:
    if output is None:  # the field absent from this row (datasets fills it with None)
        return "no_output"
    return None if str(output).strip() else "empty_output"


def chat_drop_reason(messages) -> str | None:
    if not messages or any(not isinstance(m, dict) or "role" not in m or "content" not in m for m in messages):
        raise ConfigError(f"data.messages_field: every row needs a list of {{role, content}} turns, got {messages!r:.80}")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        return "no_assistant_turn"
    return None if any(answer and str(answer).strip() for answer in answers) else "empty_output"


def describe_drops(dropped: dict[str, int], seq_len: int) -> str:
    """``{"no_output": 2, ...}`` as '2 without an output, ...'."""
    return ", ".join(f"{count} {DROP_REASONS[reason].format(seq_len=seq_len)}" for reason, count in dropped.items())


def instruct_rows(corpus, tokenizer, data: DictConfig) -> tuple[TokenRows, dict]:
    """Instruction or chat examples with prompt tokens masked (-100), truncated to ``seq_len``, optionally packed.

    A row that cannot train (no output, an empty one, no assistant turn, no response token left within
    ``seq_len``) is dropped, counted by reason in the report and named in one printed line; when no row is
    left that is a ConfigError."""
    columns = corpus.column_names
    messages_field, fields = data.messages_field, (data.instruction_field, data.input_field, data.output_field)
    if messages_field in columns:
        render, needs = chat_segments_of(tokenizer), f"each {messages_field} list needs a non-empty assistant turn"
        def drop_reason(batch, i):
            return chat_drop_reason(batch[messages_field][i])
        def segments(batch, i):
            return render(batch[messages_field][i])
    elif fields[0] in columns and fields[2] in columns:
        render, needs = instruction_segments_of(tokenizer), f"each row needs a non-empty {fields[2]}"
        def drop_reason(batch, i):
            return output_drop_reason(batch[fields[2]][i])
        def segments(batch, i):
            extra = batch[fields[1]][i] if fields[1] in columns else None
            return render(batch[fields[0]][i] or "", extra, str(batch[fields[2]][i]))
    else:
        raise ConfigError(f"data.messages_field={messages_field} or data.instruction_field={fields[0]} and "
                          f"data.output_field={fields[2]}: no such columns; columns: {columns} (raw text: data=text)")
    seq_len = int(data.seq_len)

    def tokenize(batch):
        out = {"input_ids": [], "labels": [], "truncated": [], "dropped": []}
        for i in range(len(batch[columns[0]])):
            ids, labels, reason = [], [], drop_reason(batch, i)
            for text, trained, special, eos in [] if reason else segments(batch, i):
                piece = tokenizer(text, add_special_tokens=special)["input_ids"] if text else []
                if eos and tokenizer.eos_token_id is not None:
                    piece = piece + [tokenizer.eos_token_id]
                ids += piece
                labels += piece if trained else [IGNORE_INDEX] * len(piece)
            # a row trains on the targets after its first token (labels shift by one inside the loss)
            if not reason and all(label == IGNORE_INDEX for label in labels[1:seq_len]):
                reason = "no_response_token"
            out["dropped"].append(reason or "")
            out["truncated"].append(not reason and len(ids) > seq_len)
            out["input_ids"].append([] if reason else ids[:seq_len])
            out["labels"].append([] if reason else labels[:seq_len])
        return out

    tokenized = corpus.map(tokenize, batched=True, remove_columns=columns, num_proc=data.get("num_proc"),
                           desc="tokenizing")
    reasons = tokenized["dropped"]  # each column read from Arrow once
    kept = [i for i, reason in enumerate(reasons) if not reason]
    dropped = {reason: reasons.count(reason) for reason in DROP_REASONS if reason in reasons}
    if not kept:
        raise ConfigError(f"{data_source(data)}: none of its {len(corpus)} rows can train "
                          f"({describe_drops(dropped, seq_len)}); {needs} with tokens within data.seq_len={seq_len}")
    if dropped:
        print(f"data: dropped {len(corpus) - len(kept)} of {len(corpus)} rows: {describe_drops(dropped, seq_len)}")
    all_ids, all_labels = tokenized["input_ids"], tokenized["labels"]
    input_ids, labels = [all_ids[i] for i in kept], [all_labels[i] for i in kept]
    counts = {"source": "instruct", "examples": len(corpus), "truncated": sum(tokenized["truncated"]),
              "dropped": len(corpus) - len(kept), "dropped_by_reason": dropped}
    if data.get("packing"):
        input_ids, labels = pack(input_ids, labels, seq_len)
    counts.update(rows=len(input_ids), tokens=sum(map(len, input_ids)),
                  trained_tokens=sum(sum(l != IGNORE_INDEX for l in row[1:]) for row in labels))
    return TokenRows(input_ids, labels), counts


def data_source(data: DictConfig) -> str:
    """The key that names where rows came from, for messages: the local files, else the dataset."""
    files = data_file_paths(data)
    return f"data.data_files={files[0] if len(files) == 1 else files}" if files else f"data.path={data.path}"


def pack(input_ids: list[list[int]], labels: list[list[int]], seq_len: int):
    """Whole examples joined in order into rows of at most ``seq_len`` tokens (no example is split; attention
    is not isolated between the examples of a row). Each example's first label is masked: it would be
    predicted from the previous example."""
    rows, row_labels = [[]], [[]]
    for ids, lab in zip(input_ids, labels):
        if rows[-1] and len(rows[-1]) + len(ids) > seq_len:
            rows.append([]), row_labels.append([])
        rows[-1] += ids
        row_labels[-1] += [IGNORE_INDEX] + lab[1:] if row_labels[-1] else lab
    return rows, row_labels


def chat_segments_of(tokenizer):
    """A function from a ``messages`` list to (text, trained, add_special_tokens, append_eos) segments: the
    chat template's rendering cut before and after every assistant turn (the template ends turns itself)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.messages_field: the tokenizer has no chat template to render messages with; use "
                          "instruction/output fields or a tokenizer with a chat template (data.tokenizer)")

    def render(messages, **kwargs) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def segments(messages):  # checked by chat_drop_reason first
        out, done = [], ""
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, full = render(messages[:k], add_generation_prompt=True), render(messages[: k + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ConfigError("the tokenizer's chat template does not render a conversation's start as a prefix "
                                  "of the whole; prompt masking needs it (use data.tokenizer with another template)")
            out += [(prompt[len(done):], False, False, False), (full[len(prompt):], True, False, False)]
            done = full
        out.append((render(messages)[len(done):], False, False, False))
        return out

    return segments


def instruction_segments_of(tokenizer):
    """A function from (instruction, input, output) to segments: a user/assistant chat when the tokenizer has
    a template, else an Alpaca-style prompt followed by the output and EOS."""
    if getattr(tokenizer, "chat_template", None):
        chat = chat_segments_of(tokenizer)
        return lambda instruction, extra, output: chat([
            {"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")},
            {"role": "assistant", "content": output}])

    def segments(instruction, extra, output):
        prompt = ALPACA_PROMPT.format(paired=", paired with an input that provides further context" if extra else "",
                                      instruction=instruction, input=f"### Input:\n{extra}\n\n" if extra else "")
        return [(prompt, False, True, False), (output, True, False, True)]

    return segments
