"""LoRA / DoRA / QLoRA: frozen base, adapters saved in PEFT's format, merged saves, composition, resume."""

import os
import re
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from conftest import compose_config, read_report
from lowmem_train import StrategyError, apply_strategies
from lowmem_train.causal_lm import CausalLMWithLossHead
from lowmem_train.recipes.llama_finetune import LlamaFinetune
from lowmem_train.strategies.lora import (block_linears, lora_layers, merged_state_dict, quantized_linear, save_adapter,
                                          save_merged)
from lowmem_train.training import train
from tiny_models import tiny_llama_config, transformer_batch

pytestmark = pytest.mark.filterwarnings("ignore:strategy 'lora' also acts on the training loop")


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return CausalLMWithLossHead(LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128)))


def loss_of(model, ids):
    output = model(input_ids=ids, labels=ids)
    return output.per_sample_loss.sum() / output.per_sample_count.sum()


def trained_adapters(model):
    """Give the adapters non-zero updates (B starts at zero, which would hide a wrong reload)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def quantize_like_lora(base, quantize):
    """The base model as the strategy stores it, for PEFT to load adapters onto (QLoRA's base)."""
    for name, module in block_linears(base):
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, quantized_linear(module, quantize))
    setattr(base, "is_loaded_in_4bit" if quantize == "nf4" else "is_loaded_in_8bit", True)
    return base


@pytest.mark.parametrize("quantize,dora", [("none", False), ("none", True), ("nf4", False), ("nf4", True),
                                           ("int8", False)])
def test_adapters_reload_with_peft_and_merged_model_matches(tmp_path, quantize, dora):
    from peft import PeftModel

    model = tiny_lm()
    model.causal_lm.save_pretrained(tmp_path / "base")
    apply_strategies(model, {"lora": {"r": 4, "quantize": quantize, "use_dora": dora}})
    trained_adapters(model)
    model.eval()
    ids = transformer_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    save_merged(model, tmp_path / "merged")

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    if quantize != "none":
        base = quantize_like_lora(base, quantize)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
        # int8 multiplies with int8 activations too; the merged model is the dequantized weights in float
        atol = 2e-2 if quantize == "int8" else 1e-5
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=atol)
    assert not any("lora" in key for key in merged.state_dict())


def test_dora_merge_equals_peft_merge_and_unload(tmp_path):
    from peft import PeftModel

    model = tiny_lm()
    model.causal_lm.save_pretrained(tmp_path / "base")
    apply_strategies(model, {"lora": {"r": 4, "use_dora": True}})
    trained_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    save_merged(model, tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    by_peft = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert ours.keys() == by_peft.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], by_peft[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_base_is_frozen_quantized_and_only_adapters_get_gradients(quantize):
    import bitsandbytes as bnb

    model = tiny_lm()
    plain = sum(p.numel() * p.element_size() for _, m in block_linears(model) for p in m.parameters())
    apply_strategies(model, {"lora": {"r": 4, "quantize": quantize}})
    loss_of(model, transformer_batch()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    bases = [m.get_base_layer() for _, m in lora_layers(model)]
    if quantize == "nf4":
        assert all(isinstance(b, bnb.nn.Linear4bit) for b in bases)
        stored = sum(b.weight.numel() * b.weight.element_size() for b in bases)
        assert stored <= plain / 7  # 4-bit codes instead of fp32


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_an_eval_pass_changes_neither_adapter_gradients_nor_the_merged_weights(quantize):
    """Lightning validates between training steps; a quantized layer must train the same afterwards."""
    model = tiny_lm()
    apply_strategies(model, {"lora": {"r": 4, "quantize": quantize}})
    trained_adapters(model)
    ids = transformer_batch()

    def gradients_and_merge():
        model.zero_grad()
        loss_of(model, ids).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return grads, merged_state_dict(model.causal_lm, torch.float32)

    before = gradients_and_merge()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = gradients_and_merge()
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("other,exact", [
    ("checkpoint", True), ("selective_checkpoint", True), ("offload", True), ("chunked_ce", True),
    ("compress", False), ("approx_bp", False), ("velora", False)])
def test_qlora_composes_with_activation_strategies(other, exact):
    """QLoRA (NF4 base) + each activation strategy: the adapters' gradients equal QLoRA alone's (exact
    strategies) or point the same way (lossy ones: compress 4-bit, approx_bp, VeLoRA on lora_A)."""
    options = {"compress": {"bits": 4, "min_numel": 256}, "velora": {"groups": 16},
               "selective_checkpoint": {"memory_budget": 0.5}, "chunked_ce": {"chunk_bytes": 8 * 96 * 4}}.get(other, {})
    ids = transformer_batch()

    def adapter_grads(spec):
        model = tiny_lm()
        apply_strategies(model, spec)
        trained_adapters(model)
        torch.manual_seed(7)
        loss_of(model, ids).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    alone = adapter_grads({"lora": {"r": 4, "quantize": "nf4"}})
    combined = adapter_grads([{"lora": {"r": 4, "quantize": "nf4"}}, {other: options}])
    assert combined.keys() == alone.keys()
    for name, grad in combined.items():
        assert torch.isfinite(grad).all(), name
        if exact:
            torch.testing.assert_close(grad, alone[name], rtol=1e-4, atol=1e-6, msg=name)
    if not exact:
        flat = torch.cat([g.flatten() for g in combined.values()])
        reference = torch.cat([alone[n].flatten() for n in combined])
        assert torch.nn.functional.cosine_similarity(flat, reference, dim=0) > 0.8


@pytest.mark.parametrize("options,message", [
    ({"quantize": "fp4"}, "quantize=fp4; valid: none, nf4, int8"),
    ({"quantize": "int8", "use_dora": True}, "use_dora=true cannot be combined with quantize=int8"),
    ({"target_modules": ["Conv2d"]}, "target_modules pattern 'Conv2d' matches no module of LlamaForCausalLM; near: "),
    ({"r": 0}, "r=0 must be >= 1"),
])
def test_bad_lora_options_are_one_line_errors(options, message):
    with pytest.raises(StrategyError, match=re.escape(message)):
        apply_strategies(tiny_lm(), {"lora": options})


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(StrategyError, match=r"needs bitsandbytes: pip install 'lowmem-train\[lora\]'"):
        apply_strategies(tiny_lm(), {"lora": {"quantize": "nf4"}})


def test_lora_on_a_model_that_already_has_adapters_is_refused():
    model = tiny_lm()
    apply_strategies(model, {"lora": {"r": 4}})
    del model.__dict__["_lowmem_applied"]  # as if another tool had put the adapters there
    with pytest.raises(StrategyError, match="already carries PEFT adapters"):
        apply_strategies(model, {"lora": {"r": 8}})


QLORA_RUN = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.num_samples=24", "data.batch_size=4",
             "data.seq_len=32", "trainer.max_epochs=5", "logger=csv", "trainer=debug", "trainer.enable_checkpointing=true", "strategy=[lora,checkpoint]",
             "strategy.lora.quantize=nf4", "strategy.lora.r=4", "optimizer.lr=0.01")


def test_qlora_run_reports_frozen_split_saves_adapters_and_resumes_exactly(tmp_path, monkeypatch):
    """Checkpoints hold the adapters only; a run stopped by Ctrl-C after step 3 and resumed continues the
    uninterrupted run's loss curve."""
    whole = train(compose_config(*QLORA_RUN, "trainer.max_steps=8", run_dir=tmp_path / "whole"))
    forward, calls = LlamaFinetune.forward, []

    def interrupted_at_step_3(self, model, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # RunControl stops after this step, with a checkpoint
        return forward(self, model, batch)

    monkeypatch.setattr(LlamaFinetune, "forward", interrupted_at_step_3)
    first = train(compose_config(*QLORA_RUN, "trainer.max_steps=8", run_dir=tmp_path / "first"))
    monkeypatch.setattr(LlamaFinetune, "forward", forward)
    assert first["stopped"]["step"] == 3
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert saved and all(".lora_" in key for key in saved)
    train(compose_config(*QLORA_RUN, "trainer.max_steps=8", f"ckpt_path={checkpoint}", run_dir=tmp_path / "resumed"))

    def losses(run):
        return [float(line.split(",")[1]) for line in (tmp_path / run / "memory.csv").read_text().splitlines()[1:]]
    assert losses("first") + losses("resumed") == losses("whole")

    assert whole["frozen_grad_bytes"] == 0 and whole["frozen_optimizer_state_bytes"] == 0
    assert whole["grad_bytes"] > 0 and whole["optimizer_state_bytes"] > 0
    assert whole["param_bytes"] > whole["frozen_param_bytes"] > 0
    assert (tmp_path / "whole" / "adapter" / "adapter_model.safetensors").is_file()
    assert read_report(tmp_path / "whole")["strategy_report"]["lora"]["adapted_layers"] == 4 * 7  # llama_tiny: 4 blocks x q,k,v,o,gate,up,down


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_bf16_true_halves_the_bytes_and_bf16_mixed_keeps_fp32_weights(tmp_path, quantize):
    """Under bf16-true the trainable and frozen float weights and their gradients are bf16 (half of bf16-mixed,
    which keeps fp32 weights); the optimizer state is fp32 either way (bf16 weights are stepped on fp32 copies:
    low_precision_updates); NF4 codes stay 4-bit either way."""
    run = (*QLORA_RUN[:-2], f"strategy.lora.quantize={quantize}", "strategy.lora.r=4", "trainer.max_steps=3")
    mixed = train(compose_config(*run, "trainer.precision=bf16-mixed", run_dir=tmp_path / "mixed"))
    true = train(compose_config(*run, "trainer.precision=bf16-true", run_dir=tmp_path / "true"))
    assert true["grad_bytes"] * 2 == mixed["grad_bytes"] > 0
    steps = mixed["optimizer_state_bytes"] - 2 * mixed["grad_bytes"]  # AdamW's fp32 step counters
    assert true["optimizer_state_bytes"] == mixed["optimizer_state_bytes"] and 0 < steps < 1024
    trainable = mixed["param_bytes"] - mixed["frozen_param_bytes"]
    assert (true["param_bytes"] - true["frozen_param_bytes"]) * 2 == trainable
    if quantize == "none":
        assert true["frozen_param_bytes"] * 2 == mixed["frozen_param_bytes"]
    else:  # the NF4 codes and their scales do not change with the precision; embeddings and norms halve
        assert mixed["frozen_param_bytes"] / 2 < true["frozen_param_bytes"] < mixed["frozen_param_bytes"]
    assert all(torch.isfinite(torch.tensor(r["final_train_loss"])) for r in (mixed, true))


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_adapters_of_a_bf16_base_train_in_float32(quantize):
    model = tiny_lm().to(torch.bfloat16)
    apply_strategies(model, {"lora": {"r": 4, "quantize": quantize}})
    loss = loss_of(model, transformer_batch())
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trainable)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} <= {torch.bfloat16, torch.uint8}


def test_adapter_initialisation_draws_from_its_own_generator():
    """The model's RNG stream (and so its dropout masks) is the same with and without lora; the same seed
    gives the same adapters whatever the global RNG state, another seed others."""
    def adapters(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    first, second, other_seed = tiny_lm(), tiny_lm(), tiny_lm()
    torch.manual_seed(5)
    apply_strategies(first, {"lora": {"r": 4}})
    after_lora = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_lora)
    apply_strategies(second, {"lora": {"r": 4}})
    apply_strategies(other_seed, {"lora": {"r": 4, "seed": 1}})
    torch.testing.assert_close(adapters(first), adapters(second), rtol=0, atol=0)
    assert not torch.equal(*(next(v for k, v in adapters(m).items() if "lora_A" in k) for m in (first, other_seed)))


@pytest.mark.parametrize("variant", ["lora", pytest.param("dora", marks=pytest.mark.slow),
                                     pytest.param("qlora", marks=pytest.mark.slow)])  # CI time; qlora resumes below
def test_cli_fine_tunes_an_instruction_model_and_its_adapters_reload(tiny_pretrained_llm, tmp_path, variant):
    """Through the CLI on an instruction JSONL: the loss falls; the saved adapters, loaded by PEFT onto the
    base, give the same logits as the merged model saved beside them."""
    from peft import PeftModel

    from conftest import run_cli

    llm, run_dir = tiny_pretrained_llm, tmp_path / "run"
    options = {"lora": [], "dora": ["strategy.lora.use_dora=true"], "qlora": ["strategy.lora.quantize=nf4"]}[variant]
    result = run_cli("recipe=llama_finetune", f"model.name_or_path={llm.model_dir}", "model.dtype=float32",
                     "data.path=json", f"data.data_files={llm.instruct_jsonl}", "data.seq_len=64", "data.batch_size=8",
                     "trainer.max_epochs=6", "optimizer.lr=1e-2", "logger=csv", "strategy=[lora,checkpoint,chunked_ce]",
                     "strategy.lora.save_merged=true", *options, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(line.split(",")[1]) for line in (run_dir / "memory.csv").read_text().splitlines()[1:]]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # 48 steps of rank-8 adapters on a random base

    base = AutoModelForCausalLM.from_pretrained(llm.model_dir)
    if variant == "qlora":
        base = quantize_like_lora(base, "nf4")
    reloaded = PeftModel.from_pretrained(base, run_dir / "adapter")  # train mode: bitsandbytes' CPU eval kernel is bf16
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-4)
        untrained = AutoModelForCausalLM.from_pretrained(llm.model_dir)(input_ids=ids).logits
        assert not torch.allclose(merged(input_ids=ids).logits, untrained, atol=1e-3)  # the adapters trained


def tiny_swin():
    import torchvision
    return torchvision.models.SwinTransformer([4, 4], 16, [2], [2], [4, 4], num_classes=4)


def test_layers_whose_weight_the_parent_reads_get_no_adapter():
    """torchvision's Swin attention reads qkv.weight and proj.weight itself, nn.MultiheadAttention its
    out_proj.weight: an adapter there would never run, so the default leaves them out..."""
    import torchvision
    swin = tiny_swin()
    assert [n.rsplit(".", 1)[-1] for n, _ in block_linears(swin)] == ["0", "3", "0", "3"]  # the MLPs only
    vit = torchvision.models.VisionTransformer(32, 16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    assert not any(n.endswith("out_proj") for n, _ in block_linears(vit))
    apply_strategies(swin, {"lora": {"r": 2}})
    swin(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in swin.parameters() if p.requires_grad)


def test_naming_a_layer_whose_weight_the_parent_reads_is_refused():
    """...and naming one is a one-line error."""
    with pytest.raises(StrategyError, match=r"^strategy 'lora': features.1.0.attn.qkv's weight is read directly by "
                                            r"its parent's forward, so an adapter there would never run; exclude it$"):
        apply_strategies(tiny_swin(), {"lora": {"target_modules": [".*qkv"]}})
