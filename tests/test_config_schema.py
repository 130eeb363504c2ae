"""config/schema.yaml: the shipped configs validate (with defaults filled in), bad configs are
rejected at parse time with a message that names the problem."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "config" / "schema.yaml")
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def rejected(config: dict) -> str:
    with pytest.raises(WorkflowError) as info:
        validate(config, SCHEMA)
    return str(info.value)


@pytest.fixture
def config() -> dict:
    return copy.deepcopy(load("config/config.yaml"))


@pytest.mark.parametrize("name", ["config/config.yaml", *sorted(str(p.relative_to(REPO)) for p in (REPO / "config/examples").glob("*.yaml"))])
def test_shipped_configs_validate(name):
    validate(load(name), SCHEMA)


def test_defaults_are_filled_in():
    config = {"models": {"m": {"source": {"kind": "synthetic", "preset": "llama-tiny"}},
                         "h": {"source": {"kind": "hub", "repo_id": "Qwen/Qwen2.5-0.5B-Instruct"}}}}
    validate(config, SCHEMA)
    assert config["tier"] == "mvp"
    assert config["variants"] == ["native", "q8_0"]
    assert config["temp_intermediates"] is True  # deleted after use by default (rules/intermediates.smk)
    assert config["converter"] == "convqa"
    assert config["converters"]["convqa"]["command"].startswith("convqa convert {input} {output} --to {format} {quant_arg}")
    assert config["models"]["m"]["source"] == {"kind": "synthetic", "preset": "llama-tiny", "seed": 0, "overrides": {}}
    # Defaults of one kind are not filled into another kind's source.
    assert config["models"]["h"]["source"] == {"kind": "hub", "repo_id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "main"}


def test_every_property_is_described():
    def walk(node, path):
        if isinstance(node, dict):
            for key, sub in (node.get("properties") or {}).items():
                assert "description" in sub or sub.get("const"), f"{path}.{key} has no description"
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(yaml.safe_load(Path(SCHEMA).read_text()), "schema")


def test_unknown_source_kind(config):
    config["models"]["qwen2-tiny"]["source"]["kind"] = "ftp"
    assert "'ftp' is not one of ['hub', 'local', 'gguf', 'bundled', 'synthetic']" in rejected(config)


def test_bad_variant(config):
    config["variants"] = ["native", "q9_9"]
    assert "'q9_9' is not one of" in rejected(config)


def test_duplicate_variant(config):
    config["variants"] = ["q8_0", "q8_0"]
    assert "non-unique" in rejected(config)


def test_bad_tier(config):
    config["tier"] = "everything"
    assert "'everything' is not one of ['smoke', 'mvp', 'full', 'detection', 'detection-downstream']" in rejected(config)


def test_missing_kind_specific_key(config):
    config["models"]["smollm2"]["source"] = {"kind": "hub"}
    assert "'repo_id' is a required property" in rejected(config)


def test_key_of_another_kind(config):
    config["models"]["qwen2-tiny"]["source"]["repo_id"] = "Qwen/Qwen2-0.5B"
    assert "'repo_id' was unexpected" in rejected(config)


def test_unknown_preset(config):
    config["models"]["qwen2-tiny"]["source"]["preset"] = "gpt-huge"
    assert "'gpt-huge' is not one of" in rejected(config)


def test_model_name_with_a_slash(config):
    config["models"]["Qwen/Qwen2"] = config["models"].pop("qwen2-tiny")
    assert "does not match" in rejected(config)


def test_reference_tolerances_default_to_bit_exact_for_every_lossy_variant_and_refuse_a_typo(config):
    defaults = {"models": {"m": {"source": {"kind": "synthetic", "preset": "llama-tiny"}}}}
    validate(defaults, SCHEMA)
    reference = defaults["inference"]["reference_tolerances"]
    assert set(reference) == {"f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "apr-int8", "apr-int4"}
    assert all(v["transformers"]["max_abs_dlogit"] == 0 and v["transformers"]["reason"] for v in reference.values())
    assert set(config["inference"]["reference_tolerances"]) == set(reference), "config.yaml lists every lossy variant"
    config["inference"]["reference_tolerances"]["q8_0"]["transformers"] = {"max_abs_dlogt": 0, "reason": "typo"}
    assert "'max_abs_dlogt' was unexpected" in rejected(config)


def test_ground_truth_tolerances_cover_every_variant_and_config_yaml_repeats_them(config):
    from convqa.encodings import QUANT_TARGETS

    defaults = {"models": {"m": {"source": {"kind": "synthetic", "preset": "llama-tiny"}}}}
    validate(defaults, SCHEMA)
    tolerances = defaults["inference"]["tolerances"]
    lossy = set(QUANT_TARGETS) - {"f32"}
    assert lossy | {"native", "native@bf16", "native@f16", "native@gemma3", "native@gemma2"} == set(tolerances)
    for variant, engines in tolerances.items():
        assert engines and all(t["reason"] for t in engines.values()), variant
    # A GGUF-only quantization is held under both engines; APR's own only under transformers.
    for variant in lossy:
        want = {"transformers"} | ({"llama.cpp"} if "gguf" in QUANT_TARGETS[variant] else set())
        assert set(tolerances[variant]) == want, variant
    assert config["inference"]["tolerances"] == tolerances, "config.yaml repeats the schema's defaults"


def test_unknown_top_level_key(config):
    config["varaints"] = ["native"]
    assert "'varaints' was unexpected" in rejected(config)


def test_no_models():
    assert "'models' is a required property" in rejected({"tier": "smoke"})


def _parse(tmp_path: Path, config: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([str(SNAKEMAKE), "--dry-run", "--cores", "1", "--workflow-profile", "none", "--configfile", str(path),
                           "--replace-workflow-config", "--directory", str(tmp_path), "--snakefile", str(REPO / "Snakefile")],
                          cwd=REPO, capture_output=True, text=True)


def test_workflow_refuses_a_bad_config_at_parse_time(tmp_path, config):
    config["models"]["qwen2-tiny"]["source"]["kind"] = "ftp"
    proc = _parse(tmp_path, config)
    assert proc.returncode != 0
    assert "Error validating config file" in proc.stdout + proc.stderr
    assert "'ftp' is not one of" in proc.stdout + proc.stderr


def test_workflow_refuses_a_variant_no_format_can_hold(tmp_path, config):
    config["variants"] = ["q9_9"]
    proc = _parse(tmp_path, config)
    assert proc.returncode != 0
    assert "q9_9" in proc.stdout + proc.stderr


def test_workflow_refuses_an_undefined_converter(tmp_path, config):
    config["converter"] = "llama-convert"
    proc = _parse(tmp_path, config)
    assert proc.returncode != 0
    assert "converter 'llama-convert' is not defined under `converters:`" in proc.stdout + proc.stderr
