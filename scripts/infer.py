"""Rule infer: the prompt set through one engine on one backend; JSON record + .npz of logits."""

import traceback

from convqa.inference_run import run_prompts, write_run
from convqa.prompts import DEFAULT_PROMPTS

with open(snakemake.log[0], "w") as log:
    try:
        record, logits = run_prompts(
            snakemake.input.artifact,
            snakemake.input.source,
            snakemake.params.engine,
            snakemake.wildcards.backend,
            list(DEFAULT_PROMPTS),
            snakemake.params.max_new_tokens,
            snakemake.threads,
        )
        write_run(record, logits, snakemake.output.json, snakemake.output.npz)
        state = record["skipped"] and f"skipped: {record['skipped']}" or record["error"] or "ran"
        print(f"{snakemake.params.engine} {snakemake.wildcards.backend} {snakemake.input.artifact}: {state}", file=log)
        for prompt in record["prompts"]:
            print(f"  {prompt['prompt_id']}: {prompt.get('error') or prompt.get('generated_ids')}", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
