"""The architecture registry (convqa.arch.registry) against real transformers models, gguf-py's
tables, llama.cpp and transformers' GGUF loader, one tiny synthetic preset per architecture.

Per architecture: the registry's HF names are the names the real HF class produces; its
HF<->GGUF map is a bijection onto gguf-py's tensors of that architecture; the preset converts
along all six edges with every tensor bit-exact and the config unchanged; S, A and G (through
transformers' GGUF loader) give the source's logits bit for bit, llama.cpp within its kernel
tolerance. Then what must fail: configs and plans llama.cpp cannot run as written, and the
per-architecture mutants, named by the comparator's diagnosis.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest

from convqa.arch import expected_tensors, registry
from convqa.arch.hf_config import config_from_hf, hf_config_from
from convqa.compare.tensors import _value_diagnosis, compare_models
from convqa.convert.builtin import convert
from convqa.errors import ConversionError, FormatError
from convqa.formats import open_model
from convqa.sources.synthetic import SYNTHETIC_PRESETS

# The tiny preset of each registry architecture.
PRESETS = {"qwen2": "qwen2-tiny", "llama": "llama-tiny", "qwen3": "qwen3-tiny", "mistral": "mistral-tiny",
           "gemma3": "gemma3-tiny", "gemma2": "gemma2-tiny", "phi3": "phi3-tiny", "qwen3_moe": "qwen3-moe-tiny"}  # fmt: skip
NEW = ["qwen3", "mistral", "gemma3", "gemma2", "phi3", "qwen3_moe"]
PROMPT = list(range(5, 45))  # 40 positions: longer than gemma's 8-token sliding window
def llama_cpp_max_rel(name: str) -> float:
    """config/config.yaml's native llama.cpp tolerance, `native@<architecture>` where it has one
    (gemma: ggml's GELU reads its input through an F16 table)."""
    from pathlib import Path

    import yaml

    tolerances = yaml.safe_load((Path(__file__).parent.parent / "config" / "config.yaml").read_text())["inference"]["tolerances"]
    return (tolerances.get(f"native@{name}") or tolerances["native"])["llama.cpp"]["max_rel_dlogit"]


def test_every_architecture_has_a_preset():
    assert set(PRESETS) == set(registry.SUPPORTED)
    assert {SYNTHETIC_PRESETS[p]["architecture"] for p in PRESETS.values()} == set(registry.SUPPORTED)


@pytest.mark.parametrize("name", registry.SUPPORTED)
def test_registry_names_are_the_real_hf_models(name, synthetic_dir):
    """The roles the registry declares are exactly the state_dict of the HF class, built by
    transformers from the preset's own config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = synthetic_dir(PRESETS[name])
    with open_model(path) as model:
        hf = hf_config_from(model.config, model.tokenizer)
    settings = dict(hf)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    real = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert type(real).__name__ == registry.get(name).hf_class
    names = set(real.state_dict())
    if registry.get(name).expert_roles:
        # transformers 5.23 fuses experts in memory (3-D gate_up_proj); save_pretrained writes
        # the Hub's per-expert tensors, which is what a checkpoint holds
        from safetensors import safe_open

        real.save_pretrained(path.parent / "resaved")
        with safe_open(path.parent / "resaved" / "model.safetensors", "np") as f:
            names = set(f.keys())
    if config.tie_word_embeddings:
        names.discard("lm_head.weight")
    with open_model(path) as model:
        assert names == set(expected_tensors(model.config)) == set(model.tensors)


@pytest.mark.parametrize("name", registry.SUPPORTED)
def test_gguf_names_are_a_bijection_onto_gguf_py(name):
    arch = registry.get(name)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch.gguf_arch]}
    config = open_config(name)
    seen = {}
    for hf in expected_tensors(config):
        g = registry.hf_to_gguf(arch, hf)
        assert g is not None, hf
        assert re.sub(r"^blk\.\d+\.", "blk.{bid}.", g.rsplit(".", 1)[0]) in allowed, g
        assert registry.gguf_to_hf(arch, g) == hf
        assert g not in seen, f"{hf} and {seen.get(g)} both map to {g}"
        seen[g] = hf


def test_gemma_norms_are_not_llamas():
    """One HF name, two GGUF meanings: the raw alias map is why a per-architecture table is needed."""
    name = "model.layers.0.post_attention_layernorm.weight"
    assert registry.hf_to_gguf(registry.get("llama"), name) == "blk.0.ffn_norm.weight"
    assert registry.hf_to_gguf(registry.get("gemma3"), name) == "blk.0.post_attention_norm.weight"
    assert registry.gguf_to_hf(registry.get("gemma3"), "blk.0.ffn_norm.weight") == "model.layers.0.pre_feedforward_layernorm.weight"


def open_config(name):
    preset = SYNTHETIC_PRESETS[PRESETS[name]]
    from convqa.model import ModelConfig

    heads, hidden = preset["num_heads"], preset["hidden_size"]
    return ModelConfig(
        architecture=name, vocab_size=preset["vocab_size"], hidden_size=hidden, intermediate_size=preset["intermediate_size"],
        num_layers=preset["num_layers"], num_heads=heads, num_kv_heads=preset["num_kv_heads"],
        head_dim=preset.get("head_dim") or hidden // heads, max_position_embeddings=256, rope_theta=1e4, rms_norm_eps=1e-6,
        tie_word_embeddings=preset["tie_word_embeddings"],
    )


@pytest.fixture(scope="module")
def six_edges(tmp_path_factory):
    """Per new architecture: its preset converted along S->G, S->A, G->A, A->G, G->S, A->S."""
    from convqa.sources.synthetic import build_preset

    made = {}

    def make(name):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            src = build_preset(root / "source", PRESETS[name])
            out = {"S": src, "G": root / "sg.gguf", "A": root / "sa.apr"}
            convert(src, out["G"], "gguf")
            convert(src, out["A"], "apr")
            for key, (frm, to) in {"GA": ("G", "apr"), "AG": ("A", "gguf"), "GS": ("G", "safetensors"), "AS": ("A", "safetensors")}.items():
                out[key] = root / (key.lower() + {"apr": ".apr", "gguf": ".gguf", "safetensors": ""}[to])
                convert(out[frm], out[key], to)
            made[name] = out
        return made[name]

    return make


@pytest.mark.parametrize("name", NEW)
def test_six_edges_are_lossless(name, six_edges):
    paths = six_edges(name)
    with open_model(paths["S"]) as source:
        assert source.config.architecture == name
        for key in ("G", "A", "GA", "AG", "GS", "AS"):
            with open_model(paths[key]) as artifact:
                result = compare_models(source, artifact)
                assert artifact.config == source.config, (key, result.config_differences)
                assert result.ok, (key, [(t.name, t.status, t.diagnosis) for t in result.tensors if not t.ok][:4])
                assert all(t.bit_exact for t in result.tensors), key


def test_default_gguf_name_trips_no_consumer_special_case(six_edges):
    """general.name is neutral: llama.cpp gives a "phi3"-named model Phi-3's token attributes
    (and fails on a vocabulary without "</s>"), transformers reads a llama file named "mistral"
    as gguf-py's absent mistral architecture."""
    for name in ("phi3", "mistral"):
        reader = gguf.GGUFReader(six_edges(name)["G"])
        value = bytes(reader.fields["general.name"].parts[-1]).decode()
        assert "phi3" not in value.lower() and "phi-3" not in value.lower() and value != "mistral", value


def test_gemma_norms_are_stored_plus_one(six_edges):
    """What llama.cpp reads from the GGUF is w + 1, and only for norms."""
    paths = six_edges("gemma3")
    reader = gguf.GGUFReader(paths["G"])
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    with open_model(paths["S"]) as source:
        arch = registry.get("gemma3")
        for name, tensor in source.tensors.items():
            values = stored[registry.hf_to_gguf(arch, name)].reshape(tensor.shape)
            expected = tensor.to_float32() + (1 if name.endswith("norm.weight") else 0)
            assert np.array_equal(values, expected), name
    assert "output.weight" not in stored  # tied: llama.cpp reuses token_embd


def _logits(engine, path):
    from convqa.infer.engines import engine_for

    e = engine_for(engine, "cpu")
    try:
        e.load(str(path))
        return e.teacher_forced_logits(PROMPT)
    finally:
        e.close()


@pytest.mark.parametrize("name", NEW)
def test_engines_load_every_format(name, six_edges):
    """transformers runs S, A and G (its own GGUF loader) bit-exact; llama.cpp runs G."""
    paths = six_edges(name)
    reference = _logits("transformers", paths["S"])
    for key in ("A", "G"):
        assert np.array_equal(_logits("transformers", paths[key]), reference), key
    ggml = _logits("llama.cpp", paths["G"])
    rel = np.max(np.abs(ggml - reference)) / np.max(np.abs(reference))
    assert rel <= llama_cpp_max_rel(name), rel
    assert np.array_equal(ggml.argmax(-1), reference.argmax(-1))


# ---------------------------------------------------------------- what must be refused


def _config(name):
    config = open_config(name)
    if name == "gemma3":
        config = config.replace(params={"sliding_window": 8, "rope_local_theta": 1e4})
    if name == "gemma2":
        config = config.replace(params={"sliding_window": 8, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0})
    if name == "qwen3_moe":
        config = config.replace(params={"num_experts": 12, "num_experts_per_tok": 2, "moe_intermediate_size": 768})
    return config


def _hf(name, **changes):
    return hf_config_from(_config(name), None) | changes


@pytest.mark.parametrize("name", registry.SUPPORTED)
def test_hf_configs_round_trip(name):
    """What convqa writes, transformers' config class and convqa read back as the same model."""
    from transformers import AutoConfig

    hf = _hf(name)
    assert config_from_hf(hf, "config.json") == _config(name)
    settings = dict(hf)
    saved = AutoConfig.for_model(settings.pop("model_type"), **settings).to_dict()
    assert config_from_hf(saved, "config.json") == _config(name)


@pytest.mark.parametrize(
    "name, change, field",
    [
        ("gemma3", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar"),
        ("gemma3", {"layer_types": ["full_attention"] * 6}, "layer_types"),
        ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ("gemma3", {"hidden_activation": "gelu"}, "hidden_activation"),
        ("gemma2", {"attn_logit_softcapping": None}, "attn_logit_softcapping"),
        ("gemma2", {"layer_types": ["sliding_attention", "sliding_attention"]}, "layer_types"),
        ("mistral", {"sliding_window": 128}, "sliding_window"),  # shorter than the 256-token context
        ("qwen3", {"use_sliding_window": True}, "use_sliding_window"),
        ("qwen3", {"attention_bias": True}, "attention_bias"),
    ],
)
def test_configs_llama_cpp_cannot_run_are_refused(name, change, field):
    hf = _hf(name, **change)
    with pytest.raises(FormatError) as err:
        config_from_hf(hf, "config.json")
    assert err.value.field == field


def test_mistral_without_sliding_window_key_gets_transformers_default_and_is_refused():
    hf = _hf("mistral")
    # MistralConfig's defaults: a 4096 window in a 131072 context, which llama.cpp would not run
    del hf["sliding_window"], hf["max_position_embeddings"]
    with pytest.raises(FormatError, match="sliding_window 4096"):
        config_from_hf(hf, "config.json")
    # a window no shorter than the context changes nothing: accepted
    assert config_from_hf(_hf("mistral", sliding_window=256), "config.json") == _config("mistral")


def test_untied_gemma_cannot_be_written_as_gguf(synthetic_dir, tmp_path):
    src = synthetic_dir("gemma2-tiny", tie_word_embeddings=False)
    with pytest.raises(ConversionError, match="untied"):
        convert(src, tmp_path / "out.gguf", "gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_an_architecture_neither_engine_runs_is_refused(six_edges, tmp_path):
    """A GGUF of an architecture outside the registry: refused by name, as before the registry."""
    paths = six_edges("qwen3")
    data = bytearray(paths["G"].read_bytes())
    at = data.index(b"qwen3")
    data[at : at + 5] = b"falcn"
    bad = tmp_path / "falcn.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="unsupported architecture 'falcn'"):
        open_model(bad)


# ---------------------------------------------------------------- mutants and diagnoses


def test_gemma_norm_offset_twice_is_diagnosed(synthetic_dir, tmp_path):
    src = synthetic_dir("gemma3-tiny")
    convert(src, tmp_path / "good.gguf", "gguf")
    convert(src, tmp_path / "bad.gguf", "gguf", mutant="gemma-norm-offset-twice")
    with open_model(tmp_path / "good.gguf") as a, open_model(tmp_path / "bad.gguf") as b:
        result = compare_models(a, b)
    off = [t for t in result.tensors if not t.ok]
    assert off and all(t.name.endswith("norm.weight") for t in off)
    assert len(off) == 6 * 6 + 1  # four norms and q/k norms per layer, plus the final norm
    assert all(t.diagnosis == "equals the source + 1 (gemma norm offset applied twice / missing)" for t in off)


def test_gemma_norm_offset_mutant_refuses_other_architectures(synthetic_dir, tmp_path):
    with pytest.raises(ConversionError, match="norm offset"):
        convert(synthetic_dir("qwen3-tiny"), tmp_path / "bad.gguf", "gguf", mutant="gemma-norm-offset-twice")


def _qkv_rows_are_q_v_k(source, bad):
    q, k, v = registry.fused_qkv_rows(4, 2, 16)
    good, got = (m.tensors["model.layers.0.self_attn.qkv_proj.weight"].to_float32() for m in (source, bad))
    assert np.array_equal(got[q], good[q]) and not np.array_equal(got[k], good[k])
    assert np.array_equal(got[k], good[v]) and np.array_equal(got[v], good[k])


@pytest.mark.parametrize(
    "mutant, preset, roles, status, rows_check, refusing_preset, refusal",
    [
        ("drop-qk-norm", "qwen3-tiny", ("self_attn.q_norm.weight", "self_attn.k_norm.weight"), "missing_in_candidate", None,
         "mistral-tiny", "q_norm"),
        ("fused-qkv-wrong-split", "phi3-tiny", ("self_attn.qkv_proj.weight",), "differ", _qkv_rows_are_q_v_k,
         "mistral-tiny", "fused qkv_proj"),
    ],
)  # fmt: skip
def test_architecture_mutant_changes_exactly_its_tensors(mutant, preset, roles, status, rows_check, refusing_preset,
                                                         refusal, synthetic_dir, tmp_path):  # fmt: skip
    """S->A through the mutant: exactly its roles in both layers are lost or changed, every other
    tensor is unchanged, and an architecture without those roles is refused."""
    src = synthetic_dir(preset)
    convert(src, tmp_path / "bad.apr", "apr", mutant=mutant)
    with open_model(src) as a, open_model(tmp_path / "bad.apr") as b:
        result = compare_models(a, b)
        changed = {t.name: t.status for t in result.tensors if not t.ok}
        assert changed == {f"model.layers.{i}.{role}": status for i in range(2) for role in roles}
        if rows_check is not None:
            rows_check(a, b)
    with pytest.raises(ConversionError, match=refusal):
        convert(synthetic_dir(refusing_preset), tmp_path / "m.apr", "apr", mutant=mutant)


def test_expert_order_diagnosis():
    rng = np.random.default_rng(0)
    experts = rng.standard_normal((4, 8, 16)).astype(np.float32)
    swapped = experts[[1, 0, 2, 3]]
    assert _value_diagnosis("model.layers.0.mlp.experts.down_proj", experts, swapped, None).startswith(
        "experts stacked in the wrong order")
    assert not _value_diagnosis("model.layers.0.mlp.experts.down_proj", experts, experts * 2, None).startswith("experts")


# --- MoE (qwen3_moe, registry.EXPERIMENTAL): expert stacking at the GGUF boundary -------------
# 12 experts (string order 0, 1, 10, 11, 2, ... differs from numeric), top-2, two layers.
# moe_intermediate_size 768 and norm_topk_prob=True: transformers 5.23's GGUF loader ignores
# expert_feed_forward_length (keeps its default 768) and forces norm_topk_prob=True (measured).
MOE_EXPERTS, MOE_FF = 12, 768


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    """A seeded tiny Qwen3MoeForCausalLM, saved by save_pretrained, with perturbed norms."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    hf = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=MOE_FF,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        num_experts=MOE_EXPERTS, num_experts_per_tok=2, norm_topk_prob=True,
                        max_position_embeddings=64, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})  # fmt: skip
    torch.manual_seed(12)
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # norms visible: a dropped or swapped norm changes logits
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "mlp.experts" in name or name.endswith("mlp.gate.weight"):
                p.copy_(0.2 * torch.randn_like(p))  # experts and router distinct enough to route
    path = tmp_path_factory.mktemp("qwen3-moe") / "hf"
    model.save_pretrained(path)
    return path, model.eval(), load_file(path / "model.safetensors")


def _moe_plan(state: dict, **quirks):
    from convqa import encodings
    from convqa.model import LazyTensor, ModelConfig, TokenizerSpec, WriterQuirks, WritePlan

    config = ModelConfig("qwen3_moe", 64, 32, 48, 2, 4, 2, 8, 64, 1000000.0, 1e-6, False,
                         params={"num_experts": MOE_EXPERTS, "num_experts_per_tok": 2, "moe_intermediate_size": MOE_FF})  # fmt: skip
    tokens = [f"t{i}" for i in range(64)]
    tokenizer = TokenizerSpec("gpt2", "qwen2", tokens, [1] * 64, ["t 1"], bos_token_id=0, eos_token_id=1)
    tensors = [LazyTensor(k, v.shape, encodings.F32, lambda v=v: np.ascontiguousarray(v).view(np.uint8).reshape(-1))
               for k, v in state.items()]  # fmt: skip
    return WritePlan(config, tokenizer, tensors, quirks=WriterQuirks(**quirks))


def _stacked(state: dict, layer: int, proj: str, order) -> np.ndarray:
    return np.stack([state[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] for e in order])


def test_moe_save_pretrained_is_per_expert_and_registry_names_it(moe_model):
    """transformers 5.23 fuses experts in memory (3-D gate_up_proj) but save_pretrained writes the
    Hub's per-expert 2-D tensors; the registry's roles are exactly those names."""
    _, _, state = moe_model
    arch = registry.get("qwen3_moe")
    expected = {f"model.layers.{i}.{s}" for i in range(2) for s in arch.layer_roles}
    expected |= {registry.expert_name(i, e, s) for i in range(2) for e in range(MOE_EXPERTS) for s in arch.expert_roles}
    expected |= {registry.EMBEDDING, registry.FINAL_NORM, registry.LM_HEAD}
    assert set(state) == expected
    assert state["model.layers.0.mlp.experts.3.gate_proj.weight"].shape == (MOE_FF, 32)
    assert expected_tensors(_moe_plan(state).config) == {k: v.shape for k, v in state.items()}
    # the stacked GGUF names are gguf-py's qwen3moe tensors: nothing left over, nothing missing
    gguf_names = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3MOE]}
    mapped = {registry.hf_to_gguf(arch, f"model.layers.0.{s}").replace("blk.0.", "blk.{bid}.") for s in arch.layer_roles}
    mapped |= {registry.stacked_gguf_name(arch, 0, s).replace("blk.0.", "blk.{bid}.") for s in arch.expert_roles}
    mapped |= {registry.hf_to_gguf(arch, n) for n in (registry.EMBEDDING, registry.FINAL_NORM, registry.LM_HEAD)}
    assert {n.removesuffix(".weight") for n in mapped} == gguf_names


def test_moe_gguf_stacks_experts_as_llama_cpp_and_both_engines_run_it(moe_model, tmp_path):
    """The writer stacks expert e at index e ([n_expert, rows, cols], llama.cpp's converter);
    transformers' GGUF loader gives the HF logits bit for bit, llama.cpp within its tolerance, and
    each expert's bytes come back out of the stack (the reader-side split)."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    from convqa.arch import transforms
    from convqa.formats.filerange import read_file_range
    from convqa.formats.gguf_writer import write_gguf

    hf_path, model, state = moe_model
    out = tmp_path / "moe.gguf"
    write_gguf(out, _moe_plan(state))
    reader = gguf.GGUFReader(out)
    by_name = {t.name: t for t in reader.tensors}
    for layer in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            t = by_name[f"blk.{layer}.ffn_{proj.split('_')[0]}_exps.weight"]
            want = _stacked(state, layer, proj, range(MOE_EXPERTS))
            assert tuple(reversed(t.shape.tolist())) == want.shape
            assert np.array_equal(np.asarray(t.data).reshape(want.shape), want)
            stacked = lambda t=t: read_file_range(out, t.data_offset, t.n_bytes)  # noqa: E731
            for e in (0, 2, 10, MOE_EXPERTS - 1):
                got = transforms.expert_loader(stacked, e, MOE_EXPERTS)().view(np.float32).reshape(want.shape[1:])
                assert np.array_equal(got, want[e])

    # the GGUF reader's split (reached through read_gguf once qwen3_moe is SUPPORTED)
    from convqa.formats import gguf as gguf_reader

    parsed = gguf_reader._parse(str(out), memoryview(np.memmap(out, dtype=np.uint8, mode="r")))
    info = next(i for i in parsed.tensors if i.name == "blk.1.ffn_up_exps.weight")
    split = gguf_reader._expert_tensors(str(out), info, 1, "up_proj.weight", _moe_plan(state).config)
    assert list(split) == [f"model.layers.1.mlp.experts.{e}.up_proj.weight" for e in range(MOE_EXPERTS)]
    for name, t in split.items():
        assert t.shape == state[name].shape and np.array_equal(t.raw().view(np.float32).reshape(t.shape), state[name])

    ids = PROMPT[:12]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
        g = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
        assert np.array_equal(g(torch.tensor([ids])).logits[0].numpy(), ref)
    llm = llama_cpp.Llama(str(out), logits_all=True, verbose=False, n_ctx=64, n_threads=1)
    llm.eval(ids)
    lc = np.array(llm.scores[: len(ids)])
    # Measured 2.4e-4 (max |dlogit| 8.6e-5 on logits of at most 0.36): above config.yaml's native
    # llama.cpp 1e-4, so a qualifying run needs a `native@qwen3_moe` tolerance (not yet set).
    assert np.max(np.abs(lc - ref)) / np.max(np.abs(ref)) <= 1e-3
    assert np.array_equal(lc.argmax(-1), ref.argmax(-1))


def test_moe_experts_string_sorted_mutant_is_caught_and_diagnosed(moe_model, tmp_path):
    """The string-sorted stacking (0, 1, 10, 11, 2, ...) loads in llama.cpp and changes its
    logits; the comparator names it on the real stacked tensors; the correct stacking is quiet."""
    import llama_cpp

    from convqa.convert.mutants import MUTANTS
    from convqa.formats.gguf_writer import write_gguf

    _, _, state = moe_model
    plan = _moe_plan(state)
    bad_plan, _ = MUTANTS["moe-experts-string-sorted"].apply(plan, None, tmp_path, tmp_path / "bad.gguf")
    scores = {}
    for label, p in (("good", plan), ("bad", bad_plan)):
        write_gguf(tmp_path / f"{label}.gguf", p)
        llm = llama_cpp.Llama(str(tmp_path / f"{label}.gguf"), logits_all=True, verbose=False, n_ctx=64, n_threads=1)
        llm.eval(PROMPT[:12])
        scores[label] = np.array(llm.scores[:12])
    assert np.abs(scores["good"] - scores["bad"]).max() > 1e-2

    source = _stacked(state, 0, "down_proj", range(MOE_EXPERTS))
    for label, order in (("good", list(range(MOE_EXPERTS))), ("bad", [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9])):
        t = next(t for t in gguf.GGUFReader(tmp_path / f"{label}.gguf").tensors if t.name == "blk.0.ffn_down_exps.weight")
        got = np.asarray(t.data).reshape(source.shape)
        diagnosis = _value_diagnosis("model.layers.0.mlp.experts.down_proj", source, got, None)
        if label == "good":
            assert np.array_equal(got, source)
        else:
            assert diagnosis == f"experts stacked in the wrong order (candidate expert i is source expert {order}[i])"
    with pytest.raises(ConversionError, match="only applies to MoE"):
        MUTANTS["moe-experts-string-sorted"].apply(dataclasses_replace_arch(plan, "qwen3"), None, tmp_path, tmp_path)


def test_edge_row_names_experts_stacked_in_string_order(synthetic_dir, tmp_path):
    """The real preset through the real mutant: the GGUF reader splits the stack back into
    per-expert tensors, so each moved expert is a whole source expert at another index. The
    comparison finds the permutation per layer and role, and the S->G edge row says so once per
    group instead of listing 60 value differences; the correct GGUF gets no such diagnosis."""
    import json

    from convqa.gates.edges import check_rows
    from convqa.workflow.plan import Check

    src = synthetic_dir("qwen3-moe-tiny")
    string_order = [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    convert(src, tmp_path / "good.gguf", "gguf")
    convert(src, tmp_path / "bad.gguf", "gguf", mutant="moe-experts-string-sorted")
    check = Check("F-CONV-S-G", "st-gguf", "st")
    results = {}
    for label in ("good", "bad"):
        with open_model(src) as a, open_model(tmp_path / f"{label}.gguf") as b:
            comparison = compare_models(a, b).as_dict()
        results[label] = (comparison, check_rows(check, {"comparison": comparison}, "qwen3-moe-tiny", "native")[0])

    good, good_row = results["good"]
    assert good["ok"] and good["expert_orders"] == [] and good_row.status == "pass"
    assert not any("experts" in t["diagnosis"] for t in good["tensors"])

    bad, bad_row = results["bad"]
    diagnosis = f"experts stacked in the wrong order (candidate expert i is source expert {string_order}[i])"
    arch = registry.get("qwen3_moe")
    groups = {(g["layer"], g["role"]): g for g in bad["expert_orders"]}
    assert set(groups) == {(layer, role) for layer in range(2) for role in arch.expert_roles}
    for (layer, role), group in groups.items():
        assert group["order"] == string_order and group["diagnosis"] == diagnosis
        assert group["tensors"] == f"model.layers.{layer}.mlp.experts.*.{role}"
        assert group["moved"] == [registry.expert_name(layer, e, role) for e in range(2, 12)]
    off = [t for t in bad["tensors"] if t["status"] != "identical"]
    assert {t["name"] for t in off} == {n for g in groups.values() for n in g["moved"]}
    assert all(t["diagnosis"] == diagnosis for t in off)

    assert bad_row.status == "fail"
    problems = json.loads(bad_row.details)["problems"]
    assert problems == [f"{g['tensors']}: {diagnosis}" for g in bad["expert_orders"]]  # six, not sixty
    assert bad_row.reason.startswith(f"model.layers.0.mlp.experts.*.down_proj.weight: {diagnosis}")

    # Quantized, each expert is the source's within Q8_0's error, and still found at its new index.
    convert(src, tmp_path / "bad-q8_0.gguf", "gguf", quant="q8_0", mutant="moe-experts-string-sorted")
    convert(src, tmp_path / "good-q8_0.gguf", "gguf", quant="q8_0")
    with open_model(src) as a, open_model(tmp_path / "bad-q8_0.gguf") as b:
        assert [g.order for g in compare_models(a, b).expert_orders] == [string_order] * 6
    with open_model(src) as a, open_model(tmp_path / "good-q8_0.gguf") as b:
        assert compare_models(a, b).expert_orders == []


def dataclasses_replace_arch(plan, arch):
    import dataclasses

    return dataclasses.replace(plan, config=plan.config.replace(architecture=arch, params={}))
