"""The converter registry (routing, fingerprints, version probes), the command contract
(placeholders, environment, non-zero exit, wrong output path) and the differential gate rows
(F-XCONV-001: failures versus informational differences). Fast: no workflow runs."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

from convqa.convert import converters

from convqa.gates import cross_converter as xconv
from convqa.gates.rows import FAIL, PASS
from convqa.convert.runner import ConverterExitError, OutputPathError, expand_command, run_converter

CONVQA = {"command": "convqa convert {input} {output} --to {format} {quant_arg} --json", "json_record": True}
ALL_EDGES = set(converters.EDGES)


def config(**extra) -> dict:
    base = {
        "converter": "convqa",
        "converters": {"convqa": dict(CONVQA), "tool": {"command": "tool {input} {output}", "edges": ["st-gguf"]}},
        "models": {"m": {"source": {"kind": "synthetic", "preset": "llama-tiny"}}},
    }
    base.update(extra)
    return base


# ---------------------------------------------------------------- routing


def test_default_routes_every_edge_to_the_converter():
    routes = converters.routes(config(), "m")
    assert routes == {edge: ["convqa"] for edge in converters.EDGES}
    assert converters.primary_converter(config(), "m", "st-gguf-apr") == "convqa"
    assert converters.side_converters(config(), "m", "st-gguf") == []


def test_config_route_and_model_route_edge_by_edge():
    cfg = config(route={"st-gguf": ["tool", "convqa"], "st-apr": "convqa"})
    cfg["models"]["m"]["route"] = {"st-apr": ["convqa"]}
    routes = converters.routes(cfg, "m")
    assert routes["st-gguf"] == ["tool", "convqa"] and routes["st-apr"] == ["convqa"]
    assert converters.primary_converter(cfg, "m", "st-gguf") == "tool"
    assert converters.primary_converter(cfg, "m", "st-apr-st-gguf") == "tool"  # same edge, deeper chain
    assert converters.side_converters(cfg, "m", "st-gguf") == ["convqa"]
    assert converters.side_converters(cfg, "m", "st-gguf.run2") == []  # re-runs are the primary's business
    assert converters.side_label("st-gguf", "convqa") == "st-gguf@convqa"
    converters.check_routing(cfg, ALL_EDGES)


@pytest.mark.parametrize("route, message", [
    ({"st-gguf": ["nope"]}, "'nope', which is not defined"),
    ({"st-apr": ["tool"]}, "edge st-apr is routed to 'tool', whose `edges:` are ['st-gguf']"),
    ({"st-gguf": ["tool", "tool"]}, "lists a converter twice"),
])
def test_bad_routes_are_rejected_naming_the_problem(route, message):
    with pytest.raises(converters.ConverterConfigError, match=None) as info:
        converters.check_routing(config(route=route), ALL_EDGES)
    assert message in str(info.value)


def test_an_external_default_converter_must_implement_every_used_edge():
    with pytest.raises(converters.ConverterConfigError) as info:
        converters.check_routing(config(converter="tool"), ALL_EDGES)
    assert "edge st-apr is routed to 'tool'" in str(info.value)
    converters.check_routing(config(converter="tool"), {"st-gguf"})  # a plan using only S->G is fine


# ---------------------------------------------------------------- fingerprints


def test_builtin_fingerprint_is_the_edge_code_hash():
    gguf = converters.converter_fingerprint("convqa", CONVQA, "safetensors", "gguf")
    apr = converters.converter_fingerprint("convqa", CONVQA, "safetensors", "apr")
    assert gguf.startswith("convqa:") and apr.startswith("convqa:") and gguf != apr
    versioned = converters.converter_fingerprint("convqa", {**CONVQA, "version": "2"}, "safetensors", "gguf")
    assert versioned == gguf + "+2"


def test_external_fingerprint_follows_version_probe_command_and_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tool").mkdir()
    (tmp_path / "tool" / "convert.py").write_text("print('v1')\n")
    (tmp_path / "tool" / "lib").mkdir()
    (tmp_path / "tool" / "lib" / "a.py").write_text("A = 1\n")
    entry = {"command": "tool {input} {output}", "version": "1.0",
             "probe": {"command": "{python} tool/convert.py", "files": ["tool/**/*.py"]}}

    def fp(e):
        converters.probe_hash.cache_clear()
        return converters.converter_fingerprint("tool", e, "safetensors", "gguf")

    first = fp(entry)
    assert first.startswith("tool:1.0+") and fp(entry) == first
    (tmp_path / "tool" / "lib" / "a.py").write_text("A = 2\n")  # code under the recursive glob
    second = fp(entry)
    assert second != first
    (tmp_path / "tool" / "convert.py").write_text("print('v2')\n")  # changes the probe's output too
    assert fp(entry) not in (first, second)
    assert fp({**entry, "version": "1.1"}).startswith("tool:1.1+")
    assert converters.converter_fingerprint("tool", {"command": "tool"}, "safetensors", "gguf") == "tool:unversioned"


def test_probe_failures_are_configuration_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    converters.probe_hash.cache_clear()
    with pytest.raises(converters.ConverterConfigError, match="matches no file"):
        converters.converter_fingerprint("t", {"command": "t", "probe": {"files": ["missing/*.py"]}}, "safetensors", "gguf")
    with pytest.raises(converters.ConverterConfigError, match="exited 4"):
        converters.converter_fingerprint("t", {"command": "t", "probe": {"command": "{python} -c 'raise SystemExit(4)'"}},
                                         "safetensors", "gguf")


# ---------------------------------------------------------------- the command contract


def test_placeholders_outdir_and_python():
    argv = expand_command("{python} conv.py {input} --outfile {output} --dir {outdir} --outtype {quant}",
                          input="in dir/src", output="out/x/model.gguf", format="gguf", quant=None)
    assert argv == [sys.executable, "conv.py", "in dir/src", "--outfile", "out/x/model.gguf", "--dir", "out/x", "--outtype", ""]
    with pytest.raises(ValueError, match="unknown placeholder 'nope'"):
        expand_command("x {nope}", input="a", output="b", format="gguf", quant=None)


def _run(tmp_path, script: str, **kwargs):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir(exist_ok=True)
    log_path = tmp_path / "convert.log"
    with open(log_path, "w") as log:
        try:
            return run_converter([sys.executable, "-c", script, str(src), str(out)], str(src), str(out), log, **kwargs)
        finally:
            log.flush()


def test_environment_reaches_the_command(tmp_path):
    script = "import os, sys; open(sys.argv[2], 'w').write(os.environ['CONVERTER_FLAVOUR'])"
    _run(tmp_path, script, env={"CONVERTER_FLAVOUR": "llama"}, converter="tool")
    assert (tmp_path / "out" / "model.gguf").read_text() == "llama"


def test_non_zero_exit_carries_the_stderr_tail_and_the_converter(tmp_path):
    script = "import sys; print('x' * 5000, file=sys.stderr); print('KeyError: tokenizer.ggml.pre', file=sys.stderr); sys.exit(7)"
    with pytest.raises(ConverterExitError) as info:
        _run(tmp_path, script, converter="llama-cpp")
    assert info.value.returncode == 7
    assert info.value.stderr_tail.endswith("KeyError: tokenizer.ggml.pre")
    assert len(info.value.stderr_tail) <= 2000
    assert "converter 'llama-cpp' exited 7" in str(info.value)
    assert "KeyError: tokenizer.ggml.pre" in (tmp_path / "convert.log").read_text()


def test_wrong_output_path_names_expected_path_stray_file_and_converter(tmp_path):
    script = "import sys, pathlib; pathlib.Path(sys.argv[1], 'model-f32.gguf').write_text('GGUF')"
    with pytest.raises(OutputPathError) as info:
        _run(tmp_path, script, converter="llama-cpp")
    message = str(info.value)
    assert "converter 'llama-cpp' exited 0 but did not write the expected output" in message
    assert str(tmp_path / "out" / "model.gguf") in message
    assert str((tmp_path / "src" / "model-f32.gguf").resolve()) in message


# ---------------------------------------------------------------- F-XCONV-001 rows


def _tensor(name, encoding="F32"):
    return {"name": name, "status": "identical", "ref_encoding": encoding, "cand_encoding": encoding,
            "normalized_max_abs": 0.0}


def _manifest(kv: dict) -> dict:
    return {"format": "gguf", "metadata": {"kv": kv, "data_offset": 123}}


SLOT = {"chain": "st-gguf", "converter": "convqa", "primary_converter": "llama-cpp", "parent": "st"}
PRIMARY_KV = {"general.architecture": "llama", "general.name": "Source", "general.type": "model",
              "general.size_label": "135M", "tokenizer.ggml.pre": "smollm"}
SIDE_KV = {"general.architecture": "llama", "general.name": "llama", "convqa.provenance": "{}",
           "tokenizer.ggml.pre": "smollm"}


def test_metadata_differences_are_explained_not_failed():
    comparison = {"tensors": [_tensor("a"), _tensor("b")], "config_differences": {}, "tokenizer_differences": {}}
    loaded = {"vs_primary": comparison, "primary_manifest": _manifest(PRIMARY_KV), "manifest": _manifest(SIDE_KV)}
    row = xconv.xconv_row("st-gguf", "convqa", "llama-cpp", loaded, "m", "native")
    assert row.status == PASS
    assert "metadata only in llama-cpp: general.size_label, general.type" in row.reason
    assert "metadata only in convqa: convqa.provenance" in row.reason
    assert "metadata differing: general.name" in row.reason
    details = json.loads(row.details)
    assert details["metadata_changed"] == {"general.name": ["Source", "llama"]}
    assert "data_offset" not in json.dumps(details)  # layout bookkeeping is not a difference


def test_tensor_config_and_tokenizer_differences_fail():
    base = {"tensors": [_tensor("a")], "config_differences": {}, "tokenizer_differences": {}}
    loaded = {"primary_manifest": _manifest(PRIMARY_KV), "manifest": _manifest(PRIMARY_KV)}
    bad_values = copy.deepcopy(base)
    bad_values["tensors"][0].update(status="differ", normalized_max_abs=1e-3, diagnosis="values differ")
    bad_config = {**base, "config_differences": {"rope_theta": [10000.0, 100000.0]}}
    bad_tokenizer = {**base, "tokenizer_differences": {"token_types": "3 of 49152 differ"}}
    for comparison, text in ((bad_values, "a: values differ"), (bad_config, "config rope_theta"),
                             (bad_tokenizer, "tokenizer token_types")):
        row = xconv.xconv_row("st-gguf", "convqa", "llama-cpp", {**loaded, "vs_primary": comparison}, "m", "native")
        assert row.status == FAIL and text in row.reason, row


def test_quantized_first_hop_allows_both_quantizers_error():
    assert xconv.side_tolerance("st-gguf", "native") == 0.0
    assert xconv.side_tolerance("st-gguf", "q8_0") == pytest.approx(1e-2)
    assert xconv.side_tolerance("st-gguf-apr", "q8_0") == 0.0  # same input, must agree exactly


def test_failed_side_conversion_is_fail_rows_never_pass():
    sidecar = {"status": "failed", "converter": "convqa", "returncode": 1, "argv": ["x"],
               "stderr_tail": "Traceback...\nNotImplementedError: BPE pre-tokenizer was not recognized\n"}
    rows = xconv.side_rows(SLOT, {"sidecar": sidecar}, "m", "native")
    assert {r.gate for r in rows} == {"F-CONV-S-G", "F-XCONV-001"}
    for row in rows:
        assert row.status == FAIL
        assert row.subject == "native/st-gguf@convqa"
        assert row.reason == "converter 'convqa' exited 1: Traceback... | NotImplementedError: BPE pre-tokenizer was not recognized"


def test_fake_apr_rosetta_is_runnable():
    script = Path(__file__).parent / "data" / "fake_apr_rosetta.py"
    import subprocess

    proc = subprocess.run([sys.executable, str(script), "rosetta", "frobnicate", "a", "b"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'frobnicate'" in proc.stderr


def test_a_converter_without_declared_edges_implements_all_of_them():
    cfg = config(converter="any")
    cfg["converters"]["any"] = {"command": "python my_convert.py {input} {output} {format}"}
    converters.check_routing(cfg, ALL_EDGES)
    assert converters.implemented_edges(cfg["converters"]["any"]) == list(converters.EDGES)
