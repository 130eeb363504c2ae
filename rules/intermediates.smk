# Converted artifacts are intermediates (config `temp_intermediates`, on by default): each is
# deleted by its release job once every job of the tier that reads it is done, and brought back
# from its sidecar by a later job that needs it (convqa.workflow.intermediates says why this is
# not Snakemake's temp()). Sidecars, manifests, comparisons and inference records stay.
#
# results/{model}/{variant}/{chain}/released-{tier}.json   what was deleted, and how many bytes


rule release_artifact:
    input:
        J.release_inputs,
    output:
        record=paths.release_path("{model}", "{variant}", "{chain}", "{tier}"),
    log:
        paths.release_log_path("{model}", "{variant}", "{chain}", "{tier}"),
    wildcard_constraints:
        chain=plan.CONVERTED_CHAIN_PATTERN,
    # Before anything else that is ready: the bytes go as soon as the last reader is done.
    priority: jobs.RELEASE_PRIORITY
    localrule: True
    conda:
        "../envs/convert.yaml"
    params:
        python=sys.executable,
        artifact=lambda wildcards: paths.artifact_path(
            wildcards.model, wildcards.variant, wildcards.chain
        ),
        fingerprint=fingerprints.fingerprint(("convqa.workflow.intermediates",), ()),
    shell:
        "{params.python:q} -m convqa.workflow.intermediates release {params.artifact:q} {output.record:q} > {log:q} 2>&1"
