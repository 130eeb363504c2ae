"""Rule parity: the artifact's tokenizer (llama.cpp's, built from a GGUF, in a child process) and
chat template against the source's (convqa.infer.parity); one JSON record. Replayed when its
inputs are the bytes an earlier run read (convqa.workflow.replay); a record with an error is not
stored for that (a child that timed out)."""

from convqa.workflow.joblog import job_log
from convqa.workflow.intermediates import restored
from convqa.workflow.replay import run_or_replay


def parity() -> bool:
    from convqa.infer.parity import parity_job

    with job_log(snakemake.log.run) as log, restored(snakemake.params.artifacts, log) as artifacts:
        record = parity_job(
            artifacts["artifact"],
            artifacts["source"],
            snakemake.output.json,
            timeout_s=snakemake.params.timeout_s,
            engine_log=snakemake.log.engine,
        )
        tokenized = record.get("tokenizer") or []
        differing = sum(e["reference"] != e["candidate"] for e in tokenized)
        chat = record.get("chat") or {}
        llama_error = (record.get("llama_cpp") or {}).get("error")
        print(f"{artifacts['artifact']}: {record.get('error') or 'read'}; llama.cpp: "
              f"{llama_error or 'ran' if 'llama_cpp' in record else 'not asked'}; "
              f"{differing} of {len(tokenized)} encodings differ; {len(chat.get('conversations', []))} conversations",
              file=log)
    return not record.get("error") and not llama_error


run_or_replay(snakemake, parity)
