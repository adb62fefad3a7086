"""policygrad.lm.decoder: the packed decoding step computes the model's own next-token logits (float32 to rounding,
bfloat16 autocast within its precision), greedy decoding through it equals decoding through the model's forward, and
a model it does not support, or a failure to build it, leaves decoding to the model's forward."""

from __future__ import annotations

import pytest
import torch
from lm_helpers import add_noise

import policygrad.lm.decoder as decoder
from policygrad.lm.models import load_model
from policygrad.lm.rollout import _cache_argument, _positions, _prefill, autocast_context, generate

pytestmark = pytest.mark.exact

# oneDNN's bfloat16 products need AVX512 (BW, VL, DQ) or AVX-NE-CONVERT; on a CPU without them (an AMD EPYC of the
# Zen 3 family, say) the packed decoder declines bfloat16 by name and the model's forward decodes
BF16_KERNELS = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
NO_BF16 = "this CPU or torch build has no oneDNN bfloat16 products"

TEXTS = ["x", "a longer prompt here", "mid size"]


def _model(folder):
    model, tokenizer = load_model(str(folder))
    tokenizer.padding_side = "left"
    encoded = tokenizer(TEXTS, return_tensors="pt", padding=True)
    return model.eval(), tokenizer, encoded["input_ids"], encoded["attention_mask"]


@pytest.fixture(params=["llama", "qwen2"])  # qwen2: biased q/k/v projections and no chat template
def tiny(request, tiny_llama_chat, tiny_qwen_base):
    return _model(tiny_llama_chat if request.param == "llama" else tiny_qwen_base)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@torch.no_grad()
def test_each_step_gives_the_logits_of_the_models_forward(tiny, dtype):
    """Five decoding steps of both paths on the same tokens, from the same prefill, with a row leaving after two."""
    model, _, ids, mask = tiny
    if dtype is not None and not BF16_KERNELS:
        assert decoder.unsupported(model, torch.device("cpu"), dtype) == NO_BF16  # so generate never builds it
        return
    index = torch.arange(len(TEXTS)).repeat_interleave(2)  # 2 rows per prompt
    tokens = torch.randint(3, 40, (index.shape[0], 5), generator=torch.Generator().manual_seed(0))
    with autocast_context("cpu", dtype):
        _, cache = _prefill(model, ids, mask, index)
        engine = decoder.PackedDecoder(model, _prefill(model, ids, mask, index, copy=False)[1], index, mask, 5, dtype)
        attention, position = mask.index_select(0, index), mask.index_select(0, index).sum(-1)
        rows = torch.arange(index.shape[0])
        for t in range(5):
            if t == 2:  # rows 1 and 4 finished: both paths drop them
                rows = keep = torch.tensor([0, 2, 3, 5])
                cache.reorder_cache(keep)
                engine.keep(keep)
                attention, position = attention[keep], position[keep]
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
            step_tokens = tokens[rows, t]
            ours = engine.step(step_tokens, position)
            theirs = model(
                input_ids=step_tokens[:, None],
                attention_mask=attention,
                position_ids=position[:, None],
                use_cache=True,
                **{_cache_argument(model): cache},
            ).logits[:, -1]
            assert ours.dtype == theirs.dtype
            if dtype is None:  # the same float32 arithmetic, sums in another order
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            else:  # both in bfloat16 (8 bits of mantissa): one rounding step of the largest logit apart, at most
                scale = theirs.float().abs().max()
                assert (ours.float() - theirs.float()).abs().max() <= scale * 2**-7
            position = position + 1


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_greedy_decoding_equals_the_models_forward(tiny, dtype):
    model, tokenizer, ids, mask = tiny
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    with autocast_context("cpu", dtype):
        ours = generate(model, ids, mask, 2, 12, eos, pad, greedy=True, decoder="auto")
        theirs = generate(model, ids, mask, 2, 12, eos, pad, greedy=True, decoder="transformers")
    assert torch.equal(ours, theirs)


def test_weights_changed_between_generations_are_the_ones_decoded(tiny):
    """The packed weights are built for each generation: after an in-place change (an optimiser step) the next
    generation decodes the new weights, as the model's forward does."""
    model, tokenizer, ids, mask = tiny
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    before = generate(model, ids, mask, 1, 12, eos, pad, greedy=True)
    add_noise(model, 0.5, seed=1)
    after = generate(model, ids, mask, 1, 12, eos, pad, greedy=True)
    assert not torch.equal(before, after)
    assert torch.equal(after, generate(model, ids, mask, 1, 12, eos, pad, greedy=True, decoder="transformers"))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's call into transformers
def test_what_the_decoder_does_not_support_is_named(tiny_llama_chat):
    model, *_ = _model(tiny_llama_chat)
    cpu = torch.device("cpu")
    assert decoder.unsupported(model, cpu) is None
    assert decoder.unsupported(model, cpu, torch.bfloat16) == (None if BF16_KERNELS else NO_BF16)
    assert "CPUs" in decoder.unsupported(model, torch.device("cuda"))
    assert "float16" in decoder.unsupported(model, cpu, torch.float16)
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: output)
    assert "hooks" in decoder.unsupported(model, cpu)
    handle.remove()
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert "LoRA" in decoder.unsupported(lora.base_model.model, cpu)


def test_a_decoder_that_fails_to_build_warns_and_the_model_decodes(tiny_llama_chat, monkeypatch):
    model, tokenizer, ids, mask = _model(tiny_llama_chat)
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    expected = generate(model, ids, mask, 1, 12, eos, pad, greedy=True, decoder="transformers")

    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(decoder.PackedDecoder, "__init__", broken)
    with pytest.warns(RuntimeWarning, match="packed decoder failed .*no oneDNN here.*model's forward"):
        assert torch.equal(generate(model, ids, mask, 1, 12, eos, pad, greedy=True), expected)


def test_an_unknown_decoder_name_is_refused(tiny_llama_chat):
    model, tokenizer, ids, mask = _model(tiny_llama_chat)
    with pytest.raises(ValueError, match="decoder must be 'auto' or 'transformers', got 'vllm'"):
        generate(model, ids, mask, 1, 4, [tokenizer.eos_token_id], tokenizer.pad_token_id, decoder="vllm")


def test_positions_count_from_each_rows_first_token():
    assert _positions(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
