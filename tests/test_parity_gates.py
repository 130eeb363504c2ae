"""F-TOK-001 and F-CHAT-001 on real files: convqa's GGUF/APR output for the synthetic presets and
the bundled SmolLM2 pass; GGUFs rewritten with a wrong pre-tokenizer, dropped merges or a renamed
added token fail F-TOK-001 with the first differing text; the drop-chat-template mutant fails
F-CHAT-001; a GGUF llama.cpp cannot read is a failed row, not a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from convqa.convert.builtin import convert
from convqa.gates.parity import chat_rows, parity_rows, tokenizer_rows
from convqa.infer.parity import parity_record
from tinymodel import rewrite_gguf

TIMEOUT_S = 120


def record_of(artifact: Path, source: Path, tmp_path: Path) -> dict:
    return parity_record(artifact, source, timeout_s=TIMEOUT_S, engine_log=tmp_path / f"{artifact.name}.engine.log",
                         scratch=tmp_path / f"{artifact.name}.llama.json")


def rows_by_subject(record: dict, chain: str) -> dict[tuple[str, str], object]:
    return {(r.gate, r.subject): r for r in parity_rows("m", "native", {chain: record})}


@pytest.fixture(scope="module")
def qwen2(synthetic_dir, tmp_path_factory):
    source = synthetic_dir("qwen2-tiny")
    out = tmp_path_factory.mktemp("parity-qwen2")
    convert(source, out / "model.gguf", "gguf")
    return source, out / "model.gguf"


def test_convqa_gguf_of_qwen2_passes_both_gates_under_both_renderers(qwen2, tmp_path):
    source, artifact = qwen2
    record = record_of(artifact, source, tmp_path)
    rows = rows_by_subject(record, "st-gguf")
    assert set(rows) == {("F-TOK-001", "native/st-gguf/llama.cpp"), ("F-CHAT-001", "native/st-gguf/transformers"),
                         ("F-CHAT-001", "native/st-gguf/llama.cpp")}
    for row in rows.values():
        assert (row.status, row.value) == ("pass", "0"), row
    texts = {e["id"] for e in record["tokenizer"]}
    assert {"digits", "cjk", "emoji", "whitespace", "added:<|im_end|>", "lookalike:<|im_end|>"} <= texts
    ids = {e["id"]: e for e in record["tokenizer"] if e["mode"] == "plain"}
    assert len(ids["added:<|im_end|>"]["reference"]) < len(ids["lookalike:<|im_end|>"]["reference"])


def test_tool_template_and_bf16_hub_checkpoint_pass_with_the_tool_call_rendered(synthetic_dir, tmp_path):
    source = synthetic_dir("qwen2.5-tiny-bf16")
    convert(source, tmp_path / "model.gguf", "gguf")
    convert(source, tmp_path / "model.apr", "apr")
    for chain, artifact in (("st-gguf", tmp_path / "model.gguf"), ("st-apr", tmp_path / "model.apr")):
        record = record_of(artifact, source, tmp_path)
        assert "tool-call" in {c["id"] for c in record["chat"]["conversations"]}
        tool = next(c for c in record["chat"]["conversations"] if c["id"] == "tool-call")
        assert "<tool_call>" in tool["reference"] and "get_weather" in tool["reference"]
        if chain == "st-gguf":  # user-defined added tokens (Qwen2.5's <tool_call>) are in the corpus
            assert "added:<tool_call>" in {e["id"] for e in record["tokenizer"]}
        for row in parity_rows("m", "native", {chain: record}):
            assert row.status == "pass", row
    assert [r.subject for r in chat_rows("m", "native", {"st-apr": record})] == ["native/st-apr/transformers"]
    assert not tokenizer_rows("m", "native", {"st-apr": record})


def test_source_itself_passes_chat_parity(synthetic_dir, tmp_path):
    source = synthetic_dir("llama-tiny")
    rows = parity_rows("m", "native", {"st": record_of(source, source, tmp_path)})
    assert [(r.gate, r.subject, r.status) for r in rows] == [("F-CHAT-001", "native/st/transformers", "pass")]


def test_smollm2_passes(smollm2_gguf, smollm2_st, tmp_path):
    record = record_of(smollm2_gguf, smollm2_st, tmp_path)
    assert record["llama_cpp"]["pre"] == "smollm"
    rows = parity_rows("m", "native", {"st-gguf": record})
    assert len(rows) == 3
    for row in rows:
        assert row.status == "pass", row


def _renamed(old: str, new: str):
    return lambda tokens: [new if t == old else t for t in tokens]


@pytest.mark.parametrize("name, replace, first_text", [
    ("wrong-pre", {"tokenizer.ggml.pre": lambda _: "gpt-2"}, "code"),
    ("merges-dropped", {"tokenizer.ggml.merges": lambda merges: merges[: len(merges) // 2]}, "english"),
    ("added-token-renamed", {"tokenizer.ggml.tokens": _renamed("<|im_end|>", "<|im_fin|>")}, "added:<|im_end|>"),
])
def test_wrong_tokenizer_metadata_fails_with_the_first_differing_text(qwen2, tmp_path, name, replace, first_text):
    source, good = qwen2
    bad = tmp_path / f"{name}.gguf"
    rewrite_gguf(good, bad, replace=replace)
    row = tokenizer_rows("m", "native", {"st-gguf": record_of(bad, source, tmp_path)})[0]
    assert row.status == "fail" and int(row.value) > 0, row
    assert row.reason.startswith(first_text), row.reason
    assert "source [" in row.reason and "vs llama.cpp [" in row.reason
    details = json.loads(row.details)
    assert details["mismatches"][0]["reference"] != details["mismatches"][0]["candidate"]


def test_gguf_llama_cpp_cannot_read_is_a_failed_row_not_a_crash(qwen2, tmp_path):
    source, good = qwen2
    bad = tmp_path / "no-vocab.gguf"
    rewrite_gguf(good, bad, replace={"tokenizer.ggml.pre": lambda _: "no-such-pre-tokenizer"})
    record = record_of(bad, source, tmp_path)
    assert record["llama_cpp"]["error"].startswith("llama.cpp process")
    assert "unknown pre-tokenizer type" in record["llama_cpp"]["error"]
    rows = rows_by_subject(record, "st-gguf")
    tok = rows[("F-TOK-001", "native/st-gguf/llama.cpp")]
    assert tok.status == "fail" and "could not build its tokenizer" in tok.reason
    llama_chat = rows[("F-CHAT-001", "native/st-gguf/llama.cpp")]
    assert llama_chat.status == "fail" and "llama.cpp could not read the file" in llama_chat.reason
    assert rows[("F-CHAT-001", "native/st-gguf/transformers")].status == "pass"  # convqa's reader still reads it


@pytest.mark.parametrize("fmt, ext", [("gguf", "gguf"), ("apr", "apr")])
def test_drop_chat_template_mutant_fails_chat_parity(synthetic_dir, tmp_path, fmt, ext):
    source = synthetic_dir("qwen2-tiny")
    bad = tmp_path / f"model.{ext}"
    convert(source, bad, fmt, mutant="drop-chat-template")
    rows = chat_rows("m", "native", {f"st-{fmt}": record_of(bad, source, tmp_path)})
    assert rows and all(r.status == "fail" and "carries no chat template" in r.reason for r in rows)
    if fmt == "gguf":
        assert [r.subject for r in rows] == ["native/st-gguf/transformers", "native/st-gguf/llama.cpp"]


def test_neither_with_a_template_is_skipped_with_the_reason(synthetic_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(synthetic_dir("qwen2-tiny"), source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    convert(source, tmp_path / "model.apr", "apr")
    row = chat_rows("m", "native", {"st-apr": record_of(tmp_path / "model.apr", source, tmp_path)})[0]
    assert (row.status, row.reason) == ("skipped", "neither the source nor the artifact carries a chat template")


def test_a_failed_conversion_upstream_is_not_evaluated_and_a_damaged_record_fails(tmp_path):
    from convqa.infer.parity import load_parity

    upstream = {"error": "artifact unreadable", "no_artifact": {"chain": "st-gguf", "reason": "converter exited 1"}}
    rows = parity_rows("m", "native", {"st-gguf": upstream})
    assert [r.status for r in rows] == ["not_evaluated"] * 3
    (tmp_path / "parity.json").write_text("{not json")
    rows = parity_rows("m", "native", {"st-apr": load_parity(tmp_path / "parity.json")})
    assert [(r.gate, r.status) for r in rows] == [("F-CHAT-001", "fail")] and "unreadable" in rows[0].reason
