"""LoRA, DoRA and QLoRA through PEFT: the base weights are frozen (optionally stored in NF4 or int8 by
bitsandbytes), only low-rank adapters train.

Weight memory is what this strategy saves: a frozen weight has no gradient and no optimizer state, and with
``quantize=nf4`` it is stored in ~0.53 bytes per parameter (4-bit codes, blocks of 64 with double-quantised
scales) instead of 2 (bf16). The adapters (``B A``, rank ``r``, scaled ``alpha / r``; DoRA adds a magnitude
per output row) are the trainable parameters.

PEFT injects the adapters in place into the causal LM (or, for any other model, into the whole model), so
the module tree keeps its names for the other strategies: checkpointing wraps the same blocks, VeLoRA finds
the adapters' ``lora_A`` layers, compress and approx_bp see the same activations. At the end of a run the
adapters are saved in PEFT's format (``PeftModel.from_pretrained(base, run_dir / "adapter")``) and, with
``save_merged``, the merged model as a Hugging Face model directory (quantized bases are dequantized first).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch import nn

from lowmem_train import Strategy, StrategyError, Touch, select_modules
from lowmem_train.causal_lm import causal_lm_of, source_of
from lowmem_train.sharding import whole
from lowmem_train.targets import repeated_blocks, weight_read_by_parent
from lowmem_train.undisturbed import undisturbed

QUANTIZE = ("none", "nf4", "int8")
ADAPTER = "default"  # PEFT's adapter name; one adapter per model here
ADAPTER_DIR, MERGED_DIR = "adapter", "merged"
BASE_NOTE = "lowmem_base.json"  # beside the adapter: its base's path, GGUF file and load dtype


@dataclass
class LoraOptions:
    """LoRA / DoRA / QLoRA (PEFT): frozen base weights, trainable low-rank adapters.

    Adapters are saved in PEFT format to <run_dir>/adapter at the end of the run. ``r``: adapter rank.
    ``alpha``: the update B A is scaled by alpha / r. ``dropout``: dropout on the adapter's input.
    ``target_modules``: null, every Linear inside the repeated blocks; else class names or name regexes.
    ``use_dora``: DoRA, a trainable magnitude per output row times the normalised adapted weight.
    ``quantize``: frozen base weights none | nf4 (QLoRA, 4-bit NormalFloat) | int8 (LLM.int8), bitsandbytes.
    ``seed``: the adapters' initialisation has its own generator (the model's RNG stream is untouched).
    ``save_merged``: also write <run_dir>/merged, base + adapters merged, a plain Hugging Face model::

        lowmem-train recipe=llama_finetune strategy=[lora,checkpoint,chunked_ce]
        lowmem-train recipe=llama_finetune strategy=lora strategy.lora.quantize=nf4     # QLoRA
        lowmem-train recipe=llama_finetune strategy=lora strategy.lora.use_dora=true    # DoRA
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None  # class names / name regexes; None: every Linear in the blocks
    exclude: list[str] = field(default_factory=list)
    use_dora: bool = False
    quantize: str = "none"  # frozen base weights: none | nf4 | int8 (bitsandbytes)
    seed: int = 0  # the adapters' initialisation draws from this generator, never the model's RNG stream
    save_merged: bool = False  # also save base + adapters merged, as a plain Hugging Face model

    def validate(self, strategy: str) -> None:
        if self.r < 1:
            raise StrategyError(f"strategy '{strategy}': r={self.r} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise StrategyError(f"strategy '{strategy}': dropout={self.dropout} must be in [0, 1)")
        if self.quantize not in QUANTIZE:
            raise StrategyError(f"strategy '{strategy}': quantize={self.quantize}; valid: {', '.join(QUANTIZE)}")
        needed = ["peft"] + (["bitsandbytes"] if self.quantize != "none" else [])
        missing = [package for package in needed if importlib.util.find_spec(package) is None]
        if missing:
            raise StrategyError(f"strategy '{strategy}' needs {' and '.join(missing)}: "
                                "pip install 'lowmem-train[lora]'")
        if self.use_dora and self.quantize == "int8":
            # PEFT's DoRA norm dequantizes the int8 weight in a way bitsandbytes' int8 matmul cannot run after.
            raise StrategyError(f"strategy '{strategy}': use_dora=true cannot be combined with quantize=int8 "
                                "(bitsandbytes' int8 matmul fails after DoRA's dequantization); use quantize=nf4 or none")


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Linear`` inside the repeated blocks (attention and MLP projections; not the embeddings or
    the output head)."""
    return [(f"{block_name}.{name}", module) for block_name, block in repeated_blocks(model)
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear) and not weight_read_by_parent(model, f"{block_name}.{name}")]


def adapted_model(model: nn.Module) -> nn.Module:
    """What carries the adapters: the causal LM inside the recipe's wrapper (so the saved adapter fits
    ``AutoModelForCausalLM``), or the model itself."""
    return causal_lm_of(model) or model


class Lora(Strategy):
    exact = False  # trains other parameters than full fine-tuning: a different optimisation, not an approximation
    order = 5  # swaps linear layers: before approx_bp (10), VeLoRA (40) and the forward wrappers
    Options = LoraOptions
    summary = "frozen (optionally NF4/int8) base weights, trainable low-rank adapters (PEFT): no grads or optimizer state for the base"

    def plan(self, model: nn.Module) -> list[Touch]:
        target = adapted_model(model)
        if hasattr(target, "peft_config"):
            raise StrategyError(f"strategy '{self.name}': the model already carries PEFT adapters; apply lora to the "
                                "base model")
        chosen = select_modules(target, strategy=self.name, targets=self.options.target_modules,
                                exclude=self.options.exclude, default=block_linears,
                                what="linear layers inside the repeated blocks", option="target_modules")
        bypassed = [n for n, _ in chosen if weight_read_by_parent(target, n)]
        if bypassed:
            raise StrategyError(f"strategy '{self.name}': {bypassed[0]}'s weight is read directly by its parent's "
                                "forward, so an adapter there would never run; exclude it")
        unsupported = [(n, m) for n, m in chosen if not isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]
        if unsupported:
            name, module = unsupported[0]
            raise StrategyError(f"strategy '{self.name}': {name} is a {type(module).__name__}; LoRA adapts "
                                "Linear, Conv2d and Embedding layers")
        if self.options.quantize != "none":
            not_linear = [n for n, m in chosen if not isinstance(m, nn.Linear)]
            if not_linear:
                raise StrategyError(f"strategy '{self.name}': quantize={self.options.quantize} stores Linear weights "
                                    f"only; {not_linear[0]} is not one (exclude it or use quantize=none)")
        kind = "DoRA" if self.options.use_dora else "LoRA"
        weights = "frozen" if self.options.quantize == "none" else f"frozen, {self.options.quantize}"
        return [Touch(name, type(module).__name__, f"{kind} r={self.options.r} ({weights} base)")
                for name, module in chosen]

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        apply_lora(adapted_model(model), [t.module for t in plan], self.options)
        self.figures = {"adapted_layers": len(plan),
                        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                        "saved": ADAPTER_DIR + (f", {MERGED_DIR}" if self.options.save_merged else "")}

    def callbacks(self) -> list:
        return [SaveAdapters(self.options.save_merged)]

    def estimate_problem(self) -> str | None:
        if self.options.quantize == "int8":
            return ("quantize=int8: bitsandbytes builds its quantized weights on a real device, not on fake tensors, "
                    "and LLM.int8's outlier columns depend on the weights' values; quantize=nf4 is estimable")
        return None  # tests/test_estimate.py checks its fake step against a real one

    def sharding_problem(self) -> str | None:
        if self.options.quantize != "none":
            return (f"quantize={self.options.quantize} stores the base weights as bitsandbytes tensors, which FSDP2 "
                    "cannot shard; use quantize=none")
        if self.options.save_merged:
            return ("save_merged needs every base weight whole in one process; train with save_merged=false and "
                    "merge the saved adapter afterwards (PeftModel.from_pretrained(base, adapter).merge_and_unload())")
        return None

    def report(self) -> dict:
        return getattr(self, "figures", {})


def lora_config(target_modules: list[str], options: LoraOptions):
    from peft import LoraConfig

    return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      target_modules=target_modules, use_dora=options.use_dora, bias="none")


def apply_lora(model: nn.Module, module_names: list[str], options: LoraOptions) -> None:
    """Freeze ``model``, store the named Linear layers' weights quantized if asked, inject PEFT adapters."""
    from peft import inject_adapter_in_model

    if options.quantize != "none":
        for name in module_names:
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, child, quantized_linear(getattr(holder, child), options.quantize))
    # PEFT picks its bitsandbytes adapter layers when the model says it is loaded in 4/8 bits.
    flag = {"nf4": "is_loaded_in_4bit", "int8": "is_loaded_in_8bit"}.get(options.quantize)
    if flag:
        setattr(model, flag, True)
    try:
        # PEFT initialises lora_A from the global RNG: keep the model's stream (dropout masks) untouched.
        with undisturbed(model, buffers=False, modes=False):
            # Exact names: PEFT matches a target when the module's name equals it or ends with "." + it.
            inject_adapter_in_model(lora_config(module_names, options), model, adapter_name=ADAPTER)
    finally:
        if flag:
            delattr(model, flag)
    initialise_adapters(model, options.seed)
    # Adapters of a bf16/fp16 base train in float32 (as PEFT's get_peft_model does): their small updates would
    # round away in 8 mantissa bits, and they are a few MB. trainer.precision=bf16-true casts them back.
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()


def initialise_adapters(model: nn.Module, seed: int) -> None:
    """PEFT's default initialisation (A Kaiming-uniform, B zero; embeddings A zero, B normal), drawn from the
    strategy's own generator so the same seed gives the same adapters in every process and order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for module in layer.lora_A.values():
                weight = module.weight
                values = nn.init.kaiming_uniform_(torch.empty(weight.shape), a=math.sqrt(5), generator=generator)
                weight.copy_(values)
            for parameter in layer.lora_embedding_B.values():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def quantized_linear(linear: nn.Linear, quantize: str) -> nn.Module:
    """The frozen ``linear`` as a bitsandbytes layer: NF4 (blocks of 64, double-quantised scales, computing in
    the weight's dtype) or LLM.int8 (row-wise int8, outlier columns above 6 in higher precision). A weight on
    the meta device (``estimate=true`` builds there) has no values to quantize: NF4 gets its memory model."""
    import bitsandbytes as bnb

    weight = linear.weight.detach()
    if weight.device.type == "meta" and quantize == "nf4":
        return NF4LinearMemory(linear)
    bias = linear.bias is not None
    if quantize == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=weight.dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=64)
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place at the first eval forward and
        # from then on multiplies in bf16 through an op without autograd: training after a validation pass
        # gets wrong adapter gradients and dequantizing (merge) reads the repacked bytes as NF4. Keep one format.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().cpu(), requires_grad=False)
    return layer.to(weight.device if weight.device.type != "meta" else "cpu")  # bitsandbytes quantizes on .to()


class NF4LinearMemory(nn.Linear):
    """What bitsandbytes' NF4 ``Linear4bit`` holds and allocates, without its values (the estimate runs on fake
    tensors, which bitsandbytes' parameters cannot wrap): 4-bit codes, a uint8 scale per block of 64 with an
    fp32 scale per 256 of those, its two code books and its settings as JSON; forward and backward each
    dequantize the whole weight to the compute dtype for their matmul (after the block scales, in fp32), and
    nothing of the input is saved. A ``nn.Linear`` so that PEFT adapts it."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        values = linear.weight.numel()
        blocks = math.ceil(values / 64)

        def frozen(numel: int, dtype: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(numel, dtype=dtype, device="meta"), requires_grad=False)

        self.weight = frozen(math.ceil(values / 2), torch.uint8)
        self.absmax, self.quant_map = frozen(blocks, torch.uint8), frozen(16, torch.float32)
        self.nested_absmax, self.nested_quant_map = frozen(math.ceil(blocks / 256), torch.float32), frozen(256, torch.float32)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.compute_dtype = linear.weight.dtype
        metadata = {"quant_type": "nf4", "blocksize": 64, "dtype": str(self.compute_dtype).removeprefix("torch."),
                    "shape": list(linear.weight.shape), "nested_blocksize": 256, "nested_dtype": "float32",
                    "nested_offset": 0.061527371406555176}  # the scales' mean, an fp32 value: its length is typical
        self.metadata = frozen(len(json.dumps(metadata)), torch.uint8)  # bitsandbytes stores this JSON as uint8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DequantizingMatmul.apply(x, self.weight, self.absmax, self.out_features, self.compute_dtype,
                                        self.bias)


class DequantizingMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, absmax, out_features, dtype, bias):
        ctx.save_for_backward(codes, absmax)  # model state: the saved-tensor meters pass it through
        ctx.shape, ctx.dtype = (out_features, x.shape[-1]), dtype
        return nn.functional.linear(x, dequantized(codes, absmax, ctx.shape, dtype).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        codes, absmax = ctx.saved_tensors
        return grad @ dequantized(codes, absmax, ctx.shape, ctx.dtype).to(grad.dtype), None, None, None, None, None


def dequantized(codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The allocations of bitsandbytes' ``dequantize_4bit`` (values meaningless): the block scales in fp32, then
    the weight."""
    scales = absmax.float()
    weight = torch.empty(shape, dtype=dtype, device=codes.device)
    del scales
    return weight


def lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under the names PEFT writes (``base_model.model.<module>.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {f"base_model.model.{key}": whole(value).detach().cpu().contiguous() for key, value in state.items()}


def save_adapter(model: nn.Module, directory: str | Path, *, write: bool = True) -> Path:
    """Save the adapters of a model with lora applied in PEFT's format, naming their base:
    ``AutoPeftModelForCausalLM.from_pretrained(directory)`` or ``PeftModel.from_pretrained(base, directory)``
    load them. ``adapter_config.json``'s ``base_model_name_or_path`` is the base's hub id or absolute directory;
    ``lowmem_base.json`` adds what PEFT's config cannot hold (the base's GGUF file and load dtype). A sharded
    model (trainer=fsdp): every rank calls it (the adapter weights are gathered), the one with ``write`` writes."""
    from safetensors.torch import save_file

    model = adapted_model(model)
    directory = Path(directory)
    state = adapter_state_dict(model)
    if write:
        source = source_of(model)
        config = model.peft_config[ADAPTER]
        config.base_model_name_or_path = source["base_model_name_or_path"]
        if causal_lm_of(model) is not None:
            config.task_type = "CAUSAL_LM"  # AutoPeftModelForCausalLM reads it to choose the base's class
        config.save_pretrained(str(directory))
        save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        (directory / BASE_NOTE).write_text(json.dumps(source, indent=2) + "\n")
    return directory


@torch.no_grad()
def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """The frozen weight in float32, read without side effects (PEFT's helper re-places an int8 weight on the
    CPU, which drops its scales: the layer's next forward then fails)."""
    weight = linear.weight
    if not type(weight).__module__.startswith("bitsandbytes"):
        return weight.detach().float()
    import bitsandbytes as bnb

    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    codes = linear.state.CB if linear.state.CB is not None else weight.data  # an Int8Params
    scales = linear.state.SCB if linear.state.SCB is not None else weight.SCB
    return bnb.functional.int8_vectorwise_dequant(codes, scales).float()


def merged_weight(layer) -> torch.Tensor:
    """Base weight (dequantized) plus the adapter's update; for DoRA rescaled row-wise to its magnitude."""
    base = dequantized_weight(layer.get_base_layer())
    combined = base + layer.get_delta_weight(ADAPTER).float()
    if layer.use_dora.get(ADAPTER):
        magnitude = layer.lora_magnitude_vector[ADAPTER].weight.float()
        combined = combined * (magnitude / combined.norm(p=2, dim=1)).unsqueeze(1)
    return combined


def merged_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapted layer merged; the trained model is not changed."""
    layers = dict(lora_layers(model))
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in layers):
            continue  # inside an adapted layer: its merged weight stands for it
        prefix = f"{name}." if name else ""
        if name in layers:
            state[prefix + "weight"] = merged_weight(module).to(dtype)
            bias = module.get_base_layer().bias
            if bias is not None:
                state[prefix + "bias"] = bias.detach().to(dtype)
            continue
        for key, value in module.named_parameters(recurse=False):
            state[prefix + key] = value.detach()
        for key, value in module.named_buffers(recurse=False):
            if key not in module._non_persistent_buffers_set:
                state[prefix + key] = value
    return {key: value.cpu().contiguous() for key, value in state.items()}


def save_merged(model: nn.Module, directory: str | Path) -> Path:
    """Save base + adapters merged as a Hugging Face model directory (``AutoModelForCausalLM.from_pretrained``)."""
    model = adapted_model(model)
    if not hasattr(model, "save_pretrained"):
        raise StrategyError(f"strategy 'lora': save_merged needs a Hugging Face model; {type(model).__name__} is not one")
    dtype = getattr(model.config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    directory = Path(directory)
    model.save_pretrained(str(directory), state_dict=merged_state_dict(model, dtype))
    # The directory is a plain model: no trace of the adapters' PEFT config.
    (directory / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((directory / "config.json").read_text()).items() if k != "peft_config"},
        indent=2) + "\n")
    return directory


class SaveAdapters(L.Callback):
    """At the end of training: ``<run_dir>/adapter`` (PEFT format) and, if asked, ``<run_dir>/merged``."""

    def __init__(self, merged: bool):
        self.merged = merged

    def on_train_end(self, trainer, pl_module):
        run_dir = Path(trainer.default_root_dir)
        save_adapter(pl_module.model, run_dir / ADAPTER_DIR, write=trainer.is_global_zero)
        if self.merged and trainer.is_global_zero:
            save_merged(pl_module.model, run_dir / MERGED_DIR)
