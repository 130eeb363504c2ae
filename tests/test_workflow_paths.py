"""convqa.workflow.paths and convqa.workflow.jobs without Snakemake: the result layout, log
paths, chain patterns, converter params for primary and side converters, input maps."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import yaml

from convqa.convert import converters
from convqa.workflow import jobs, paths, plan
from workflow_copy import REPO

SCRIPTS = REPO / "scripts"


def config(**extra) -> dict:
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    base.setdefault("route", {})
    return {**base, **extra}


@pytest.fixture(scope="module")
def J() -> jobs.Jobs:
    c = config()
    c["converters"]["other"] = {"command": "other {input} {output}", "version": "7", "env": {"A": "1"}}
    c["route"] = {"st-gguf": ["convqa", "other"]}
    return jobs.Jobs(c, SCRIPTS)


def w(**kw):
    return SimpleNamespace(**kw)


def test_result_layout():
    assert paths.artifact_path("m", "native", "st") == "results/m/source"
    assert paths.artifact_path("m", "native", "st-gguf") == "results/m/native/st-gguf/model.gguf"
    assert paths.artifact_path("m", "q8_0", "st-gguf-st.run2") == "results/m/q8_0/st-gguf-st.run2/model"
    assert paths.artifact_path("{model}", "{variant}", "{chain}", "apr") == "results/{model}/{variant}/{chain}/model.apr"
    assert paths.sidecar_path("m", "v", "st") == "results/m/source.sidecar.json"
    assert paths.manifest_path("m", "v", "st-apr") == "results/m/v/st-apr/manifest.json"
    assert paths.comparison_path("m", "v", "st-apr", "st") == "results/m/v/compare/st-apr~st.json"
    assert paths.inference_run_path("m", "", "st", "transformers", "cpu") == "results/m/source.infer/transformers-cpu.json"
    assert paths.side_artifact_dir("m", "v", "c", "st-gguf") == "results/m/v/xconv/c/st-gguf/artifact"
    assert paths.tier_targets(["a"], "mvp")[-2:] == ["results/summary/mvp/summary.json", "results/summary/mvp/summary.md"]


def test_log_paths():
    assert paths.step_log("m", "v", "st-gguf", "convert") == "results/m/v/st-gguf/convert.log"
    assert paths.step_log("m", "", "st", "inspect") == "results/m/logs/inspect-source.log"
    assert paths.log_beside(paths.gates_path("m", "v", "mvp")) == "results/m/v/gates/mvp/tensor.log"
    assert paths.log_beside("results/m/v/compare/st-gguf.run2~st-gguf.json") == "results/m/v/compare/st-gguf.run2~st-gguf.log"
    serve = paths.serve_path("m", "v", "st-gguf", "llamacpp")
    assert paths.log_beside(serve, ".server.log") == "results/m/v/st-gguf/infer/serve-llamacpp.server.log"
    run = paths.inference_run_path("m", "v", "st-gguf", "llamacpp", "cpu")
    assert paths.log_beside(run, ".engine.log") == paths.inference_run_path("m", "v", "st-gguf", "llamacpp", "cpu", "engine.log")


@pytest.mark.parametrize("chain", ["st", "st-gguf", "st-apr-gguf.run2", "st-gguf-st", "st-x", "gguf", "st-gguf.", "st.run2"])
def test_chain_patterns_agree_with_the_plan(chain):
    valid = bool(plan.CHAIN_RE.match(chain))
    assert bool(re.fullmatch(plan.CHAIN_PATTERN, chain)) == valid
    assert bool(re.fullmatch(plan.CONVERTED_CHAIN_PATTERN, chain)) == (valid and "-" in chain)
    for hop, fmt in plan.HOP_FORMAT.items():
        ends = valid and "-" in chain and plan.target_format(chain) == fmt
        assert bool(re.fullmatch(plan.chain_pattern(hop), chain)) == ends


def test_converter_params_primary_and_side(J):
    primary = w(model="qwen2-tiny", variant="q8_0", chain="st-gguf")
    side = w(model="qwen2-tiny", variant="q8_0", chain="st-gguf", converter="other")
    assert J.converter("converter")(primary) == "convqa"
    assert J.converter("converter")(side) == "other"
    assert J.converter("env")(side) == {"A": "1"} and J.converter("env")(primary) == {}
    assert J.converter("json_record")(primary) is True and J.converter("json_record")(side) is False
    assert J.converter("format")(primary) == "gguf"
    assert J.converter("quant")(primary) == "q8_0"
    assert J.converter("quant")(w(model="qwen2-tiny", variant="q8_0", chain="st-gguf-apr")) is None
    entry = J.config["converters"]["convqa"]
    assert J.converter("fingerprint")(primary) == converters.converter_fingerprint("convqa", entry, "safetensors", "gguf")
    assert J.converter("fingerprint")(side) == "other:7"
    with pytest.raises(KeyError):
        J.converter("nope")(primary)


def test_code_fingerprints_follow_the_formats(J):
    assert isinstance(J.code("gates.py"), str)
    inspect = J.code("inspect.py", J.chain_formats)
    assert inspect(w(chain="st-gguf")) == inspect(w(chain="st-apr-gguf.run2")) != inspect(w(chain="st-apr"))
    assert J.code("inspect.py", ["safetensors"]) == inspect(w(chain="st-gguf-st"))
    # An edge runs its parent format's reader and its own format's writer (fingerprint.writes).
    assert J.edge_formats(w(chain="st-gguf-apr")) == ("gguf", "apr:write")
    assert J.inferred_formats(w(model="m", engine="transformers", backend="cpu")) == ("safetensors", "safetensors")


def test_input_maps(J):
    gates = J.gate_input_map("qwen2-tiny", "native", "smoke")
    assert set(gates["manifests"]) == {"st", "st-gguf", "st-apr"}
    assert set(gates["comparisons"]) == {"st-gguf~st", "st-apr~st"}
    slots = J.xconv_gate_input_map("qwen2-tiny", "native", "smoke")
    assert [(s["chain"], s["converter"], s["primary_converter"]) for s in slots] == [("st-gguf", "other", "convqa")]
    report = J.report_input_map("qwen2-tiny", "smoke")
    assert "native/st-gguf@other" in report["manifests"]
    assert paths.xconv_gates_path("qwen2-tiny", "native", "smoke") in report["gate_tsvs"]
    assert J.conversion_input(w(model="m", variant="v", chain="st-gguf-apr")) == "results/m/v/st-gguf/model.gguf"
    assert J.side_compared(w(model="m", variant="v", converter="other", chain="st-gguf", against="parent"))["reference"] == "results/m/source"


def test_readers_declare_the_sidecar_of_a_converted_artifact(J):
    """A deleted artifact is restored by the job that reads it (convqa.workflow.intermediates), so
    its readers declare the sidecar; the source directory is never deleted and stays the input."""
    for chain, name in (("st-gguf", "model.gguf"), ("st-gguf-apr.run2", "model.apr"), ("st-apr-st", "model")):
        artifact = paths.artifact_path("m", "v", chain)
        assert artifact.endswith("/" + name)
        assert paths.dependency_of(artifact) == paths.dependency_path("m", "v", chain) == paths.sidecar_path("m", "v", chain)
        assert paths.artifact_of(paths.dependency_of(artifact)) == artifact
    assert paths.dependency_path("m", "v", "st") == paths.dependency_of("results/m/source") == "results/m/source"
    side = paths.side_sidecar_path("m", "v", "other", "st-gguf")
    assert paths.artifact_of(side) == side  # a side converter's artifact is Snakemake's temp(), not restored
    wc = w(model="m", variant="v", chain="st-gguf-apr")
    assert J.depends(J.conversion_input)(wc) == "results/m/v/st-gguf/sidecar.json"
    assert J.located(J.conversion_input)(wc) == {"artifact": "results/m/v/st-gguf/model.gguf"}
    compared = J.depends(J.compared_artifacts)(w(model="m", variant="v", subject="st-gguf-st", reference="st"))
    assert compared == {"subject": "results/m/v/st-gguf-st/sidecar.json", "reference": "results/m/source"}


def test_an_artifact_is_released_after_every_job_of_the_tier_that_reads_it(J):
    consumers = set(J.artifact_consumers("qwen2-tiny", "q8_0", "st-gguf", "mvp"))
    assert paths.manifest_path("qwen2-tiny", "q8_0", "st-gguf") in consumers
    children = {c for c in plan.artifact_chains("mvp", "q8_0") if plan.parent(c) == "st-gguf"}
    assert children and {paths.sidecar_path("qwen2-tiny", "q8_0", c) for c in children} <= consumers
    pairs = [(s, r) for s, r in J.comparison_pairs("mvp", "q8_0") if "st-gguf" in (s, r)]
    # A lossy comparison needs the artifact; an exact one is decided from the manifests
    # (scripts/compare.py), so the artifact does not wait for the round trips two hops down.
    lossy = {paths.comparison_path("qwen2-tiny", "q8_0", s, r) for s, r in pairs if not jobs.expected_exact(s, r, "q8_0")}
    exact = {paths.comparison_path("qwen2-tiny", "q8_0", s, r) for s, r in pairs if jobs.expected_exact(s, r, "q8_0")}
    assert lossy == {paths.comparison_path("qwen2-tiny", "q8_0", "st-gguf", "st")}
    assert "st-gguf-apr-gguf~st-gguf" in {p.rpartition("/")[2].removesuffix(".json") for p in exact}
    assert lossy <= consumers and not exact & consumers
    assert paths.inference_run_path("qwen2-tiny", "q8_0", "st-gguf", "llamacpp", "cpu") in consumers
    assert paths.serve_path("qwen2-tiny", "q8_0", "st-gguf", "llamacpp") in consumers
    assert paths.parity_path("qwen2-tiny", "q8_0", "st-gguf") in consumers
    assert paths.side_sidecar_path("qwen2-tiny", "q8_0", "other", "st-gguf") not in consumers  # reads the source
    assert paths.side_comparison_path("qwen2-tiny", "q8_0", "other", "st-gguf", "primary") in consumers
    # Its re-run (F-CONV-IDEM-001) converts while it is still there, to share identical bytes.
    assert paths.sidecar_path("qwen2-tiny", "q8_0", "st-gguf.run2") in consumers
    # Every release is a tier target, so each artifact goes once its readers are done.
    targets = J.tier_targets("mvp")
    assert paths.release_path("qwen2-tiny", "q8_0", "st-gguf", "mvp") in targets
    kept = jobs.Jobs({**J.config, "temp_intermediates": False}, SCRIPTS)
    assert not [t for t in kept.tier_targets("mvp") if "released-" in t]


def test_resources_count_the_artifact_a_sidecar_stands_for(tmp_path):
    chain_dir = tmp_path / "results" / "m" / "v" / "st-gguf"
    chain_dir.mkdir(parents=True)
    sidecar = chain_dir / "sidecar.json"
    sidecar.write_text('{"size": 3145728}')
    # Deleted after use: the size the sidecar recorded (the job restores it before reading it).
    assert jobs.input_bytes([str(sidecar)]) == 3145728
    (chain_dir / "model.gguf").write_bytes(b"\0" * 1000)
    assert jobs.input_bytes([str(sidecar)]) == 1000
    source = tmp_path / "results" / "m" / "source"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"\0" * 24)
    assert jobs.input_bytes([str(sidecar), str(source)]) == 1024
    assert jobs.conversion_mem_mb(None, SimpleNamespace(artifact=str(sidecar)), 1) == 500


def test_conversions_and_comparisons_are_sized_by_the_largest_tensor(J, tmp_path, monkeypatch):
    """A 1.5B model's F32 artifacts are 6-7 GB, but convqa's converter and the comparison hold a
    tensor (pair) at a time: sized from the files, each asked for the whole 14 GB budget of the
    scale benchmark and ran alone. A comparison the manifests decide reads only them."""
    import json

    monkeypatch.chdir(tmp_path)
    model = "qwen2-tiny"
    manifest = {"config": {"params": {}}, "tensors": [{"shape": [151936, 1536]}, {"shape": [1536]}]}
    (tmp_path / "results" / model).mkdir(parents=True)
    (tmp_path / paths.source_manifest_path(model)).write_text(json.dumps(manifest))
    largest_mb = 151936 * 1536 * 4 / 2**20  # 890 MB
    assert jobs.largest_tensor_mb(model) == pytest.approx(largest_mb)
    sidecar = tmp_path / paths.sidecar_path(model, "native", "st-gguf-apr")
    sidecar.parent.mkdir(parents=True)
    sidecar.write_text(json.dumps({"size": 7 * 2**30}))  # a deleted 7 GB F32 APR
    wc = w(model=model, variant="native", chain="st-gguf-apr-gguf")
    mem = J.routed_conversion_mem_mb(wc, SimpleNamespace(artifact=str(sidecar)), 1)
    assert mem == int(2 * largest_mb + 500) < 3000
    assert J.routed_conversion_mem_mb(wc, SimpleNamespace(artifact=str(sidecar)), 2) == 2 * mem  # retried
    external = jobs.Jobs({**J.config, "route": {"apr-gguf": ["other"]}}, SCRIPTS)
    wc_external = w(model=model, variant="native", chain="st-apr-gguf")
    assert external.routed_conversion_mem_mb(wc_external, SimpleNamespace(artifact=str(sidecar)), 1) == 3 * 7 * 1024 + 500
    moe = {**manifest, "config": {"params": {"num_experts": 8}}}
    (tmp_path / paths.source_manifest_path(model)).write_text(json.dumps(moe) + " ")  # a new version: not the cached one
    assert jobs.largest_tensor_mb(model) == pytest.approx(8 * largest_mb)

    (tmp_path / paths.source_manifest_path(model)).write_text(json.dumps(manifest))
    inputs = SimpleNamespace(subject=str(sidecar), reference=str(sidecar),
                             subject_manifest=str(tmp_path / "missing.json"), reference_manifest=str(tmp_path / "missing.json"))
    full = J.comparison_mem_mb(w(model=model), inputs, 1)
    assert full == int(4 * largest_mb + 500)
    decided = {"config": {"architecture": "qwen2"}, "tokenizer": None,
               "tensors": [{"name": "w", "shape": [2, 2], "encoding": "F32", "sha256": "a", "values_sha256": "a",
                            "stats": {"nan": 0, "inf": 0}}]}
    (tmp_path / "decided.json").write_text(json.dumps(decided))
    inputs.subject_manifest = inputs.reference_manifest = str(tmp_path / "decided.json")
    assert J.comparison_mem_mb(w(model=model), inputs, 1) == 500


def test_first_hops_are_sized_from_the_source_header_before_its_manifest(J, tmp_path, monkeypatch, synthetic_dir):
    """Snakemake sizes a job once, when it first becomes ready; the conversions out of S become
    ready together with inspect_source. Sized before the manifest existed (3x the source), each
    1.5B first hop asked 9.3 of the bench's 14 GB."""
    import json
    import math
    import shutil

    from convqa.formats import open_model

    monkeypatch.chdir(tmp_path)
    model = "qwen2-tiny"
    source = tmp_path / paths.source_dir(model)
    source.parent.mkdir(parents=True)
    assert jobs.largest_tensor_mb(model) is None  # nothing prepared yet
    shutil.copytree(synthetic_dir("qwen2-tiny"), source)
    assert jobs.largest_tensor_mb(model) is None, "a source without its sidecar is not complete yet"
    (tmp_path / f"{paths.source_dir(model)}.sidecar.json").write_text("{}")
    with open_model(source) as m:
        largest_mb = max(math.prod(t.shape) for t in m.tensors.values()) * 4 / 2**20
    assert jobs.largest_tensor_mb(model) == pytest.approx(largest_mb)
    wc = w(model=model, variant="native", chain="st-gguf")
    mem = J.routed_conversion_mem_mb(wc, SimpleNamespace(artifact=str(source)), 1)
    assert mem == int(2 * largest_mb + 500)
    # The manifest, once written, is what counts (the same number for a dense model).
    manifest = {"config": {"params": {"num_experts": 4}}, "tensors": [{"shape": [10, 1000]}]}
    (tmp_path / paths.source_manifest_path(model)).write_text(json.dumps(manifest))
    assert jobs.largest_tensor_mb(model) == pytest.approx(4 * 10 * 1000 * 4 / 2**20)


def test_a_conversion_that_writes_more_than_the_source_holds_takes_every_slot(J, tmp_path, monkeypatch, synthetic_dir):
    """The hops after a Q8_0 GGUF hold F32: from a BF16 source they are twice its size (6-7 GB at
    1.5B), and two side by side were the peak disk. They take both of profiles/default's 2
    `conversion_slots`; any other conversion takes one, so two of those run at once."""
    import shutil

    monkeypatch.chdir(tmp_path)
    model = "qwen2-tiny"
    source = tmp_path / paths.source_dir(model)
    parent_sidecar = tmp_path / paths.sidecar_path(model, "q8_0", "st-gguf")

    def slots(variant, chain, parent=parent_sidecar):
        return J.conversion_slots(w(model=model, variant=variant, chain=chain), SimpleNamespace(artifact=str(parent)))

    # Not decided before the parent is written: Snakemake asks again when the input exists.
    with pytest.raises(FileNotFoundError) as missing:
        slots("q8_0", "st-gguf-apr")
    assert missing.value.filename == str(parent_sidecar)

    shutil.copytree(synthetic_dir("qwen2-tiny", dtype="bfloat16"), source)
    (tmp_path / f"{paths.source_dir(model)}.sidecar.json").write_text("{}")
    parent_sidecar.parent.mkdir(parents=True)
    parent_sidecar.write_text("{}")
    assert jobs.source_bytes_per_param(model) == pytest.approx(2.0)
    wide = jobs.WIDE_CONVERSION_SLOTS
    assert wide == 2
    for chain in ("st-gguf-apr", "st-gguf-st", "st-gguf-apr-gguf", "st-gguf-apr.run2", "st-gguf-st-apr"):
        assert slots("q8_0", chain) == wide, chain  # dequantized to F32: twice the BF16 source
    for variant, chain in (("q8_0", "st-gguf"), ("q8_0", "st-gguf.run2"), ("native", "st-gguf"),
                           ("native", "st-apr-gguf-apr"), ("native", "st-gguf-st")):
        assert slots(variant, chain) == 1, (variant, chain)  # the source's dtype, or Q8_0 blocks
    limited = jobs.Jobs(J.config, SCRIPTS)
    limited.conversion_slots_provided = 1  # `--resources conversion_slots=1`: never more than that
    assert limited.conversion_slots(w(model=model, variant="q8_0", chain="st-gguf-apr"),
                                    SimpleNamespace(artifact=str(parent_sidecar))) == 1

    # An F32 source: no hop writes more than it holds, two conversions at a time.
    shutil.rmtree(source)
    shutil.copytree(synthetic_dir("qwen2-tiny"), source)
    (tmp_path / f"{paths.source_dir(model)}.sidecar.json").write_text("{ }")  # a new version of the source
    assert jobs.source_bytes_per_param(model) == pytest.approx(4.0)
    assert slots("q8_0", "st-gguf-apr") == 1


def test_config_errors():
    c = config(variants=["native", "q9_9"])
    with pytest.raises(Exception, match="unknown variant 'q9_9'"):
        jobs.Jobs(c, SCRIPTS)
    c = config(route={"st-gguf": ["missing"]})
    with pytest.raises(Exception, match="not defined under `converters:`"):
        jobs.Jobs(c, SCRIPTS)
    with pytest.raises(Exception, match="needs a `detection:` section"):
        jobs.Jobs(config(), SCRIPTS).detection_reports()


def test_wildcard_constraints(J):
    assert re.fullmatch(J.constraint("model"), "qwen2-tiny")
    assert not re.fullmatch(J.constraint("model"), "qwen2-tinyX")
    assert J.constraint("mutant") == "(?!)"  # no detection section: matches nothing
    assert re.fullmatch(J.constraint("converter"), "other")


def test_variants_that_quantize_the_same_first_hop_share_its_conversions(J):
    """q8_0 quantizes only S->G: its S->A family is native's conversions, run once, and read by the
    rows of both variants."""
    variants = ["native", "q8_0"]
    assert plan.owning_variant("q8_0", "st-apr-gguf-apr", variants) == "native"
    assert plan.owning_variant("q8_0", "st-apr.run2", variants) == "native"
    assert plan.owning_variant("q8_0", "st-gguf-apr", variants) == "q8_0"
    assert plan.owning_variant("native", "st-gguf", variants) == "native"
    assert plan.owning_variant("q8_0", "st-apr", ["q8_0"]) == "q8_0"  # no native run: its own
    assert plan.owning_variant("q4_0", "st-apr", ["q8_0", "q4_0"]) == "q8_0"  # neither quantizes S->A
    assert plan.owning_variant("apr-int8", "st-apr", variants + ["apr-int8"]) == "apr-int8"
    assert plan.comparison_owner("q8_0", "st-apr-st", "st", variants) == "native"
    assert plan.comparison_owner("q8_0", "st-gguf-apr", "st-apr", variants) == "q8_0"  # COM-001 mixes both

    gates = J.gate_input_map("qwen2-tiny", "q8_0", "mvp")
    assert gates["manifests"]["st-apr-gguf"] == paths.manifest_path("qwen2-tiny", "native", "st-apr-gguf")
    assert gates["sidecars"]["st-gguf-apr"] == paths.sidecar_path("qwen2-tiny", "q8_0", "st-gguf-apr")
    assert gates["comparisons"]["st-apr-gguf-apr~st-apr"] == paths.comparison_path("qwen2-tiny", "native", "st-apr-gguf-apr", "st-apr")
    assert gates["comparisons"]["st-gguf-apr~st-apr"] == paths.comparison_path("qwen2-tiny", "q8_0", "st-gguf-apr", "st-apr")
    compared = J.compared_artifacts(w(model="qwen2-tiny", variant="q8_0", subject="st-gguf-apr", reference="st-apr"))
    assert compared == {"subject": paths.artifact_path("qwen2-tiny", "q8_0", "st-gguf-apr"),
                        "reference": paths.artifact_path("qwen2-tiny", "native", "st-apr")}
    runs = J.inference_input_map("qwen2-tiny", "q8_0", "mvp")
    assert runs["runs"]["st-apr|transformers|cpu"]["json"] == paths.inference_run_path("qwen2-tiny", "native", "st-apr", "transformers", "cpu")
    assert runs["serves"]["st-apr|transformers"] == paths.serve_path("qwen2-tiny", "native", "st-apr", "transformers")
    assert runs["parities"]["st-gguf"] == paths.parity_path("qwen2-tiny", "q8_0", "st-gguf")

    # native's st-apr goes after the readers of both variants; one release per artifact.
    consumers = J.artifact_consumers("qwen2-tiny", "native", "st-apr", "mvp")
    assert paths.comparison_path("qwen2-tiny", "q8_0", "st-gguf-apr", "st-apr") in consumers
    targets = J.tier_targets("mvp")
    assert paths.release_path("qwen2-tiny", "native", "st-apr", "mvp") in targets
    assert not [t for t in targets if "/q8_0/st-apr" in t]


def test_a_rerun_converts_after_the_conversion_it_repeats_and_before_other_conversions(J):
    """st-gguf-apr.run2 waits for st-gguf-apr (convqa.workflow.intermediates.share_bytes stores
    equal bytes once) and is started before any other conversion, so that st-gguf-apr, which
    waits for it in turn, is not held on disk longer than its own readers need."""
    run2 = w(model="m", variant="v", chain="st-gguf-apr.run2")
    assert J.repeated_artifact(run2) == "results/m/v/st-gguf-apr/model.apr"
    assert J.repeated_sidecar(run2) == "results/m/v/st-gguf-apr/sidecar.json"
    for chain in ("st-gguf-apr", "st-gguf", "st-apr-st"):
        assert J.repeated_artifact(w(model="m", variant="v", chain=chain)) is None
        assert J.repeated_sidecar(w(model="m", variant="v", chain=chain)) == []
    # q8_0's re-run of S->A is native's conversion, as S->A is
    assert J.repeated_artifact(w(model="qwen2-tiny", variant="native", chain="st-apr.run2")).startswith("results/qwen2-tiny/native/st-apr/")
    others = [w(model="qwen2-tiny", variant=J.owner("qwen2-tiny", v, c), chain=c)
              for v in ("native", "q8_0") for c in plan.artifact_chains("full", v) if "." not in c]
    assert max(J.conversion_priority(o) for o in others) < J.conversion_priority(run2) < jobs.READER_PRIORITY


def test_conversions_go_lineage_by_lineage_deeper_first(J):
    """A first hop's subtree (one variant's) is preferred over the next one's, so that its
    artifacts are written and released before the next lineage's are written."""
    assert J.lineages("qwen2-tiny") == [("native", "st-gguf"), ("native", "st-apr"), ("q8_0", "st-gguf")]

    def priority(variant, chain):
        return J.conversion_priority(w(model="qwen2-tiny", variant=variant, chain=chain))

    lineage = ["st-gguf", "st-gguf-apr", "st-gguf-apr-gguf", "st-gguf-apr-gguf-apr"]
    assert [priority("q8_0", c) for c in lineage] == sorted(priority("q8_0", c) for c in lineage)
    assert len({priority("q8_0", c) for c in lineage}) == 4
    # the deepest conversion of a later lineage comes after the first hop of an earlier one
    assert priority("native", "st-apr-gguf-apr-gguf") < priority("native", "st-gguf")
    assert priority("q8_0", "st-gguf-apr-gguf-apr") < priority("native", "st-apr")
    # every conversion below every reader, every reader below every release
    assert priority("native", "st-gguf-apr-gguf-apr") < jobs.READER_PRIORITY < jobs.RELEASE_PRIORITY
    assert plan.repeated_chain("st-apr.run3") == "st-apr" and plan.repeated_chain("st-apr") is None
    with pytest.raises(ValueError):
        plan.repeated_chain("st-zip.run2")
