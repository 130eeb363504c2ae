"""Rule infer: the prompt set through one engine on one backend, in a child process (an engine
that aborts or is killed becomes a failed record, not a failed job); JSON record + .npz of logits.
Replayed when the artifact is the bytes an earlier run read (convqa.workflow.replay); a run that
failed or was skipped is not stored for that (a timeout or a memory limit is not in the key)."""

from convqa.workflow.joblog import job_log
from convqa.workflow.intermediates import restored
from convqa.workflow.replay import run_or_replay


def infer() -> bool:
    from convqa.infer.run import reproducible, run_prompts_isolated

    with job_log(snakemake.log.run) as log, restored(snakemake.params.artifacts, log) as artifacts:
        record = run_prompts_isolated(
            artifacts["artifact"],
            artifacts["source"],
            snakemake.params.engine,
            snakemake.wildcards.backend,
            snakemake.params.max_new_tokens,
            snakemake.threads,
            snakemake.output.json,
            snakemake.output.npz,
            timeout_s=snakemake.params.timeout_s,
            engine_log=snakemake.log.engine,
            mem_mb=snakemake.resources.get("mem_mb"),
        )
        state = record["skipped"] and f"skipped: {record['skipped']}" or record["error"] or "ran"
        print(f"{snakemake.params.engine} {snakemake.wildcards.backend} {artifacts['artifact']}: {state}", file=log)
        for prompt in record["prompts"]:
            print(f"  {prompt['prompt_id']}: {prompt.get('error') or prompt.get('generated_ids')}", file=log)
    return reproducible(record)


run_or_replay(snakemake, infer)
