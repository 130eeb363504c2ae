"""Rule infer: the prompt set through one engine on one backend, in a child process (an engine
that aborts or is killed becomes a failed record, not a failed job); JSON record + .npz of logits."""

import traceback

from convqa.infer.run import run_prompts_isolated

with open(snakemake.log.run, "w") as log:
    try:
        record = run_prompts_isolated(
            snakemake.input.artifact,
            snakemake.input.source,
            snakemake.params.engine,
            snakemake.wildcards.backend,
            snakemake.params.max_new_tokens,
            snakemake.threads,
            snakemake.output.json,
            snakemake.output.npz,
            timeout_s=snakemake.params.timeout_s,
            engine_log=snakemake.log.engine,
        )
        state = record["skipped"] and f"skipped: {record['skipped']}" or record["error"] or "ran"
        print(f"{snakemake.params.engine} {snakemake.wildcards.backend} {snakemake.input.artifact}: {state}", file=log)
        for prompt in record["prompts"]:
            print(f"  {prompt['prompt_id']}: {prompt.get('error') or prompt.get('generated_ids')}", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
