"""Rule infer_reference: the prompt set through the reference-quantized model (the source in the
encodings of the first-hop artifact) under transformers on cpu; JSON record + .npz of logits."""

import traceback

from convqa.inference_run import run_reference, write_run
from convqa.prompts import DEFAULT_PROMPTS

with open(snakemake.log[0], "w") as log:
    try:
        record, logits = run_reference(
            snakemake.input.source,
            snakemake.input.encoded,
            list(DEFAULT_PROMPTS),
            snakemake.params.max_new_tokens,
            snakemake.threads,
        )
        write_run(record, logits, snakemake.output.json, snakemake.output.npz)
        print(f"{record['artifact']}: {record['error'] or record['reference'].get('encodings')}", file=log)
    except Exception:
        traceback.print_exc(file=log)
        raise
