"""Schemas and defaults of the ``data``, ``model``, ``optimizer`` and ``recipe`` config groups.

Each choice is a dataclass stored in Hydra's ConfigStore (``register``): its fields are the only keys it
takes, typed, with their defaults written once, here. Hydra refuses an unknown key or a wrong value while
composing, naming the key. ``data=synthetic`` holds what the chosen recipe's synthetic data uses (images or
tokens), so no key is carried that the run would ignore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# --- data ---------------------------------------------------------------------------------------------


@dataclass
class DigitsData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): real data, no download."""

    name: str = "digits"
    image_size: int = 16  # upsampled from 8x8; 32 matches CIFAR's size at 4x the compute
    batch_size: int = 64
    val_fraction: float = 0.2
    num_workers: int = 0
    seed: int = 0


@dataclass
class Cifar10Data:
    """CIFAR-10 through torchvision: downloaded into root when online and download=true."""

    name: str = "cifar10"
    root: str = "~/.cache/lowmem_train/cifar10"
    download: bool = True
    augment: bool = True  # random crop with 4-pixel padding + horizontal flip
    batch_size: int = 128
    num_workers: int = 2


@dataclass
class ImageFolderData:
    """An ImageFolder tree: root/train/<class>/*.jpg and (optional) root/val/<class>/*.jpg."""

    name: str = "imagefolder"
    root: str = MISSING  # required: lowmem-train recipe=imagenet_resnet data.root=/datasets/imagenet
    image_size: int = 224
    batch_size: int = 32
    num_workers: int = 4


@dataclass
class InstructData:
    """Instruction or chat examples through Hugging Face datasets; only the responses are trained (prompt
    tokens get label -100). A row has instruction/input/output fields, or a ``messages`` list of
    {role, content} turns rendered with the tokenizer's chat template::

        {"instruction": "Name a prime.", "input": "", "output": "7"}
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
        lowmem-train recipe=llama_finetune data=instruct data.path=json data.data_files=train.jsonl   # local JSONL
    """

    name: str = "instruct"
    path: str = "yahma/alpaca-cleaned"  # open instruction data (52k Alpaca examples, cleaned) from the hub
    subset: Optional[str] = None
    data_files: Optional[Any] = None  # a file or a list of files (data.path=json)
    split: str = "train"
    messages_field: str = "messages"  # a list of {role, content} turns, when the rows have it
    instruction_field: str = "instruction"
    input_field: str = "input"  # optional context, appended to the instruction
    output_field: str = "output"
    tokenizer: Optional[str] = None  # null: the model's own tokenizer (model.name_or_path)
    seq_len: int = 512  # longer examples are truncated (counted in the report); at most the model's positions
    packing: bool = False  # true: join whole short examples into rows of up to seq_len tokens
    num_proc: Optional[int] = None  # processes for tokenisation (datasets.map); null: this one
    sample_prompts: list[str] = field(default_factory=list)  # answered greedily before and after training (report)
    val_fraction: float = 0.02  # share of the rows held out for val/loss (0: no validation)
    val_rows: Optional[int] = None  # an exact number of held-out rows instead of val_fraction (0: no validation)
    batch_size: int = 8
    num_workers: int = 0
    seed: int = 0


@dataclass
class TextData:
    """A corpus through Hugging Face datasets: a hub name (wikitext) or a builder for local files (json, text)::

        data.path=text data.data_files=corpus.txt      data.path=json data.data_files=[a.jsonl,b.jsonl]
    """

    name: str = "text"
    path: str = "wikitext"
    subset: Optional[str] = "wikitext-2-raw-v1"
    data_files: Optional[Any] = None  # a file or a list of files
    split: str = "train"
    text_field: str = "text"
    tokenizer: Optional[str] = None  # null: the model's own tokenizer (model.name_or_path)
    seq_len: int = 256
    num_proc: Optional[int] = None  # processes for tokenisation (datasets.map); null: this one
    sample_prompts: list[str] = field(default_factory=list)  # answered greedily before and after training (report)
    val_fraction: float = 0.05  # share of the token blocks held out for val/loss (0: no validation)
    val_rows: Optional[int] = None  # an exact number of held-out blocks instead of val_fraction (0: no validation)
    batch_size: int = 8
    num_workers: int = 0
    seed: int = 0


@dataclass
class SyntheticImages:
    """Random images and labels of an image recipe's shape, for benchmarks (``data=synthetic``)."""

    name: str = "synthetic"
    image_size: int = 32
    num_samples: int = 512
    batch_size: int = 32
    num_workers: int = 0
    seed: int = 0


@dataclass
class SyntheticTokens:
    """Random token rows for a language-model recipe, for benchmarks (``data=synthetic``)."""

    name: str = "synthetic"
    seq_len: int = 256
    num_samples: int = 512
    batch_size: int = 32
    num_workers: int = 0
    seed: int = 0


# ``data=synthetic`` picks its schema by the recipe chosen: data/synthetic/<recipe>.
SYNTHETIC = {"cifar_resnet": SyntheticImages(image_size=32), "imagenet_resnet": SyntheticImages(image_size=224),
             "llama_finetune": SyntheticTokens()}
DATA = {"digits": DigitsData, "cifar10": Cifar10Data, "imagefolder": ImageFolderData, "instruct": InstructData,
        "text": TextData}

# --- model --------------------------------------------------------------------------------------------


@dataclass
class CifarResNetModel:
    """torchvision ResNet adapted to 32x32 inputs (recipe cifar_resnet)."""

    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | resnet101 | resnet152
    num_classes: int = 10


@dataclass
class ResNetModel:
    """torchvision ResNet-50 (recipe imagenet_resnet)."""

    arch: str = "resnet50"
    num_classes: int = 1000
    weights: Optional[str] = None  # null: random init; or a torchvision weights name such as IMAGENET1K_V2
    # (downloaded by torchvision; then num_classes is the weights' 1000)


class Dtype(Enum):
    """Weights dtype of a causal LM at load (see also trainer.precision)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class CausalLMModel:
    """A Hugging Face causal LM (recipe llama_finetune): a hub id or a local directory saved with
    save_pretrained, or random init from ``config``. Default: SmolLM2-135M-Instruct (Llama architecture,
    Apache-2.0, no login). Any AutoModelForCausalLM works::

        model.name_or_path=meta-llama/Llama-3.2-1B-Instruct   (gated: `huggingface-cli login` first)
        model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct
    """

    name_or_path: Optional[str] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    gguf_file: Optional[str] = None  # a .gguf file inside name_or_path (weights dequantized at load, tokenizer read from it)
    dtype: Dtype = Dtype.bfloat16  # weights dtype at load (see also trainer.precision)
    config: Optional[dict[str, Any]] = None  # with name_or_path null: a transformers config (any of its keys)


# A random-init tiny Llama for tests and CPU runs (no downloads).
LLAMA_TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
# Llama-3.2-1B's shape with random weights, for memory/throughput benchmarks without downloading weights.
LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=True)
# Published shapes of the models people ask "will it fit?" about (config.json of each release; no weights:
# estimate=true builds them on fake tensors, a real run trains them from random init).
LLAMA_3_2_3B = dict(LLAMA_1B, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24)
LLAMA_3_1_8B = dict(LLAMA_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False)
QWEN_2_5_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                   rope_theta=1000000.0, tie_word_embeddings=False)
MISTRAL_7B = dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0,
                  sliding_window=None, tie_word_embeddings=False)
SHAPES = {"llama3_2_1b": LLAMA_1B, "llama3_2_3b": LLAMA_3_2_3B, "llama3_1_8b": LLAMA_3_1_8B, "qwen2_5_7b": QWEN_2_5_7B,
          "mistral_7b": MISTRAL_7B}
MODELS = {
    **{name: CausalLMModel(name_or_path=None, dtype=Dtype.bfloat16, config=shape) for name, shape in SHAPES.items()},
    "resnet18_cifar": CifarResNetModel(),
    "resnet50": ResNetModel(),
    "llama": CausalLMModel(),
    "llama_tiny": CausalLMModel(name_or_path=None, dtype=Dtype.float32, config=LLAMA_TINY),
    "llama_1b": CausalLMModel(name_or_path=None, dtype=Dtype.float32, config=LLAMA_1B),
}

# --- optimizer ----------------------------------------------------------------------------------------


@dataclass
class SGD:
    """SGD with Nesterov momentum (4 bytes of state per parameter)."""

    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5.0e-4


@dataclass
class AdamW:
    """AdamW (8 bytes of state per parameter in fp32)."""

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 3.0e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class QuantizedAdamW:
    """AdamW with block-quantized moments: 8 bits ~2 bytes of state per parameter, 4 bits ~1 (instead of 8).
    Needs the optim extra (torchao): pip install 'lowmem-train[optim]'::

        lowmem-train recipe=llama_finetune optimizer=adamw8bit
        lowmem-train recipe=llama_finetune optimizer=adamw8bit optimizer.backend=bitsandbytes
        lowmem-train recipe=llama_finetune optimizer=adamw4bit
    """

    _target_: str = "lowmem_train.optimizers.quantized_adamw"
    bits: int = 8
    backend: str = "torchao"  # torchao (CPU and CUDA, torch.compile'd step) or bitsandbytes (8 bits only)
    lr: float = 3.0e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    block_size: Optional[int] = None  # null: the backend's default (256 values per scale at 8 bits, 128 at 4)


@dataclass
class Adafactor:
    """Adafactor (lowmem_train.optimizers.MatrixAdafactor: torch.optim.Adafactor with every tensor of >= 2
    dims, conv weights included, factored as (dim 0, the rest)): factored second moment (one value per row and
    per column of each matrix), no first moment: O(rows + cols) bytes of state per matrix::

        lowmem-train recipe=llama_finetune optimizer=adafactor
    """

    _target_: str = "lowmem_train.optimizers.MatrixAdafactor"
    _partial_: bool = True
    lr: float = 1.0e-2  # relative step: scaled by the parameter's RMS (eps[1])
    beta2_decay: float = -0.8
    eps: list[Optional[float]] = field(default_factory=lambda: [None, 1.0e-3])
    d: float = 1.0
    weight_decay: float = 0.0


@dataclass
class GaLore:
    """GaLore AdamW: Adam moments in a rank-``rank`` subspace of each matrix's gradient (SVD every
    update_proj_gap steps); matrices whose smaller side is <= rank, biases and norms get plain AdamW::

        lowmem-train recipe=llama_finetune optimizer=galore
        lowmem-train recipe=llama_finetune model=llama_tiny data=synthetic optimizer=galore optimizer.rank=16
    """

    _target_: str = "lowmem_train.optimizers.GaLoreAdamW"
    _partial_: bool = True
    lr: float = 3.0e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25


OPTIMIZERS = {"sgd": SGD(), "adamw": AdamW(), "adamw8bit": QuantizedAdamW(), "adamw4bit": QuantizedAdamW(bits=4),
              "adafactor": Adafactor(), "galore": GaLore()}

# --- recipe -------------------------------------------------------------------------------------------


@dataclass
class RecipeSchema:
    """The ``recipe`` node: the Recipe class to build (configs/recipe/*.yaml set it and the recipe's defaults)."""

    _target_: str = MISSING


def register(store: ConfigStore) -> None:
    """Store every choice of the data, model and optimizer groups and the recipe schema."""
    for name, node in DATA.items():
        store.store(group="data", name=name, node=node)
    store.store(group="data", name="synthetic", node={"defaults": [{"synthetic@_here_": "${recipe}"}, "_self_"]})
    for recipe, node in SYNTHETIC.items():
        store.store(group="data/synthetic", name=recipe, node=node)
    for name, node in MODELS.items():
        store.store(group="model", name=name, node=node)
    for name, node in OPTIMIZERS.items():
        store.store(group="optimizer", name=name, node=node)
    store.store(name="recipe_schema", node=RecipeSchema, package="recipe")
