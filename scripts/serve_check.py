"""Rule serve_check: serve one artifact over HTTP (cpu), send the prompt set, record the answers.

ServerProcess runs the server in its own process group and kills the group when this script
ends, fails or is terminated by Snakemake, so no server outlives the job. Replayed when the
artifact is the bytes an earlier run served (convqa.workflow.replay); a failed or skipped check
is not stored for that.
"""

from convqa.files import write_json
from convqa.workflow.joblog import job_log
from convqa.workflow.intermediates import restored
from convqa.workflow.replay import run_or_replay


def serve_check() -> bool:
    from convqa.infer.prompts import DEFAULT_PROMPTS
    from convqa.infer.run import reproducible, serve_prompts

    with job_log(snakemake.log.serve) as log, restored(snakemake.params.artifacts, log) as artifacts:
        record = serve_prompts(
            artifacts["artifact"],
            artifacts["source"],
            snakemake.params.engine,
            list(DEFAULT_PROMPTS),
            snakemake.params.max_new_tokens,
            snakemake.threads,
            log_path=snakemake.log.server,
            mem_mb=snakemake.resources.get("mem_mb"),
        )
        write_json(snakemake.output.json, record)
        state = record["skipped"] or record["error"] or f"{len(record['answers'])} answers"
        print(f"{snakemake.params.engine} serve {artifacts['artifact']}: {state}", file=log)
    return reproducible(record)


run_or_replay(snakemake, serve_check)
