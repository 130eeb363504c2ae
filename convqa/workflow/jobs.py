"""The workflow's jobs for one config: wildcard constraints, input functions, params, resources.

The Snakefile and rules/*.smk hold the rules; everything a rule computes from the config or its
wildcards is a method of `Jobs` (input functions and params take the job's `wildcards`), so it
is plain Python with unit tests (tests/test_workflow_paths.py). Every path comes from
convqa.workflow.paths.

Code fingerprints (`code`) are derived from what a rule's `script:` imports
(convqa.workflow.fingerprint.script_fingerprint), cut to the formats the job reads or writes.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError

from convqa.compare.manifests import compare_from_manifests
from convqa.convert import converters
from convqa.detection import matrix as detection
from convqa.encodings import QUANT_TARGETS
from convqa.files import path_size
from convqa.gates.edges import expected_exact
from convqa.gates.rows import label
from convqa.infer import memory
from convqa.sources.prepare import input_files, kind_fingerprint_args
from convqa.workflow import gpu, paths, plan, references
from convqa.workflow.estimate import chain_bytes_per_param
from convqa.workflow.fingerprint import script_fingerprint, writes
from convqa.workflow.paths import SOURCE_CHAIN, artifact_format

INFERENCE_ENGINE_FILE = {"transformers": "transformers", "llama.cpp": "llamacpp"}
INFERENCE_ENGINE_NAME = {v: k for k, v in INFERENCE_ENGINE_FILE.items()}
SLOT_PATH_KEYS = ("sidecar", "manifest", "vs_primary", "vs_parent")


def _alternatives(names):
    return "|".join(re.escape(n) for n in names)


def _flatten(mapping):
    found = []
    for value in mapping.values():
        found.extend(value.values() if isinstance(value, dict) else value)
    return sorted(set(found))


# ---------------------------------------------------------------- resources


def path_size_mb(path):
    return path_size(path) / 2**20


def artifact_size_mb(dependency):
    """MB of the artifact a job input stands for (paths.dependency_path): the file if it is on
    disk, else the size its sidecar recorded (an artifact deleted after use, to be restored)."""
    artifact = paths.artifact_of(dependency)
    if Path(artifact).exists():
        return path_size_mb(artifact)
    try:
        return int(json.loads(Path(dependency).read_text()).get("size") or 0) / 2**20
    except (OSError, ValueError):
        return 0.0


def input_bytes(files) -> int:
    """Bytes a job reads: each input counted as the artifact it stands for (a converted artifact's
    sidecar as the artifact, on disk or as recorded), a directory as the files inside. The SLURM
    profile's memory and runtime expressions scale with this."""
    total = 0.0
    for f in files:
        f = str(f)
        if paths.artifact_of(f) != f:
            total += artifact_size_mb(f) * 2**20
        elif Path(f).exists():
            total += path_size(f)
    return int(total)


def conversion_mem_mb(wildcards, input, attempt):
    # Any converter (an external one may load the whole model): 3x the input. Doubles on retry.
    return int((3 * artifact_size_mb(input.artifact) + 500) * attempt)


_JSON_CACHE: dict[str, tuple[tuple, dict | None]] = {}


def _cached_json(path: str) -> dict | None:
    """A JSON file parsed once per version (mtime, size): resources are evaluated on every
    scheduler pass, and a manifest of a 1.5B model is 340 tensor entries. None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_mtime_ns, st.st_size)
    if path not in _JSON_CACHE or _JSON_CACHE[path][0] != key:
        try:
            _JSON_CACHE[path] = (key, json.loads(Path(path).read_text()))
        except (OSError, ValueError):
            return None
    return _JSON_CACHE[path][1]


_DECIDED: dict[tuple, bool] = {}


def decided_from_manifests(reference_manifest: str, subject_manifest: str) -> bool:
    """Whether the two manifests decide the comparison (convqa.compare.manifests), once per version
    of both: the scheduler asks on every pass, and deciding takes 11 ms for a 1.5B model's pair."""
    reference, subject = _cached_json(reference_manifest), _cached_json(subject_manifest)
    if reference is None or subject is None:
        return False
    key = (reference_manifest, _JSON_CACHE[reference_manifest][0], subject_manifest, _JSON_CACHE[subject_manifest][0])
    if key not in _DECIDED:
        _DECIDED[key] = compare_from_manifests(reference, subject) is not None
    return _DECIDED[key]


def largest_tensor_mb(model) -> float | None:
    """MB of the model's largest tensor decoded to float32, from the source's manifest, or from
    the source's header while the manifest is not written yet (None before the source is); an
    MoE model's times its expert count, as GGUF stacks the experts.

    The header matters: Snakemake sizes a job once, when it first becomes ready, and the first
    hops become ready with inspect_source. Sized without it (3x the source), each 1.5B conversion
    out of S asked 9.3 GB of the bench's 14 GB and ran beside nothing but small readers."""
    manifest = _cached_json(paths.source_manifest_path(model))
    if manifest and manifest.get("tensors"):
        values = max(math.prod(t["shape"]) for t in manifest["tensors"])
        experts = ((manifest.get("config") or {}).get("params") or {}).get("num_experts") or 1
    elif (header := _source_header(model)) is not None:
        values, experts = header
    else:
        return None
    return values * experts * 4 / 2**20


_HEADERS: dict[str, tuple[tuple, tuple[int, int, float] | None]] = {}


def _source_header(model) -> tuple[int, int] | None:
    """(elements of the largest tensor, expert count) of the prepared source (`_source_facts`)."""
    facts = _source_facts(model)
    return facts[:2] if facts else None


def source_bytes_per_param(model) -> float | None:
    """Bytes the prepared source stores per parameter (2.0 for BF16), None before it exists."""
    facts = _source_facts(model)
    return facts[2] if facts else None


def _source_facts(model) -> tuple[int, int, float] | None:
    """(elements of the largest tensor, expert count, bytes per parameter) of the prepared source,
    read from its header once per version of its sidecar (prepare_source writes it after the
    source). None while there is none, or when the source cannot be read (the gates say why)."""
    from convqa.errors import FormatError
    from convqa.formats import open_model

    source = paths.source_dir(model)
    try:
        st = os.stat(f"{source}.sidecar.json")
    except OSError:
        return None
    key = (st.st_mtime_ns, st.st_size)
    if source not in _HEADERS or _HEADERS[source][0] != key:
        try:
            with open_model(source) as artifact:
                tensors = list(artifact.tensors.values())
                values = max((math.prod(t.shape) for t in tensors), default=0)
                experts = artifact.config.params.get("num_experts") or 1
                per_param = sum(t.nbytes for t in tensors) / max(1, sum(t.n_elements for t in tensors))
            found = (values, experts, per_param) if values else None
        except (OSError, FormatError):
            found = None
        _HEADERS[source] = (key, found)
    return _HEADERS[source][1]


def inference_mem_mb(wildcards, input, attempt):
    # What the engine needs for this artifact (convqa.infer.memory), so that Snakemake's
    # --resources mem_mb=N never starts two big models at once; doubles on retry.
    artifact = paths.artifact_of(input.artifact)
    recorded = None
    if artifact != input.artifact:  # a converted artifact: its sidecar says what was written
        recorded = (plan.target_format(wildcards.chain), int(artifact_size_mb(input.artifact) * 2**20))
    return memory.job_mem_mb(artifact, engine_name(wildcards), attempt, source=getattr(input, "source", None),
                             recorded=recorded)


def reference_mem_mb(wildcards, input, attempt):
    return memory.job_mem_mb(input.source, "transformers", attempt, reference=True)


# Scheduling for disk (config temp_intermediates). Snakemake starts the highest-priority ready
# job: a release (rules/intermediates.smk) before anything else, then a job that reads an
# artifact (so that it can go), then a re-run (`st-gguf-apr.run2`), right after the conversion it
# repeats, whose artifact waits for it: identical bytes are then one file on disk
# (convqa.workflow.intermediates.share_bytes). Other conversions go lineage by lineage (the
# subtree of one first hop out of S, of one variant: Jobs.lineages), the deeper first within one:
# a lineage's artifacts are written and released before the next one's. A priority only orders the
# ready jobs: with a core free, Snakemake still starts a sibling subtree's conversion, so
# profiles/default also limits the conversions at once (`conversion_slots`, Jobs.conversion_slots).
# At 1.5B: 38.7 GB at the peak (12.5x the source) with the priorities alone, 23.3 GB (7.5x) with
# one conversion at a time.
RELEASE_PRIORITY = 10000
READER_PRIORITY = 1000
REPEAT_PRIORITY = READER_PRIORITY - 1
LINEAGE_PRIORITY_STEP = 10  # more than a chain's depth (4 hops after S in the full tier)
# profiles/default provides 2 `conversion_slots`. A conversion that writes more bytes than the
# source holds (the hops after a Q8_0 GGUF, dequantized to F32: 6-7 GB from a 3.1 GB BF16 source
# at 1.5B) takes both and runs alone, as the peak disk is two of those side by side; any other
# takes one, so two run at once (Jobs.conversion_slots).
WIDE_CONVERSION_SLOTS = 2
UNLIMITED_CONVERSIONS_NOTE = (
    "convqa: conversions are not limited (no conversion_slots in --resources; a --resources on the "
    "command line replaces profiles/default's list), so big ones run side by side and hold more disk "
    "at once (at 1.5B: 38.7 GB at the peak instead of 23.3 GB). Add conversion_slots=2 to keep the default."
)


def gpu_count(wildcards):
    return 1 if wildcards.backend == "gpu" else 0


def engine_name(wildcards):
    return INFERENCE_ENGINE_NAME[wildcards.engine]


def engines_reading(engines: list[str], chain: str) -> list[str]:
    """Engines that read the chain's artifact: llama.cpp only reads GGUF."""
    fmt = artifact_format(chain)
    return [e for e in engines if e == "transformers" or fmt == "gguf"]


def served_cells(inference: dict, tier: str) -> list[tuple[str, str]]:
    """(chain, engine) pairs served over HTTP in `tier` (config inference.serve)."""
    if "serve" not in inference["modalities"]:
        return []
    every = {(chain, engine) for chain in inference["chains"][tier] for engine in engines_reading(inference["engines"], chain)}
    wanted = inference["serve"][tier]
    if "all" in wanted:
        return sorted(every)
    pairs = {tuple(item.split(":", 1)) for item in wanted}
    unknown = sorted(f"{c}:{e}" for c, e in pairs - every)
    if unknown:
        raise WorkflowError(
            f"config: inference.serve.{tier} names {', '.join(unknown)}, which the tier does not run "
            f"(its inference chains are {', '.join(inference['chains'][tier])}; llama.cpp reads only GGUF)"
        )
    return sorted(pairs)


class Jobs:
    """Input functions and params of the workflow's rules for `config`; `scripts` is the
    directory of the rules' `script:` files (their imports give the code fingerprints)."""

    def __init__(self, config: dict, scripts: str | Path):
        self.config = config
        self.scripts = Path(scripts)
        self.models = list(config["models"])
        self.variants = list(config["variants"])
        # Every variant some model runs: what the wildcards accept and the checks cover.
        self.all_variants = sorted({v for m in self.models for v in self.model_variants(m)})
        self.tier = config["tier"]
        self.tiers = list(plan.TIER_CHECKS)
        # The run's `--resources conversion_slots=N` (rules/common.smk), None when not limited: no
        # conversion asks more than there is (Snakemake would stop with an error).
        self.conversion_slots_provided: int | None = None
        self.inference = config["inference"]
        self.detection = config.get("detection") or {}
        self.detection_entries = detection.entries(self.detection) if self.detection else []
        self.output_path_entries = {
            e.mutant: e for e in self.detection_entries if e.check == detection.OUTPUT_PATH
        }
        # None: the gpu backend's jobs are planned; else why its cells are skipped without a job.
        self.gpu_skipped = gpu.skip_reason(config.get("gpu_jobs", gpu.AUTO)) if "gpu" in self.inference["backends"] else None
        self._check_routing()
        self._check_variants()

    # ------------------------------------------------------------ config checks

    def _check_routing(self):
        edges = {converters.edge_name(c) for tier in self.tiers for c in plan.artifact_chains(tier, "native")}
        try:
            converters.check_routing(self.config, edges)
        except converters.ConverterConfigError as exc:
            raise WorkflowError(str(exc))

    def _check_variants(self):
        first_hop_formats = {
            plan.target_format(c)
            for tier in self.tiers
            for c in plan.artifact_chains(tier, "native")
            if plan.is_first_hop(c)
        }
        for variant in self.all_variants:
            if variant == "native":
                continue
            if variant not in QUANT_TARGETS:
                raise WorkflowError(
                    f"config: unknown variant {variant!r}; known: native, {', '.join(QUANT_TARGETS)}"
                )
            if not any(f in QUANT_TARGETS[variant] for f in first_hop_formats):
                raise WorkflowError(
                    f"config: variant {variant!r} applies to none of the formats the qualification "
                    f"converts S to ({', '.join(sorted(first_hop_formats))}); pick another variant"
                )

    def constraint(self, wildcard):
        """The global constraint of a wildcard (the `wildcard_constraints:` in common.smk)."""
        return {
            "model": lambda: _alternatives(self.models),
            "variant": lambda: _alternatives(self.all_variants),
            "chain": lambda: plan.CHAIN_PATTERN,
            "subject": lambda: plan.CHAIN_PATTERN,
            "reference": lambda: plan.CHAIN_PATTERN,
            "tier": lambda: "|".join(self.tiers),
            "engine": lambda: "|".join(INFERENCE_ENGINE_FILE.values()),
            "backend": lambda: "cpu|gpu",
            "converter": lambda: _alternatives(self.config["converters"]),
            "against": lambda: "primary|parent",
            "mutant": lambda: _alternatives(self.output_path_entries) or "(?!)",
        }[wildcard]()

    def model_variants(self, model):
        """The model's own `variants:` when it names some, else the config's."""
        return list(self.config["models"][model].get("variants") or self.variants)

    def owner(self, model, variant, chain):
        """The variant whose directory holds `variant`'s artifact of `chain` and every job on it
        (plan.owning_variant: q8_0's S->A family is native's, converted once)."""
        return plan.owning_variant(variant, chain, self._variants_of(model, variant))

    def comparison_owner(self, model, variant, subject, reference):
        return plan.comparison_owner(variant, subject, reference, self._variants_of(model, variant))

    def _variants_of(self, model, variant):
        return self.model_variants(model) if model in self.config["models"] else [variant]

    def artifact(self, model, variant, chain):
        """`paths.artifact_path` of `variant`'s `chain`, in its owner's directory."""
        return paths.artifact_path(model, self.owner(model, variant, chain), chain)

    def comparison(self, model, variant, subject, reference):
        return paths.comparison_path(model, self.comparison_owner(model, variant, subject, reference), subject, reference)

    def tier_targets(self, tier):
        """The reports and the summary, and with `temp_intermediates` the deletion of every
        converted artifact once the tier's jobs that read it are done (rules/intermediates.smk)."""
        targets = paths.tier_targets(self.models, tier)
        if self.config.get("temp_intermediates"):
            releases = {
                paths.release_path(model, self.owner(model, variant, chain), chain, tier)
                for model in self.models
                for variant in self.model_variants(model)
                for chain in plan.artifact_chains(tier, variant)
            }
            targets += sorted(releases)
        return targets

    # ------------------------------------------------------------ artifacts as job inputs

    @staticmethod
    def depends(artifacts):
        """Input function over `artifacts` (an input function giving artifact paths, one or by
        role): each converted artifact replaced by its sidecar (paths.dependency_path), so that
        a job reruns when the conversion does, never because a deleted artifact was restored."""

        def inputs(wildcards):
            found = artifacts(wildcards)
            if isinstance(found, str):
                return paths.dependency_of(found)
            return {role: paths.dependency_of(path) for role, path in found.items()}

        return inputs

    @staticmethod
    def located(artifacts, role="artifact"):
        """The `artifacts` param (role -> artifact path) a script hands to
        convqa.workflow.intermediates.restored."""

        def param(wildcards):
            found = artifacts(wildcards)
            return {role: found} if isinstance(found, str) else dict(found)

        return param

    def artifact_consumers(self, model, variant, chain, tier):
        """Outputs of every job of `tier` that reads the chain's artifact, for every variant whose
        conversion of the chain is this one (`owner`): its manifest, its children's conversions
        (primary and side), the comparisons it is part of, its inference runs, served checks,
        parity and reference-quantized runs. The artifact can go when all are there (rule
        release_artifact); a reader missing here would restore it, not fail."""
        found = set()
        for reader in self.model_variants(model):
            if self.owner(model, reader, chain) == variant:
                found |= self._consumers(model, reader, chain, tier)
        return sorted(found)

    def _consumers(self, model, variant, chain, tier):
        owner = self.owner(model, variant, chain)
        found = {paths.manifest_path(model, owner, chain)}
        for child in plan.artifact_chains(tier, variant):
            # A re-run of this conversion too: it shares the bytes if they are the same.
            if chain in (plan.parent(child), plan.repeated_chain(child)):
                found.add(paths.sidecar_path(model, owner, child))
        for subject, reference in self.comparison_pairs(tier, variant):
            # An exact comparison is decided from the manifests (scripts/compare.py), so the
            # artifact need not wait for it: a parent goes once its children exist, not when the
            # round trip two hops down is done. Should the values differ after all, the comparison
            # restores the artifact from its sidecar.
            if chain in (subject, reference) and not expected_exact(subject, reference, variant):
                found.add(self.comparison(model, variant, subject, reference))
        for side_chain, name in self.side_slots(model, variant, tier):
            side_owner = self.owner(model, variant, side_chain)
            if plan.parent(side_chain) == chain:
                found.add(paths.side_sidecar_path(model, side_owner, name, side_chain))
                found.add(paths.side_comparison_path(model, side_owner, name, side_chain, "parent"))
            if side_chain == chain:
                found.add(paths.side_comparison_path(model, side_owner, name, side_chain, "primary"))
        inputs = self.inference_input_map(model, variant, tier)
        for key, run in inputs["runs"].items():
            if key.split("|")[0] == chain and "json" in run:
                found.add(run["json"])
        for key, serve in inputs["serves"].items():
            if key.split("|")[0] == chain:
                found.add(serve)
        for key, run in inputs["references"].items():
            if key.split("|")[0] == chain and "json" in run:
                found.add(run["json"])
        if chain in inputs["parities"]:
            found.add(inputs["parities"][chain])
        return found

    def release_inputs(self, wildcards):
        return self.artifact_consumers(wildcards.model, wildcards.variant, wildcards.chain, wildcards.tier)

    # ------------------------------------------------------------ resources

    # What a job holds grows with the largest tensor, not with the model, for convqa's own
    # converter and the comparison, which read one tensor (pair) at a time. Sized from the whole
    # file, a 1.5B model's F32 artifacts asked for more than a 14 GB budget, so each conversion
    # and comparison ran alone on 2 cores.

    def routed_conversion_mem_mb(self, wildcards, input, attempt):
        """A primary conversion: convqa's converter streams a tensor at a time (measured at 1.5B:
        753 MiB for BF16 -> Q8_0, 0.9-1.3 GB passthrough, largest tensor 0.9 GB in F32), so twice
        the largest tensor in F32 plus the interpreter; another converter, 3x its input."""
        estimate = conversion_mem_mb(wildcards, input, 1)
        streams = converters.is_builtin(self.config["converters"][self.converter_name(wildcards)])
        if streams and (largest := largest_tensor_mb(wildcards.model)) is not None:
            estimate = min(estimate, int(2 * largest + 500))
        return int(estimate * attempt)

    def comparison_mem_mb(self, wildcards, input, attempt):
        """A comparison the manifests decide reads only them; else a tensor pair at a time, each
        decoded to float32 and differenced in float64 a slice at a time (measured at 1.5B, the
        BF16 source against its Q8_0 GGUF: 3.2 GB RSS with both files' pages mapped, for the
        0.9 GB embedding; 5.6 GB with whole-tensor float64 temporaries), bounded by twice both
        artifacts."""
        if decided_from_manifests(input.reference_manifest, input.subject_manifest):
            return 500 * attempt
        estimate = 2 * (artifact_size_mb(input.subject) + artifact_size_mb(input.reference)) + 500
        if (largest := largest_tensor_mb(wildcards.model)) is not None:
            estimate = min(estimate, 4 * largest + 500)
        return int(estimate * attempt)

    # ------------------------------------------------------------ code fingerprints

    def code(self, script, formats=(), exclude=()):
        """The `fingerprint` param of a rule running `scripts/<script>`: a string, or a function
        of the wildcards where `formats`/`exclude` are (the formats the job reads or writes)."""
        path = str(self.scripts / script)
        if not callable(formats) and not callable(exclude):
            return script_fingerprint(path, tuple(sorted(formats)), tuple(exclude))

        def fingerprint(wildcards):
            f = formats(wildcards) if callable(formats) else formats
            x = exclude(wildcards) if callable(exclude) else exclude
            return script_fingerprint(path, tuple(sorted(set(f))), tuple(x))

        return fingerprint

    @staticmethod
    def chain_formats(wildcards):
        return (artifact_format(wildcards.chain),)

    @staticmethod
    def edge_formats(wildcards):
        """An edge reads its parent's format and writes its chain's."""
        return (artifact_format(plan.parent(wildcards.chain)), writes(artifact_format(wildcards.chain)))

    @staticmethod
    def compared_formats(wildcards):
        return (artifact_format(wildcards.subject), artifact_format(wildcards.reference))

    @staticmethod
    def side_compared_formats(wildcards):
        other = wildcards.chain if wildcards.against == "primary" else plan.parent(wildcards.chain)
        return (artifact_format(wildcards.chain), artifact_format(other))

    @staticmethod
    def inferred_formats(wildcards):
        """The artifact's format and the source's (the tokenizer and config come from it)."""
        return (artifact_format(getattr(wildcards, "chain", SOURCE_CHAIN)), "safetensors")

    @staticmethod
    def reference_formats(wildcards):
        return ("safetensors", artifact_format(wildcards.hop))

    def _source_kind(self, wildcards):
        return kind_fingerprint_args(self.config["models"][wildcards.model]["source"]["kind"])

    def source_formats(self, wildcards):
        return self._source_kind(wildcards)[0]

    def source_exclude(self, wildcards):
        return self._source_kind(wildcards)[1]

    def output_path_formats(self, wildcards):
        chain = self.output_path_entries[wildcards.mutant].chain
        return (artifact_format(plan.parent(chain)), writes(artifact_format(chain)))

    # ------------------------------------------------------------ sources

    def source_inputs(self, wildcards):
        return input_files(self.config["models"][wildcards.model]["source"])

    def source_spec(self, wildcards):
        return dict(self.config["models"][wildcards.model]["source"])

    # ------------------------------------------------------------ conversions, primary and side

    def converter_name(self, wildcards):
        """A side-by-side job's own converter, else the one routed first to the chain's edge."""
        side = getattr(wildcards, "converter", None)
        return side or converters.primary_converter(self.config, wildcards.model, wildcards.chain)

    def converter(self, key):
        """A converter param of a conversion job (primary or side): `converter`, `command`,
        `json_record`, `env`, `fingerprint`, `format` or `quant`, as a function of the wildcards."""

        def param(wildcards):
            name = self.converter_name(wildcards)
            entry = self.config["converters"][name]
            if key == "converter":
                return name
            if key == "command":  # a function, so Snakemake does not format {input}/{output} itself
                return entry["command"]
            if key == "json_record":
                return entry.get("json_record", False)
            if key == "env":
                return dict(entry.get("env") or {})
            if key == "format":
                return plan.target_format(wildcards.chain)
            if key == "quant":
                return plan.edge_quant(wildcards.variant, wildcards.chain)
            if key == "fingerprint":
                # convqa: the code the edge runs; an external tool: its version and probe hash.
                source_hop, target_hop = plan.edge(wildcards.chain)
                return converters.converter_fingerprint(
                    name, entry, plan.HOP_FORMAT[source_hop], plan.HOP_FORMAT[target_hop]
                )
            raise KeyError(f"no converter param {key!r}")

        return param

    def conversion_input(self, wildcards):
        """The parent chain's (primary) artifact: for `st-gguf-apr`, `st-gguf/model.gguf`; a
        side-by-side converter converts the same input."""
        return self.artifact(wildcards.model, wildcards.variant, plan.parent(wildcards.chain))

    def lineages(self, model):
        """The model's lineages in the order their conversions are preferred: (owning variant,
        first hop out of S), the config's variant order, GGUF before APR; a first hop two
        variants share (q8_0's S->A is native's) is one lineage."""
        variants = self.model_variants(model)
        found = {(self.owner(model, variant, chain), plan.first_hop(chain))
                 for variant in variants for chain in plan.artifact_chains(self.tier, variant)}
        hop_order = list(plan.HOP_FORMAT)  # st, gguf, apr
        return sorted(found, key=lambda lin: (variants.index(lin[0]), hop_order.index(plan.hops(lin[1])[1])))

    def conversion_priority(self, wildcards):
        """Snakemake's priority of a conversion job (primary or side): see RELEASE_PRIORITY."""
        if plan.repeated_chain(wildcards.chain):
            return REPEAT_PRIORITY
        depth = len(plan.hops(wildcards.chain)) - 2
        lineages = self.lineages(wildcards.model) if wildcards.model in self.config["models"] else []
        lineage = (wildcards.variant, plan.first_hop(wildcards.chain))
        later = len(lineages) - lineages.index(lineage) if lineage in lineages else 0
        return later * LINEAGE_PRIORITY_STEP + depth

    def conversion_slots(self, wildcards, input):
        """`conversion_slots` a conversion holds (WIDE_CONVERSION_SLOTS): all of them when its
        artifact stores more bytes per parameter than the source (convqa.workflow.estimate's
        chain_bytes_per_param), else one. Asked again by Snakemake until the parent's sidecar is
        written (the FileNotFoundError), since the source's dtype is known by then."""
        os.stat(input.artifact)
        wide = WIDE_CONVERSION_SLOTS
        per_param = source_bytes_per_param(wildcards.model)
        if per_param is None or chain_bytes_per_param(wildcards.chain, wildcards.variant, per_param) <= per_param:
            wide = 1
        return min(wide, self.conversion_slots_provided or wide)

    def repeated_artifact(self, wildcards):
        """For a re-run's primary conversion (`st-gguf.run2`), the artifact of the conversion it
        repeats, which runs first (its sidecar is an input): equal bytes are shared, not stored
        twice (convqa.workflow.intermediates.share_bytes). None for any other chain."""
        repeated = plan.repeated_chain(wildcards.chain)
        return self.artifact(wildcards.model, wildcards.variant, repeated) if repeated else None

    def repeated_sidecar(self, wildcards):
        repeated = self.repeated_artifact(wildcards)
        return paths.dependency_of(repeated) if repeated else []

    def inspected_artifact(self, wildcards):
        return paths.artifact_path(wildcards.model, wildcards.variant, wildcards.chain)

    def compare_inputs(self, wildcards):
        """The compared artifacts' sidecars (paths.dependency_path) and their manifests, from
        which an exact comparison is decided without the artifacts."""
        found = self.depends(self.compared_artifacts)(wildcards)
        for side in ("subject", "reference"):
            chain = getattr(wildcards, side)
            found[f"{side}_manifest"] = paths.manifest_path(wildcards.model, self.owner(wildcards.model, wildcards.variant, chain), chain)
        return found

    @staticmethod
    def comparison_expected_exact(wildcards):
        """Whether the comparison is decided from the manifests for a correct converter, so that
        no release waits for it (`artifact_consumers`)."""
        return expected_exact(wildcards.subject, wildcards.reference, wildcards.variant)

    def compared_artifacts(self, wildcards):
        return {
            "subject": self.artifact(wildcards.model, wildcards.variant, wildcards.subject),
            "reference": self.artifact(wildcards.model, wildcards.variant, wildcards.reference),
        }

    # ------------------------------------------------------------ tensor gates and reports

    def comparison_pairs(self, tier, variant):
        """(subject, reference) of every tensor comparison: one per tensors-mode check, plus each
        converted artifact against its parent (the report's per-edge tensor errors; the contract
        gates compare manifest statistics). Sorted, no duplicates.
        """
        pairs = {(c.subject, c.reference) for c in plan.checks_for(tier, variant) if c.mode == "tensors"}
        pairs |= {(c, plan.parent(c)) for c in plan.artifact_chains(tier, variant)}
        return sorted(pairs)

    def gate_input_map(self, model, variant, tier):
        """What the gates script reads, by chain or pair; the same paths are the rule's inputs."""
        chains = plan.chains_for(tier, variant)
        return {
            "manifests": {c: paths.manifest_path(model, self.owner(model, variant, c), c) for c in chains},
            "sidecars": {c: paths.sidecar_path(model, self.owner(model, variant, c), c) for c in chains},
            "comparisons": {
                f"{s}~{r}": self.comparison(model, variant, s, r) for s, r in self.comparison_pairs(tier, variant)
            },
        }

    def report_input_map(self, model, tier):
        """Report inputs keyed by the labels the gate rows use (`variant/chain`), the side
        converters' as `variant/chain@converter`."""
        maps = {"gate_tsvs": [], "manifests": {}, "sidecars": {}, "comparisons": {}}
        for variant in self.model_variants(model):
            gates = self.gate_input_map(model, variant, tier)
            maps["gate_tsvs"].append(paths.gates_path(model, variant, tier))
            for kind in ("manifests", "sidecars", "comparisons"):
                for key, path in gates[kind].items():
                    maps[kind][label(variant, key)] = path
        for variant in self.model_variants(model):
            slots = self.xconv_gate_input_map(model, variant, tier)
            if not slots:
                continue
            maps["gate_tsvs"].append(paths.xconv_gates_path(model, variant, tier))
            for slot in slots:
                key = label(variant, converters.side_label(slot["chain"], slot["converter"]))
                maps["manifests"][key] = slot["manifest"]
                maps["sidecars"][key] = slot["sidecar"]
        return maps

    def gate_inputs(self, wildcards):
        return _flatten(self.gate_params(wildcards))

    def gate_params(self, wildcards):
        return self.gate_input_map(wildcards.model, wildcards.variant, wildcards.tier)

    def report_inputs(self, wildcards):
        return _flatten(self.report_params(wildcards))

    def report_params(self, wildcards):
        return self.report_input_map(wildcards.model, wildcards.tier)

    def summary_inputs(self, tier="{tier}"):
        return [paths.report_path(m, tier, "qualification.json") for m in self.models]

    # ------------------------------------------------------------ side-by-side converters

    def side_slots(self, model, variant, tier):
        """(chain, converter) of every side-by-side conversion a tier runs."""
        return [
            (chain, name)
            for chain in plan.artifact_chains(tier, variant)
            for name in converters.side_converters(self.config, model, chain)
        ]

    def xconv_gate_input_map(self, model, variant, tier):
        """Per slot, the paths the xconv gates read (the rule's inputs are exactly these)."""
        slots = []
        for chain, name in self.side_slots(model, variant, tier):
            parent = plan.parent(chain)
            owner = self.owner(model, variant, chain)  # a side conversion goes with its primary one
            slots.append(
                {
                    "chain": chain,
                    "converter": name,
                    "primary_converter": converters.primary_converter(self.config, model, chain),
                    "parent": parent,
                    "sidecar": paths.side_sidecar_path(model, owner, name, chain),
                    "manifest": paths.side_manifest_path(model, owner, name, chain),
                    "vs_primary": paths.side_comparison_path(model, owner, name, chain, "primary"),
                    "vs_parent": paths.side_comparison_path(model, owner, name, chain, "parent"),
                    "primary_manifest": paths.manifest_path(model, owner, chain),
                    "parent_manifest": paths.manifest_path(model, owner, parent),
                }
            )
        return slots

    def side_compared(self, wildcards):
        other = wildcards.chain if wildcards.against == "primary" else plan.parent(wildcards.chain)
        side = (wildcards.model, wildcards.variant, wildcards.converter, wildcards.chain)
        return {
            "artifact": paths.side_artifact_dir(*side),
            "sidecar": paths.side_sidecar_path(*side),
            "reference": self.artifact(wildcards.model, wildcards.variant, other),
        }

    def xconv_gate_inputs(self, wildcards):
        return sorted(
            {path for slot in self.xconv_gate_params(wildcards) for key, path in slot.items() if key.endswith(SLOT_PATH_KEYS)}
        )

    def xconv_gate_params(self, wildcards):
        return self.xconv_gate_input_map(wildcards.model, wildcards.variant, wildcards.tier)

    # ------------------------------------------------------------ inference

    def inference_engines(self, chain):
        return engines_reading(self.inference["engines"], chain)

    def inference_cells(self, tier):
        """(chain, engine, backend) of every run: the ground truth on every backend of the matrix
        (each backend's runs are judged against its own: convqa.workflow.references) plus the
        tier's chains."""
        cells = {references.ground_truth(backend).key for backend in self.inference["backends"]}
        cells.add(references.ground_truth("cpu").key)  # the cpu ground truth always runs (F-ENGINE, F-SERVE, detection)
        for chain in self.inference["chains"][tier]:
            for engine in self.inference_engines(chain):
                for backend in self.inference["backends"]:
                    cells.add((chain, engine, backend))
        return sorted(cells)

    def reference_hops(self, variant, tier):
        """(first hop, backend) of every reference-quantized model run: the first hops of the
        tier's inference chains on each backend of the matrix, for a variant with reference
        tolerances (config inference.reference_tolerances)."""
        wanted = set()
        for chain, engine, backend in self.inference_cells(tier):
            ref = references.quantized_reference(chain, engine, backend, variant, self.inference["reference_tolerances"])
            if ref is not None:
                wanted.add(ref.key)
        return sorted(wanted)

    def judged_by_owner(self, model, variant, hop):
        """Whether `variant` shares the first hop `hop` with a lossless variant (plan.owning_variant:
        q8_0's S->A is native's). The artifact's runs are then that variant's, held bit for bit to
        the ground truth by its F-INF rows, and a reference model of the hop would be the source
        again: none is run, and `variant` has no F-INF-REF rows on the hop."""
        owner = self.owner(model, variant, hop)
        return owner != variant and owner not in self.inference["reference_tolerances"]

    def served_cells(self, tier):
        return served_cells(self.inference, tier)

    def inference_input_map(self, model, variant, tier):
        """What the inference gates read, keyed `chain|engine|backend` and `chain|engine`."""
        files = INFERENCE_ENGINE_FILE

        def at(chain):  # runs, serves and parity of a conversion shared with another variant are its owner's
            return self.owner(model, variant, chain)

        reference_hops = self.reference_hops(variant, tier)
        judged = {hop for hop, _ in reference_hops if self.judged_by_owner(model, variant, hop)}

        def run(backend, json_path, npz_path):
            # A gpu cell that no job runs (gpu_jobs): its record is the reason, read by the gates.
            if backend == "gpu" and self.gpu_skipped:
                return {"skipped": self.gpu_skipped}
            return {"json": json_path, "npz": npz_path}

        return {
            "runs": {
                f"{c}|{e}|{b}": run(
                    b,
                    paths.inference_run_path(model, at(c), c, files[e], b),
                    paths.inference_run_path(model, at(c), c, files[e], b, "npz"),
                )
                for c, e, b in self.inference_cells(tier)
            },
            "serves": {f"{c}|{e}": paths.serve_path(model, at(c), c, files[e]) for c, e in self.served_cells(tier)},
            "references": {
                f"{hop}|{b}": run(
                    b,
                    paths.reference_run_path(model, at(hop), hop, backend=b),
                    paths.reference_run_path(model, at(hop), hop, "npz", backend=b),
                )
                for hop, b in reference_hops
                if hop not in judged
            },
            "judged_by_owner": {hop: at(hop) for hop in sorted(judged)},
            "parities": {c: paths.parity_path(model, at(c), c) for c in self.parity_chains(tier)},
        }

    def parity_chains(self, tier):
        """Chains whose tokenizer and chat template are held to the source's (rule parity): the
        tier's inference chains, the source itself included (its template as convqa reads it)."""
        return sorted(set(self.inference["chains"][tier]))

    def inference_gate_inputs(self, wildcards):
        inputs = self.inference_input_map(wildcards.model, wildcards.variant, wildcards.tier)
        runs = list(inputs["runs"].values()) + list(inputs["references"].values())
        found = [run[k] for run in runs for k in ("json", "npz") if k in run] + list(inputs["parities"].values())
        # The source's manifest says its dtypes, which pick the tolerances (select_tolerances).
        return sorted(found + list(inputs["serves"].values())) + [paths.source_manifest_path(wildcards.model)]

    def inference_gate_params(self, wildcards):
        return {
            **self.inference_input_map(wildcards.model, wildcards.variant, wildcards.tier),
            "source_manifest": paths.source_manifest_path(wildcards.model),
        }

    def inference_tolerances(self, wildcards):
        """The variant's tolerances and its per-source-dtype refinements (`native@bf16`, ...);
        convqa.gates.inference.select_tolerances picks with the source manifest."""
        return {
            key: value
            for key, value in self.inference["tolerances"].items()
            if key == wildcards.variant or key.startswith(wildcards.variant + "@")
        }

    def reference_tolerances(self, wildcards):
        return self.inference["reference_tolerances"].get(wildcards.variant, {})

    def backend_tolerances(self, wildcards=None):
        """engine -> tolerance of F-BACKEND-001 (config inference.backend_tolerances)."""
        return self.inference.get("backend_tolerances") or {}

    def encoded_artifact(self, wildcards):
        """The source, and the first-hop artifact whose encodings the reference reproduces."""
        return {
            "source": paths.source_dir(wildcards.model),
            "encoded": self.artifact(wildcards.model, wildcards.variant, wildcards.hop),
        }

    def inferred_artifact(self, wildcards):
        chain = getattr(wildcards, "chain", SOURCE_CHAIN)
        return {
            "artifact": self.artifact(wildcards.model, getattr(wildcards, "variant", ""), chain),
            "source": paths.source_dir(wildcards.model),
        }

    def inference_report_params(self, wildcards):
        variants = self.model_variants(wildcards.model)
        return {
            "gate_tsvs": [paths.inference_gates_path(wildcards.model, v, wildcards.tier) for v in variants],
            "extras": [paths.inference_extra_path(wildcards.model, v, wildcards.tier) for v in variants],
        }

    def inference_report_inputs(self, wildcards):
        params = self.inference_report_params(wildcards)
        return [p for pair in zip(params["gate_tsvs"], params["extras"]) for p in pair]

    # ------------------------------------------------------------ detection

    def detection_reports(self, wildcards=None):
        """qualification.json of every detection model, by model."""
        if not self.detection:
            raise WorkflowError(
                "the detection target needs a `detection:` section: run it with "
                "--configfile config/detection.yaml --replace-workflow-config (or `make detection`)"
            )
        return {
            m: paths.report_path(m, tier, "qualification.json")
            for m, tier in detection.model_tiers(self.detection).items()
        }

    def detection_logits(self, wildcards=None):
        """By mutant: [its artifact's logits, the correct converter's on the same chain and
        variant] (transformers on cpu), for mutants whose chain runs inference at their tier."""
        pairs = {}
        engine = INFERENCE_ENGINE_FILE["transformers"]
        for entry in self.detection_entries:
            if entry.check != detection.WORKFLOW:
                continue
            if entry.chain not in self.inference["chains"].get(entry.tier, []):
                continue
            correct = detection.correct_model(entry.preset)
            pairs[entry.mutant] = [
                paths.inference_run_path(entry.model, self.owner(entry.model, entry.variant, entry.chain),
                                         entry.chain, engine, "cpu", "npz"),
                paths.inference_run_path(correct, self.owner(correct, entry.variant, entry.chain),
                                         entry.chain, engine, "cpu", "npz"),
            ]
        return pairs

    def detection_output_paths(self):
        return {m: paths.detection_output_path_path(m) for m in self.output_path_entries}

    def detection_matrix_inputs(self, wildcards):
        logits = [path for pair in self.detection_logits().values() for path in pair]
        return (
            sorted(self.detection_reports().values())
            + list(self.detection_output_paths().values())
            + sorted(set(logits))
        )

    def output_path_input(self, wildcards):
        """The correct conversion of the edge's input (the source, or the correct parent artifact)."""
        entry = self.output_path_entries[wildcards.mutant]
        model = detection.correct_model(entry.preset)
        return self.artifact(model, entry.variant, plan.parent(entry.chain))

    def output_path_quant(self, wildcards):
        entry = self.output_path_entries[wildcards.mutant]
        return plan.edge_quant(entry.variant, entry.chain)
