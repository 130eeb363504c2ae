# Paths, the detection entries and input functions of rules/detection.smk (helpers only, like common.smk).

DETECTION = config.get("detection") or {}
DETECTION_ENTRIES = convqa_detection.entries(DETECTION) if DETECTION else []
OUTPUT_PATH_ENTRIES = {
    e.mutant: e for e in DETECTION_ENTRIES if e.check == convqa_detection.OUTPUT_PATH
}
DETECTION_FINGERPRINT = fingerprint(
    ("convqa.detection.matrix", "convqa.convert.mutants"), ()
)


def detection_path(name):
    return f"results/detection/{name}"


def detection_output_path_path(mutant):
    return detection_path(f"output-path/{mutant}.json")


def detection_reports():
    """qualification.json of every detection model, by model."""
    if not DETECTION:
        raise WorkflowError(
            "the detection target needs a `detection:` section: run it with "
            "--configfile config/detection.yaml --replace-workflow-config (or `make detection`)"
        )
    return {
        m: report_path(m, tier, "qualification.json")
        for m, tier in convqa_detection.model_tiers(DETECTION).items()
    }


def detection_logits():
    """By mutant: [its artifact's logits, the correct converter's on the same chain and variant]
    (transformers on cpu), for mutants whose chain runs inference at their tier."""
    pairs = {}
    for entry in DETECTION_ENTRIES:
        if entry.check != convqa_detection.WORKFLOW:
            continue
        if entry.chain not in INFERENCE["chains"].get(entry.tier, []):
            continue
        engine = INFERENCE_ENGINE_FILE["transformers"]
        pairs[entry.mutant] = [
            inference_run_path(
                entry.model, entry.variant, entry.chain, engine, "cpu", "npz"
            ),
            inference_run_path(
                convqa_detection.correct_model(entry.preset),
                entry.variant,
                entry.chain,
                engine,
                "cpu",
                "npz",
            ),
        ]
    return pairs


def detection_matrix_inputs(wildcards):
    logits = [path for pair in detection_logits().values() for path in pair]
    return (
        sorted(detection_reports().values())
        + [detection_output_path_path(m) for m in OUTPUT_PATH_ENTRIES]
        + sorted(set(logits))
    )


def output_path_input(wildcards):
    """The correct conversion of the edge's input (the source, or the correct parent artifact)."""
    entry = OUTPUT_PATH_ENTRIES[wildcards.mutant]
    model = convqa_detection.correct_model(entry.preset)
    return artifact_path(model, entry.variant, plan.parent(entry.chain))


def output_path_quant(wildcards):
    entry = OUTPUT_PATH_ENTRIES[wildcards.mutant]
    if plan.is_first_hop(entry.chain):
        return variant_quant(entry.variant, plan.target_format(entry.chain))
    return None


wildcard_constraints:
    mutant="|".join(re.escape(m) for m in OUTPUT_PATH_ENTRIES) or "(?!)",
