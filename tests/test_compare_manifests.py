"""compare_from_manifests (convqa.compare.manifests): an exact comparison decided from two
manifests must be the dict compare_models gives on the artifacts themselves, and anything the
manifests cannot prove must fall back (None). Real artifacts: synthetic checkpoints converted by
convqa, manifests through JSON as the workflow stores them."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from convqa import encodings
from convqa.compare.manifests import compare_from_manifests
from convqa.compare.tensors import compare_models
from convqa.convert.builtin import convert
from convqa.errors import FormatError
from convqa.formats import open_model, write_model
from convqa.inspect.manifest import build_manifest, tensor_entry, unreadable_manifest, values_sha256
from tinymodel import const_tensor, tiny_config, tiny_plan, tiny_tokenizer, tiny_values


def manifest(path) -> dict:
    return json.loads(json.dumps(build_manifest(path)))


def full(ref, cand) -> dict:
    with open_model(ref) as r, open_model(cand) as c:
        return compare_models(r, c).as_dict()


@pytest.fixture(scope="module")
def built(synthetic_dir, tmp_path_factory):
    """name -> artifact path, converted once for the module."""
    d = tmp_path_factory.mktemp("manifest-compare")
    st, bf16 = synthetic_dir("qwen2-tiny"), synthetic_dir("qwen2.5-tiny-bf16", "bfloat16")
    paths = {"st": st, "bf16": bf16}

    def conv(name, src, to, **kw):
        paths[name] = d / (name + {"gguf": ".gguf", "apr": ".apr"}.get(to, ""))
        convert(paths[src], paths[name], to, **kw)

    conv("gguf", "st", "gguf")
    conv("apr", "st", "apr")
    conv("gguf-st", "gguf", "safetensors")
    conv("q8", "st", "gguf", quant="q8_0")
    conv("q8-apr", "q8", "apr")
    conv("q8-st", "q8", "safetensors")
    conv("bf16-gguf", "bf16", "gguf")
    conv("bf16-gguf-st", "bf16-gguf", "safetensors")
    # 83 tokens in 96 embedding rows: the GGUF reader gives the 83, the SafeTensors one pads with UNUSED.
    config = tiny_config("qwen2", preset="q8")
    paths["pad-gguf"] = d / "pad.gguf"
    write_model(paths["pad-gguf"], tiny_plan(config, tiny_values(config, np.random.default_rng(3)), tokenizer=tiny_tokenizer("bpe")), "gguf")
    conv("pad-st", "pad-gguf", "safetensors")
    for mutant in ("transpose-2d", "nan-weight", "drop-qkv-bias", "change-rms-eps", "drop-chat-template", "shift-special-token"):
        conv(mutant, "st", "gguf", mutant=mutant)
    return paths


EXACT = [("st", "gguf"), ("st", "apr"), ("gguf", "apr"), ("st", "gguf-st"), ("gguf", "gguf-st"),
         ("bf16", "bf16-gguf"), ("bf16-gguf", "bf16-gguf-st"), ("bf16", "bf16-gguf-st"),
         ("q8", "q8-apr"), ("q8", "q8-st"), ("q8-apr", "q8-st"), ("pad-gguf", "pad-st"), ("st", "st")]


@pytest.mark.parametrize("ref,cand", EXACT)
def test_exact_pairs_are_decided_as_compare_models_decides_them(built, ref, cand):
    got = compare_from_manifests(manifest(built[ref]), manifest(built[cand]))
    assert got is not None and got.pop("decided_from") == "manifests"
    want = full(built[ref], built[cand])
    assert got == want
    assert want["ok"] and want["tensors"]


def test_the_pairs_cover_cross_encodings_and_the_unpadded_vocabulary(built):
    """What EXACT is for: rows that are identical but not bit-exact, and a tokenizer compared unpadded."""
    rows = {(r, c): {(t["ref_encoding"], t["cand_encoding"], t["bit_exact"]) for t in full(built[r], built[c])["tensors"]}
            for r, c in (("bf16", "bf16-gguf"), ("q8", "q8-st"))}
    assert ("BF16", "F32", False) in rows["bf16", "bf16-gguf"] and ("BF16", "BF16", True) in rows["bf16", "bf16-gguf"]
    assert ("Q8_0", "F32", False) in rows["q8", "q8-st"]
    with open_model(built["pad-gguf"]) as a, open_model(built["pad-st"]) as b:
        assert len(a.tokenizer.tokens) < len(b.tokenizer.tokens)
    assert manifest(built["pad-st"])["tokenizer"]["unpadded"]["n_tokens"] == manifest(built["pad-gguf"])["tokenizer"]["n_tokens"]


@pytest.mark.parametrize("cand", ["q8", "transpose-2d", "nan-weight", "drop-qkv-bias", "change-rms-eps",
                                  "drop-chat-template", "shift-special-token"])
def test_what_the_manifests_cannot_prove_falls_back(built, cand):
    assert compare_from_manifests(manifest(built["st"]), manifest(built[cand])) is None
    want = full(built["st"], built[cand])
    assert not all(t["status"] == "identical" for t in want["tensors"]) or want["config_differences"] or want["tokenizer_differences"]


def test_one_changed_value_falls_back(built, tmp_path):
    from safetensors.numpy import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(built["st"], changed)
    (file,) = changed.glob("*.safetensors")
    tensors = load_file(file)
    w = tensors["model.layers.0.mlp.down_proj.weight"]
    w.flat[5] = np.nextafter(w.flat[5], np.float32(np.inf))
    save_file(tensors, file, metadata={"format": "pt"})
    assert compare_from_manifests(manifest(built["st"]), manifest(changed)) is None
    assert not full(built["st"], changed)["ok"]


def test_equal_values_under_other_bytes_fall_back(tmp_path):
    """0.0 and -0.0: compare_tensor calls them identical, but their digests differ: not provable, so fall back."""
    config = tiny_config("qwen2", preset="q8")
    values = tiny_values(config, np.random.default_rng(1))
    values["model.norm.weight"][0] = -0.0
    write_model(tmp_path / "b.gguf", tiny_plan(config, values, tokenizer=tiny_tokenizer("bpe")), "gguf")
    values["model.norm.weight"][0] = 0.0
    write_model(tmp_path / "c.gguf", tiny_plan(config, values, tokenizer=tiny_tokenizer("bpe")), "gguf")
    assert compare_from_manifests(manifest(tmp_path / "b.gguf"), manifest(tmp_path / "c.gguf")) is None
    assert full(tmp_path / "b.gguf", tmp_path / "c.gguf")["ok"]


def test_incomplete_manifests_fall_back(built, tmp_path):
    ref, cand = manifest(built["st"]), manifest(built["gguf"])
    assert compare_from_manifests(ref, cand) is not None

    old = json.loads(json.dumps(cand))
    del old["tensors"][3]["values_sha256"]  # a manifest written before values_sha256 existed
    assert compare_from_manifests(ref, old) is None
    old = json.loads(json.dumps(cand))
    for key in ("tokens_sha256", "token_types_sha256", "merges_sha256", "n_token_types", "unpadded"):
        del old["tokenizer"][key]
    assert compare_from_manifests(ref, old) is None
    assert compare_from_manifests(ref, build_manifest(built["gguf"], with_stats=False)) is None

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(built["gguf"].read_bytes()[:4096])
    with pytest.raises(FormatError) as exc:
        open_model(broken)
    unreadable = json.loads(json.dumps(unreadable_manifest(broken, exc.value)))
    assert compare_from_manifests(ref, unreadable) is None and compare_from_manifests(unreadable, ref) is None


@pytest.mark.parametrize("encoding", ["F32", "BF16", "F16", "Q8_0", "APR_Q8"])
def test_values_sha256_is_the_sha256_of_the_little_endian_float32_decode(encoding):
    enc = encodings.by_name(encoding)
    values = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    t = const_tensor("w", values, enc)
    entry = tensor_entry(t)
    want = hashlib.sha256(np.ascontiguousarray(t.to_float32(), dtype="<f4").tobytes()).hexdigest()
    assert entry["values_sha256"] == want
    assert (entry["values_sha256"] == entry["sha256"]) == (encoding == "F32")
    assert values_sha256(t.to_float32().astype(">f4")) == want  # converted a slice at a time
    assert "values_sha256" not in tensor_entry(t, with_stats=False)
