"""Float32 compute over 16-bit-held weights (convqa.infer.float32_compute): for every supported
architecture, a BF16 checkpoint held in bfloat16 (and an F16 one in float16) computes the logits
of the same checkpoint upcast to float32, bit for bit, in the prefill and in a decode step from the
KV cache, while every matrix stays in 16 bits. Real transformers models (deterministic synthetic
checkpoints)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from convqa.infer.float32_compute import ROWS_PER_SLICE, float32_compute, hold_for_float32_compute, sliced_linear

IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 12, 77, 5, 3, 8, 100, 200, 31, 4, 2]])
ARCHITECTURES = ["qwen2.5-tiny-bf16", "llama-tiny", "qwen3-tiny", "mistral-tiny", "gemma3-tiny", "gemma2-tiny",
                 "phi3-tiny", "qwen3-moe-tiny"]


def load(directory, dtype):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="eager").eval()


def prefill_and_decode(model, enabled: bool):
    with torch.inference_mode(), float32_compute(enabled):
        out = model(input_ids=IDS, use_cache=True)
        step = model(input_ids=IDS[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    return out.logits[0], step.logits[0]


@pytest.mark.parametrize("preset,dtype", [(preset, "bfloat16") for preset in ARCHITECTURES]
                         + [("qwen2-tiny", "float16"), ("gemma3-tiny", "float16")])
def test_16_bit_held_weights_compute_the_float32_model_bit_for_bit(synthetic_dir, preset, dtype):
    torch.set_num_threads(1)
    directory = synthetic_dir(preset, dtype)
    upcast = load(directory, torch.float32)
    held = load(directory, getattr(torch, dtype))
    hold_for_float32_compute(held)
    assert {p.dtype for p in held.parameters() if p.ndim >= 2} == {getattr(torch, dtype)}
    (prefill, step), (prefill32, step32) = prefill_and_decode(held, True), prefill_and_decode(upcast, False)
    assert prefill.dtype == torch.float32
    assert torch.equal(prefill, prefill32) and torch.equal(step, step32), (
        (prefill - prefill32).abs().max(), (step - step32).abs().max())
    # The same held weights through torch's 16-bit kernels (the mode off) round the activations.
    held.to(getattr(torch, dtype))
    assert not torch.equal(prefill_and_decode(held, False)[0].float(), prefill32)


def test_sliced_linear_equals_the_upcast_weight_across_slices():
    """More rows than one slice, a bias, and a batch of positions: each output column's sum is the
    same as with the whole weight upcast (only the columns are split)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2 * ROWS_PER_SLICE + 37, 96, generator=generator).to(torch.bfloat16)
    bias = torch.randn(weight.shape[0], generator=generator).to(torch.bfloat16)
    x = torch.randn(1, 5, 96, generator=generator)
    expected = torch.nn.functional.linear(x, weight.float(), bias.float())
    assert torch.equal(sliced_linear(x, weight, bias), expected)
    with float32_compute():
        assert torch.equal(torch.nn.functional.linear(x, weight, bias), expected)
        assert torch.nn.functional.embedding(torch.tensor([3, 1]), weight).dtype == torch.float32
        assert x.to(torch.bfloat16).dtype == torch.float32  # an activation keeps float32
