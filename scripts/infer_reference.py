"""Rule infer_reference: the prompt set through the reference-quantized model (the source in the
encodings of the first-hop artifact) under transformers on the job's backend, in a child process; JSON record
+ .npz of logits. Replayed when its inputs are the bytes an earlier run read (convqa.workflow.replay)."""

from convqa.workflow.joblog import job_log
from convqa.workflow.intermediates import restored
from convqa.workflow.replay import run_or_replay


def infer_reference() -> bool:
    from convqa.infer.run import reproducible, run_reference_isolated

    with job_log(snakemake.log.run) as log, restored(snakemake.params.artifacts, log) as artifacts:
        record = run_reference_isolated(
            artifacts["source"],
            artifacts["encoded"],
            snakemake.params.max_new_tokens,
            snakemake.threads,
            snakemake.output.json,
            snakemake.output.npz,
            timeout_s=snakemake.params.timeout_s,
            engine_log=snakemake.log.engine,
            backend=snakemake.wildcards.backend,
            mem_mb=snakemake.resources.get("mem_mb"),
        )
        state = record["skipped"] and f"skipped: {record['skipped']}" or record["error"]
        print(f"{record['artifact']} ({snakemake.wildcards.backend}): {state or record.get('reference', {}).get('encodings')}", file=log)
    return reproducible(record)


run_or_replay(snakemake, infer_reference)
