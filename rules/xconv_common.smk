# Paths, plan and input functions of the side-by-side converter rules (rules/xconv.smk).


wildcard_constraints:
    converter="|".join(re.escape(name) for name in config["converters"]),
    against="primary|parent",


# ---------------------------------------------------------------- paths


def side_dir(model, variant, converter, chain):
    return f"results/{model}/{variant}/xconv/{converter}/{chain}"


def side_artifact_dir(model, variant, converter, chain):
    return f"{side_dir(model, variant, converter, chain)}/artifact"


def side_sidecar_path(model, variant, converter, chain):
    return f"{side_dir(model, variant, converter, chain)}/sidecar.json"


def side_manifest_path(model, variant, converter, chain):
    return f"{side_dir(model, variant, converter, chain)}/manifest.json"


def side_comparison_path(model, variant, converter, chain, against):
    return f"{side_dir(model, variant, converter, chain)}/compare/{against}.json"


def xconv_gates_path(model, variant, tier):
    return f"results/{model}/{variant}/gates/{tier}/xconv.tsv"


# ---------------------------------------------------------------- the plan


def side_slots(model, variant, tier):
    """(chain, converter) of every side-by-side conversion a tier runs."""
    return [
        (chain, name)
        for chain in plan.artifact_chains(tier, variant)
        for name in converters.side_converters(config, model, chain)
    ]


def xconv_gate_input_map(model, variant, tier):
    """Per slot, the paths the xconv gates read (the rule's inputs are exactly these)."""
    slots = []
    for chain, name in side_slots(model, variant, tier):
        parent = plan.parent(chain)
        slots.append(
            {
                "chain": chain,
                "converter": name,
                "primary_converter": converters.primary_converter(config, model, chain),
                "parent": parent,
                "sidecar": side_sidecar_path(model, variant, name, chain),
                "manifest": side_manifest_path(model, variant, name, chain),
                "vs_primary": side_comparison_path(
                    model, variant, name, chain, "primary"
                ),
                "vs_parent": side_comparison_path(
                    model, variant, name, chain, "parent"
                ),
                "primary_manifest": manifest_path(model, variant, chain),
                "parent_manifest": manifest_path(model, variant, parent),
            }
        )
    return slots


def add_side_by_side_report_inputs(maps, model, tier):
    """Add the side converters' gate tables, manifests and sidecars to a report's inputs,
    labelled `variant/chain@converter` next to the primary's `variant/chain`."""
    for variant in model_variants(model):
        slots = xconv_gate_input_map(model, variant, tier)
        if not slots:
            continue
        maps["gate_tsvs"].append(xconv_gates_path(model, variant, tier))
        for slot in slots:
            key = label(
                variant, converters.side_label(slot["chain"], slot["converter"])
            )
            maps["manifests"][key] = slot["manifest"]
            maps["sidecars"][key] = slot["sidecar"]


# ---------------------------------------------------------------- input functions and params


def side_conversion_input(wildcards):
    """The same input the primary converts: the parent chain's (primary) artifact."""
    return artifact_path(
        wildcards.model, wildcards.variant, plan.parent(wildcards.chain)
    )


def side_entry(wildcards):
    return config["converters"][wildcards.converter]


def side_command(wildcards):
    return side_entry(wildcards)["command"]


def side_json_record(wildcards):
    return side_entry(wildcards).get("json_record", False)


def side_env(wildcards):
    return dict(side_entry(wildcards).get("env") or {})


def side_fingerprint(wildcards):
    source_hop, target_hop = plan.edge(wildcards.chain)
    return converters.converter_fingerprint(
        wildcards.converter,
        side_entry(wildcards),
        plan.HOP_FORMAT[source_hop],
        plan.HOP_FORMAT[target_hop],
    )


def side_format(wildcards):
    return plan.target_format(wildcards.chain)


def side_compared(wildcards):
    other = (
        wildcards.chain
        if wildcards.against == "primary"
        else plan.parent(wildcards.chain)
    )
    return {
        "artifact": side_artifact_dir(
            wildcards.model, wildcards.variant, wildcards.converter, wildcards.chain
        ),
        "sidecar": side_sidecar_path(
            wildcards.model, wildcards.variant, wildcards.converter, wildcards.chain
        ),
        "reference": artifact_path(wildcards.model, wildcards.variant, other),
    }


def side_comparison_fingerprint(wildcards):
    other = (
        wildcards.chain
        if wildcards.against == "primary"
        else plan.parent(wildcards.chain)
    )
    return comparison_fingerprint(
        artifact_format(wildcards.chain), artifact_format(other)
    )


def xconv_gate_inputs(wildcards):
    slots = xconv_gate_input_map(wildcards.model, wildcards.variant, wildcards.tier)
    return sorted(
        {
            path
            for slot in slots
            for key, path in slot.items()
            if key.endswith(SLOT_PATH_KEYS)
        }
    )


def xconv_gate_params(wildcards):
    return xconv_gate_input_map(wildcards.model, wildcards.variant, wildcards.tier)


SLOT_PATH_KEYS = ("sidecar", "manifest", "vs_primary", "vs_parent")
XCONV_GATES_FINGERPRINT = fingerprint(("convqa.gates.cross_converter",), ())
