"""chunked_ce: the causal-LM loss from hidden states in chunks equals the plain loss, keeps far less, and
works through the trainer's loss head, a plain loop, sample selection and the other strategies."""

import copy

import pytest
import torch
from torch import nn
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from conftest import compose_config, run_cli
from lowmem_train import SavedBytesMeter, StrategyError, apply_strategies, get_strategy_class
from lowmem_train.causal_lm import CausalLMWithLossHead, LogitSettings, sample_statistics
from lowmem_train.strategies.chunked_ce import ChunkedCrossEntropyHead, ChunkedLinearCrossEntropy
from lowmem_train.training import TrainingModule, build_recipe
from strategy_settings import STRATEGY_SETTINGS
from tiny_models import tiny_cnn

VOCAB = 96
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False)),
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=True)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                               eos_token_id=0)),
    "gemma2_softcap": lambda: Gemma2ForCausalLM(Gemma2Config(**SHAPE, head_dim=8, final_logit_softcapping=3.0)),
    "cohere_logit_scale": lambda: CohereForCausalLM(CohereConfig(**SHAPE, logit_scale=0.5)),
}


def batch(masked: bool, batch_size: int = 3, seq_len: int = 20):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=generator)
    labels = ids.clone()
    if masked:  # prompt masking: a different prompt length per sample
        for i in range(batch_size):
            labels[i, : 4 + 3 * i] = -100
    return ids, labels


def loss_and_grads(model, run):
    loss = run(model)
    loss.backward()
    return loss.detach(), {n.removeprefix("causal_lm."): p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def assert_equal_to_plain(expected, got):
    (loss, grads), (plain_loss, plain_grads) = got, expected
    assert abs(float(loss) / float(plain_loss) - 1) <= 1e-5
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        cosine = nn.functional.cosine_similarity(grad.flatten().double(), plain_grads[name].flatten().double(), dim=0)
        assert cosine >= 0.99999, f"grad cosine of {name}: {cosine}"


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_loss_and_gradients_equal_the_plain_path(kind, masked, native):
    torch.manual_seed(0)
    plain = MODELS[kind]()
    ids, labels = batch(masked)
    expected = loss_and_grads(plain, lambda m: m(input_ids=ids, labels=labels).loss)
    options = {"chunked_ce": {"chunk_size": 7, "native": native}}  # 60 tokens: 9 chunks, the last one short

    loop = apply_strategies(copy.deepcopy(plain), options)  # a plain loop on the Hugging Face model
    assert_equal_to_plain(expected, loss_and_grads(loop, lambda m: m(input_ids=ids, labels=labels).loss))

    def trainer_loss(model):  # the recipe's model: the loss head inside, reduced as the trainer does
        output = model(input_ids=ids, labels=labels)
        return output.per_sample_loss.sum() / output.per_sample_count.sum()

    wrapped = apply_strategies(CausalLMWithLossHead(copy.deepcopy(plain)), options)
    assert_equal_to_plain(expected, loss_and_grads(wrapped, trainer_loss))
    assert wrapped.loss_head.native == (native and kind != "gemma2_softcap")  # torch's op cannot soft-cap


def test_plain_loop_gets_the_loss_without_logits_and_keeps_its_state_dict():
    torch.manual_seed(0)
    model = MODELS["llama"]()
    keys = list(model.state_dict())
    ids, labels = batch(masked=True)
    apply_strategies(model, "chunked_ce")
    output = model(input_ids=ids, labels=labels, use_cache=False)
    assert output.logits is None and output.loss.requires_grad
    assert model(input_ids=ids).logits.shape == (3, 20, VOCAB)  # without labels: the model's own forward
    assert list(model.state_dict()) == keys
    assert apply_strategies(model, "chunked_ce") is model and isinstance(model.loss_head, nn.Module)


def test_bf16_accumulates_in_fp32():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=generator)
    weight = torch.randn(VOCAB, 32, generator=generator) * 3
    targets = torch.randint(0, VOCAB, (64,), generator=generator)
    reference = nn.functional.cross_entropy((hidden.double() @ weight.double().T), targets, reduction="none")
    low = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    own = ChunkedLinearCrossEntropy.apply(*low, None, targets, 16, LogitSettings())
    assert own.dtype == torch.float32
    # bf16 matmul, fp32 logsumexp: off by the bf16 rounding of the logits only, not of the sums
    plain = nn.functional.cross_entropy((low[0] @ low[1].T).float(), targets, reduction="none")
    torch.testing.assert_close(own, plain, rtol=1e-5, atol=1e-5)
    assert float((own.detach().double() - reference).abs().mean() / reference.abs().mean()) < 0.01
    own.sum().backward()
    exact = hidden.clone().requires_grad_()
    nn.functional.cross_entropy(exact @ weight.T, targets, reduction="sum").backward()
    cosine = nn.functional.cosine_similarity(low[0].grad.float().flatten(), exact.grad.flatten(), dim=0)
    assert low[0].grad.dtype == torch.bfloat16 and cosine > 0.999
    embeddings = nn.Linear(32, VOCAB, bias=False).bfloat16()
    with torch.no_grad():
        embeddings.weight.copy_(low[1])
    head = ChunkedCrossEntropyHead(LogitSettings(), chunk_size=16, native=True)  # torch's op: bf16 per-token losses
    labels = torch.cat([targets[:1], targets]).unsqueeze(0)  # shifted by the head: ``targets``, then none
    padded = torch.cat([low[0].detach(), low[0].new_zeros(1, 32)]).unsqueeze(0)  # the position without a target
    native = head(padded, labels, embeddings)
    assert head.native and native.per_sample_loss.dtype == torch.float32
    torch.testing.assert_close(native.per_sample_loss, own.detach().sum().unsqueeze(0), rtol=5e-3, atol=0)


def llama_recipe(*overrides):
    cfg = compose_config("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=64",
                         "data.batch_size=8", "model.config.vocab_size=4096", *overrides)
    return build_recipe(cfg)


def plain_and_chunked(recipe, chunk_size: int):
    """The recipe's model, and a copy of it with chunked_ce applied."""
    torch.manual_seed(0)
    plain = recipe.build_model()
    return plain, apply_strategies(copy.deepcopy(plain), {"chunked_ce": {"chunk_size": chunk_size}})


def test_saved_bytes_of_the_loss_path_fall_more_than_20x():
    recipe = llama_recipe()
    model, chunked = plain_and_chunked(recipe, 128)
    ids = torch.randint(0, 4096, (8, 64))
    hidden = torch.randn(8, 64, 64, requires_grad=True)  # the loss path alone: from the last hidden states
    saved, total = {}, {}
    for name, m in (("plain", model), ("chunked", chunked)):
        with SavedBytesMeter(m) as meter:
            output = m.loss_head(hidden, ids, m.get_output_embeddings())
        saved[name] = meter.bytes + sum(t.nbytes for t in (output.per_sample_loss, output.per_sample_count))
        with SavedBytesMeter(m) as meter:
            recipe.forward(m, {"input_ids": ids, "labels": ids})
        total[name] = meter.bytes
    assert saved["chunked"] * 20 <= saved["plain"], saved
    assert total["plain"] - total["chunked"] >= 0.9 * (saved["plain"] - saved["chunked"]), total


def test_trainer_path_never_calls_the_output_embedding_in_training_or_validation():
    recipe = llama_recipe()
    model = apply_strategies(recipe.build_model(), "chunked_ce")
    model.get_output_embeddings().forward = None  # full logits would call it
    ids = torch.randint(0, 4096, (4, 64))
    output = recipe.forward(model, {"input_ids": ids, "labels": ids})
    assert output.logits is None and output.per_sample_count.tolist() == [63] * 4
    metrics, size = recipe.validation_step(model, {"input_ids": ids, "labels": ids})
    assert size == 4 and torch.isclose(metrics["val/loss"], output.mean_loss().detach())


def test_trainer_reduces_token_loss_sums_over_target_tokens():
    recipe = llama_recipe()
    module = TrainingModule(recipe, apply_strategies(recipe.build_model(), "chunked_ce"), [], None)
    ids = torch.randint(0, 4096, (4, 64))
    loss = module.training_step({"input_ids": ids, "labels": ids}, 0)
    output = module.last_output
    assert output.logits is None and not output.per_sample_loss.requires_grad
    torch.testing.assert_close(loss.detach(), output.per_sample_loss.sum() / (4 * 63))


def test_skip_backward_skips_by_confidence_with_chunked_ce():
    recipe = llama_recipe()
    plain, model = plain_and_chunked(recipe, 100)
    ids = torch.randint(0, 4096, (8, 64))
    with torch.no_grad(), sample_statistics():
        stats = {name: m(input_ids=ids, labels=ids).sample_stats for name, m in (("plain", plain), ("chunked", model))}
    for key in stats["plain"]:  # chunk by chunk: the same per-sample statistics as from the full logits
        torch.testing.assert_close(stats["chunked"][key], stats["plain"][key], rtol=1e-4, atol=1e-6)

    skip = get_strategy_class("skip_backward")({"warmup_steps": 0, "max_skip": 0.9})
    skip.state.warming_up = False
    confidence = stats["chunked"]["confidence_margin"]
    skip.state.threshold = float(confidence.median())
    module = TrainingModule(recipe, model, [skip], None)
    forwarded = []
    model.causal_lm.base_model.register_forward_hook(
        lambda m, args, kwargs, out: forwarded.append((len(kwargs["input_ids"]), torch.is_grad_enabled())),
        with_kwargs=True)
    module.training_step({"input_ids": ids, "labels": ids}, 0).backward()
    kept = skip.state.pending[:, 2] == 0
    assert torch.equal(kept, confidence <= skip.state.threshold) and 0 < kept.sum() < 8
    assert forwarded == [(8, False), (int(kept.sum()), True)]  # scoring pass, then the unsure samples only
    torch.testing.assert_close(skip.state.pending[:, 1].float(), stats["plain"]["logit_grad_norm"])


def test_logit_grad_norm_is_the_norm_of_the_sample_loss_gradient():
    torch.manual_seed(0)
    model = CausalLMWithLossHead(MODELS["llama"]())
    ids, labels = batch(masked=True)
    with sample_statistics():
        norm = model(input_ids=ids, labels=labels).sample_stats["logit_grad_norm"]
    logits = model(input_ids=ids).logits.detach().requires_grad_()
    per_token = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    (grad,) = torch.autograd.grad(per_token.sum(), logits)
    torch.testing.assert_close(norm, grad.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("other", ["checkpoint", "selective_checkpoint", "compress", "approx_bp", "offload",
                                   "velora", "skip_backward", "compile"])
def test_composes_with_other_strategies(other):
    torch.manual_seed(0)
    plain = MODELS["llama"]()
    ids, labels = batch(masked=True)
    run = lambda m: m(input_ids=ids, labels=labels, use_cache=False).loss  # noqa: E731
    alone = apply_strategies(copy.deepcopy(plain), {other: STRATEGY_SETTINGS[other]["options"]})
    both = apply_strategies(copy.deepcopy(plain), {other: STRATEGY_SETTINGS[other]["options"],
                                                   "chunked_ce": {"chunk_size": 16}})
    torch.manual_seed(3)
    expected = loss_and_grads(alone, run)
    torch.manual_seed(3)
    got = loss_and_grads(both, run)
    assert got[1].keys() == expected[1].keys()
    bound = 0.99999 if get_strategy_class(other).exact else STRATEGY_SETTINGS[other]["min_grad_cosine"]
    for name, grad in got[1].items():
        cosine = nn.functional.cosine_similarity(grad.flatten(), expected[1][name].flatten(), dim=0)
        assert cosine >= bound, f"{other}+chunked_ce: grad cosine of {name} is {cosine}"


def test_checkpoint_and_chunked_ce_train_through_the_trainer(tmp_path):
    from lowmem_train.training import train

    tiny = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=64", "data.batch_size=4",
            "data.num_samples=16", "trainer=debug", "model.config.vocab_size=4096")
    reports = {name: train(compose_config(*tiny, f"strategy={name}", run_dir=tmp_path / name.strip("[]")))
               for name in ("checkpoint", "[checkpoint,chunked_ce]")}
    plain, chunked = reports["checkpoint"], reports["[checkpoint,chunked_ce]"]
    assert chunked["modules_touched"] == {"chunked_ce": 1, "checkpoint": 4}
    assert chunked["final_train_loss"] == pytest.approx(plain["final_train_loss"], rel=1e-4)
    assert chunked["activation_bytes"] * 4 < plain["activation_bytes"]


@pytest.mark.parametrize("model, options, message", [
    (tiny_cnn, {}, "strategy 'chunked_ce': TinyResNet is not a causal language model"),
    (MODELS["llama"], {"chunk_size": 0}, "strategy 'chunked_ce': chunk_size=0 must be > 0"),
    # shifted targets and an unscaled head would give T5 a wrong loss: refused, not converted
    (lambda: T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1)), {},
     "strategy 'chunked_ce': T5ForConditionalGeneration is an encoder-decoder model, not a causal language model"),
])
def test_bad_input_is_a_strategy_error(model, options, message):
    with pytest.raises(StrategyError, match=message):
        apply_strategies(model(), {"chunked_ce": options})


def test_unsupported_logit_transform_is_refused_by_name():
    model = MODELS["llama"]()
    model.config.dim_model_base = 256
    with pytest.raises(StrategyError, match="config dim_model_base"):
        apply_strategies(model, "chunked_ce")


def test_cli_refuses_a_non_language_model_recipe_before_training(tmp_path):
    result = run_cli("recipe=cifar_resnet", "strategy=chunked_ce", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("lowmem-train: error:")]
    assert len(errors) == 1 and "strategy 'chunked_ce': ResNet is not a causal language model" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_wrapped_models_keep_the_chunked_loss(kind):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["c_attn"] if kind == "gpt2" else ["q_proj", "v_proj"],
                      init_lora_weights=False)
    plain = get_peft_model(MODELS[kind](), lora)
    ids, labels = batch(masked=True)
    expected = loss_and_grads(plain, lambda m: m(input_ids=ids, labels=labels).loss)
    loop = apply_strategies(copy.deepcopy(plain), "chunked_ce")  # PEFT around the causal LM, in a plain loop
    assert_equal_to_plain(expected, loss_and_grads(loop, lambda m: m(input_ids=ids, labels=labels).loss))
    wrapped = CausalLMWithLossHead(MODELS[kind]())
    wrapped.causal_lm = get_peft_model(wrapped.causal_lm, lora)  # PEFT inside the recipe's model
    wrapped.causal_lm.load_state_dict(plain.state_dict())
    apply_strategies(wrapped, "chunked_ce")
    output = wrapped(input_ids=ids, labels=labels)
    torch.testing.assert_close(output.per_sample_loss.sum() / output.per_sample_count.sum(), expected[0])
