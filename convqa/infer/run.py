"""Run the prompt set through one engine (or one engine's HTTP server) and record what came out.

`run_prompts` writes, per (artifact, engine, backend), a JSON record (per prompt: modality, ids,
generated ids, decoded text, timings) and an .npz of teacher-forced logits keyed by prompt id.
Under transformers the .npz also holds, for one prompt (the first `run` prompt), the hidden state
after every layer and sub-layer (keys `hidden.<order>.<module>`, listed in the record's
`hidden_states`), so a failing gate can name the first layer that departs from its baseline
(convqa.compare.divergence).
`run_reference` does the same for the reference-quantized model of a lossy first hop
(convqa.infer.reference_model), which exists only in memory. `serve_prompts` starts the engine's
OpenAI-compatible server under `ServerProcess` (which kills it with the job), sends the same
prompts and records the answers. The gates compare these files
(convqa.gates.inference); nothing here decides pass or fail.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from convqa.formats import no_artifact
from convqa.files import atomic_file, write_json
from convqa.infer.weights_dtype import weights_dtype_for
from convqa.infer.engines import capability, engine_for
from convqa.infer.server.supervisor import ServerError, ServerProcess
from convqa.errors import ConversionError, FormatError
from convqa.formats import detect_format, open_model
from convqa.infer.prompts import CHAT, RUN, Prompt, prompt_ids
from convqa.infer.reference_model import reference_quantized

# Greedy and nothing else: llama.cpp's server applies a repeat penalty of 1.1 unless told not to.
LLAMACPP_GREEDY = {"temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0}
# What a run's numbers were computed in, for the record (`compute`; transformers' also name the
# dtype its weights were held in, `weights_dtype`).
LLAMACPP_COMPUTE = "ggml: weights in their stored encodings, F32 activations and KV cache"
TRANSFORMERS_COMPUTE = "float32 (convqa.infer.float32_compute over the weights as held)"
# .npz keys of the hidden-state capture; a prompt id never starts with it (load_run splits on it).
HIDDEN_PREFIX = "hidden."



def ground_truth_tokenizer(source_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(source_dir))


def stop_ids_of(tokenizer) -> set[int]:
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


def artifact_tokenizer(artifact_path: str | os.PathLike):
    with open_model(artifact_path) as artifact:
        return artifact.tokenizer


def _content(generated: list[int], stop_ids: set[int]) -> list[int]:
    return generated[:-1] if generated and generated[-1] in stop_ids else generated


def _new_record(artifact: str, engine_name: str, backend: str, max_new_tokens: int) -> dict:
    """A run record before anything ran: what was asked of which engine."""
    return {"artifact": artifact, "engine": engine_name, "backend": backend, "max_new_tokens": max_new_tokens,
            "skipped": None, "error": None, "prompts": []}


def run_prompts(
    artifact_path: str | os.PathLike,
    source_dir: str | os.PathLike,
    engine_name: str,
    backend: str,
    prompts: list[Prompt],
    max_new_tokens: int,
    threads: int,
) -> tuple[dict, dict[str, np.ndarray]]:
    """(record, arrays) of every prompt through one engine on one backend: the logits by prompt
    id and, under transformers, the hidden-state capture under HIDDEN_PREFIX keys (write_run
    stores both in one .npz, load_run splits them into `logits` and `hidden`).

    An absent capability (no CUDA device) gives `skipped` with the reason and loads nothing; so
    does a gpu whose free memory is short of what the artifact needs (convqa.infer.device), with
    the numbers in the reason and in `device_memory`. A prompt that cannot be rendered for this artifact (chat without a template) carries `error`.
    """
    record = _new_record(os.fspath(artifact_path), engine_name, backend, max_new_tokens)
    available, reason = capability(engine_name, backend)
    if not available:
        record["skipped"] = reason
        return record, {}
    tokenizer = ground_truth_tokenizer(source_dir)
    try:
        spec = artifact_tokenizer(artifact_path)
        record["format"] = detect_format(artifact_path)
    except FormatError as exc:  # the strict reader refuses the file: no engine is asked to load it
        record["error"] = f"artifact unreadable: {exc}"[:2000]
        record["no_artifact"] = getattr(exc, "failure", None)  # a failed conversion's placeholder
        return record, {}
    if _short_of_device_memory(record, artifact_path, engine_name, backend, source_dir):
        return record, {}
    options = {}
    if engine_name == "transformers":  # every artifact of a model is held like its ground truth
        options["weights_dtype"] = record["weights_dtype"] = weights_dtype_for(source_dir)
        record["compute"] = TRANSFORMERS_COMPUTE
    else:
        record["compute"] = LLAMACPP_COMPUTE
    with engine_for(engine_name, backend, threads=threads, **options) as engine:
        try:
            engine.load(artifact_path)
        except Exception as exc:  # a broken artifact is a finding for the gates, not a crash
            record["error"] = f"{engine_name} could not load the artifact: {type(exc).__name__}: {exc}"[:2000]
            return record, {}
        return record, _run_loaded(engine, tokenizer, spec, prompts, max_new_tokens, record)


def _short_of_device_memory(record: dict, artifact_path, engine_name: str, backend: str, source_dir) -> bool:
    """On gpu: record the device's free memory against the run's estimate (in the source's weights
    dtype), and mark the run skipped (True) when it would not fit, instead of a CUDA OOM."""
    if backend != "gpu":
        return False
    from convqa.infer.device import check_artifact

    reason, record["device_memory"] = check_artifact(artifact_path, engine_name,
                                                     weights_dtype=weights_dtype_for(source_dir))
    if reason:
        record["skipped"] = reason
    return bool(reason)


def _run_loaded(engine, tokenizer, spec, prompts: list[Prompt], max_new_tokens: int, record: dict) -> dict[str, np.ndarray]:
    """Every prompt through a loaded engine; appends the entries to `record`, returns the logits."""
    stop_ids = stop_ids_of(tokenizer)
    logits: dict[str, np.ndarray] = {}
    record["load_s"] = engine.timings.load_s
    for prompt in prompts:
        ids, error = prompt_ids(tokenizer, spec, prompt)
        entry = {"prompt_id": prompt.id, "modality": prompt.modality, "ids": ids, "error": error or None}
        if ids is not None:
            result = engine.run(prompt.id, ids, max_new_tokens, stop_ids)
            content = _content(result.generated_ids, stop_ids)
            text = engine.detokenize(content) if engine.name == "llama.cpp" else tokenizer.decode(
                content, skip_special_tokens=True
            )
            entry.update(result.as_row(), text=text)
            entry.pop("engine"), entry.pop("backend")
            logits[prompt.id] = result.logits
        record["prompts"].append(entry)
    logits.update(_capture_hidden(engine, record))
    return logits


def _capture_hidden(engine, record: dict) -> dict[str, np.ndarray]:
    """The hidden-state capture of the first `run` prompt, for engines that can hook their layers
    (transformers); its points go into record["hidden_states"], the arrays come back prefixed.
    One prompt keeps it small (SmolLM2-135M: 152 points x 7 positions x 576 floats, 2.5 MB); a capture
    that fails is recorded, never raised: the logits are still the run's result."""
    capture = getattr(engine, "capture_hidden_states", None)
    entry = next((p for p in record["prompts"] if p["modality"] == RUN and p.get("ids")), None)
    if capture is None or entry is None:
        return {}
    try:
        points, arrays = capture(entry["ids"])
    except Exception as exc:  # a model the hooks cannot follow still has its logits compared
        record["hidden_states"] = {"prompt_id": entry["prompt_id"], "error": f"{type(exc).__name__}: {exc}"[:500]}
        return {}
    record["hidden_states"] = {"prompt_id": entry["prompt_id"], "points": points}
    return {HIDDEN_PREFIX + key: values for key, values in arrays.items()}


def run_reference(
    source_dir: str | os.PathLike,
    encoded_path: str | os.PathLike,
    prompts: list[Prompt],
    max_new_tokens: int,
    threads: int,
    backend: str = "cpu",
) -> tuple[dict, dict[str, np.ndarray]]:
    """(record, logits) of the reference-quantized model (convqa.infer.reference_model) under
    transformers on `backend`: the source's tensors in the encodings `encoded_path` stores them in.
    On gpu it is skipped like any run when there is no device or too little free memory. It holds
    its weights in the source's weights dtype (convqa.infer.weights_dtype) and computes in float32,
    as the artifact's run does.

    When the reference cannot be built (the artifact is unreadable, or holds an encoding with no
    reference encoder), the record carries `error` and no logits: the gates fail on it.
    """
    record = _new_record(f"reference: {os.fspath(source_dir)} in the encodings of {os.fspath(encoded_path)}",
                         "transformers", backend, max_new_tokens)
    record["reference"] = {"source": os.fspath(source_dir), "encodings_from": os.fspath(encoded_path)}
    available, reason = capability("transformers", backend)
    if not available:
        record["skipped"] = reason
        return record, {}
    if _short_of_device_memory(record, source_dir, "transformers", backend, source_dir):
        return record, {}
    tokenizer = ground_truth_tokenizer(source_dir)
    record["weights_dtype"] = weights_dtype_for(source_dir)  # the ground truth's, as the artifact's run
    record["compute"] = TRANSFORMERS_COMPUTE
    with engine_for("transformers", backend, threads=threads, weights_dtype=record["weights_dtype"]) as engine:
        try:
            with open_model(source_dir) as source, open_model(encoded_path) as encoded:
                reference = reference_quantized(source, encoded)
                engine.load_artifact(reference)  # copies every tensor: the files can close
        except (FormatError, ConversionError) as exc:
            record["error"] = f"no reference model: {exc}"[:2000]
            return record, {}
        record["reference"]["encodings"] = reference.metadata["reference_encodings"]
        return record, _run_loaded(engine, tokenizer, reference.tokenizer, prompts, max_new_tokens, record)


# ---------------------------------------------------------------- isolated runs (what the workflow calls)


def run_prompts_job(artifact: str, source: str, engine: str, backend: str, max_new_tokens: int, threads: int,
                    json_path: str, npz_path: str) -> None:
    """run_prompts over the default prompt set, written to json_path/npz_path (the child's side)."""
    from convqa.infer.prompts import DEFAULT_PROMPTS

    record, logits = run_prompts(artifact, source, engine, backend, list(DEFAULT_PROMPTS), max_new_tokens, threads)
    write_run(record, logits, json_path, npz_path)


def run_reference_job(source: str, encoded: str, max_new_tokens: int, threads: int, json_path: str, npz_path: str,
                      backend: str = "cpu") -> None:
    """run_reference over the default prompt set, written to json_path/npz_path (the child's side)."""
    from convqa.infer.prompts import DEFAULT_PROMPTS

    record, logits = run_reference(source, encoded, list(DEFAULT_PROMPTS), max_new_tokens, threads, backend)
    write_run(record, logits, json_path, npz_path)


def run_prompts_isolated(artifact: str, source: str, engine: str, backend: str, max_new_tokens: int, threads: int,
                         json_path: str, npz_path: str, *, timeout_s: float, engine_log: str,
                         mem_mb: float | None = None) -> dict:
    """run_prompts_job in a child process (convqa.infer.isolated): an engine that aborts, segfaults, is
    killed for memory or hangs gives a record with `error` (how it ended and its stderr tail) and
    no logits, never a failed job. An artifact too big for the machine (or `mem_mb`) is `skipped`
    before anything loads (convqa.infer.memory). Returns the record that was written."""
    # The capability check (no CUDA device: skipped) happens in the child: asking torch here would
    # import it twice per job.
    record = _new_record(os.fspath(artifact), engine, backend, max_new_tokens)
    if _skipped_too_big(record, artifact, engine, mem_mb, json_path, npz_path, source=source):
        return record
    kwargs = dict(artifact=os.fspath(artifact), source=os.fspath(source), engine=engine, backend=backend,
                  max_new_tokens=max_new_tokens, threads=threads, json_path=os.fspath(json_path), npz_path=os.fspath(npz_path))
    return _finish_isolated("convqa.infer.run:run_prompts_job", kwargs, record, engine, timeout_s, engine_log)


def run_reference_isolated(source: str, encoded: str, max_new_tokens: int, threads: int, json_path: str, npz_path: str,
                           *, timeout_s: float, engine_log: str, backend: str = "cpu",
                           mem_mb: float | None = None) -> dict:
    """run_reference_job in a child process, with the same guarantees as run_prompts_isolated."""
    record = _new_record(f"reference: {os.fspath(source)} in the encodings of {os.fspath(encoded)}",
                         "transformers", backend, max_new_tokens)
    # The reference model is the source's tensors in its weights dtype, as the ground truth run holds them.
    if _skipped_too_big(record, source, "transformers", mem_mb, json_path, npz_path, reference=True):
        return record
    kwargs = dict(source=os.fspath(source), encoded=os.fspath(encoded), max_new_tokens=max_new_tokens, threads=threads,
                  json_path=os.fspath(json_path), npz_path=os.fspath(npz_path), backend=backend)
    return _finish_isolated("convqa.infer.run:run_reference_job", kwargs, record, "transformers", timeout_s, engine_log)


def reproducible(record: dict) -> bool:
    """A run record whose content follows from its inputs alone: not skipped (the machine's or
    the job's memory), no error (a timeout, a kill, an abort) in the run or in any prompt. Only
    such a record is stored for replay (convqa.workflow.replay)."""
    return (not record.get("skipped") and not record.get("error")
            and not any(p.get("error") for p in record.get("prompts", [])))


def _skipped_too_big(record: dict, artifact: str, engine: str, mem_mb, json_path: str, npz_path: str,
                     source: str | None = None, reference: bool = False) -> bool:
    """Write a `skipped` record (what the run needs, what there is) when the artifact cannot fit
    (computed in `source`'s dtype, as the run will be)."""
    from convqa.infer.memory import too_big

    reason = too_big(artifact, engine, mem_mb, source=source, reference=reference)
    if reason is None:
        return False
    record["skipped"] = reason
    write_run(record, {}, json_path, npz_path)
    return True


def _finish_isolated(function: str, kwargs: dict, record: dict, engine: str, timeout_s: float, engine_log: str) -> dict:
    from convqa.infer.isolated import run_isolated

    for stale in (kwargs["json_path"], kwargs["npz_path"]):  # a previous attempt's output is not this run's
        Path(stale).unlink(missing_ok=True)
    outcome = run_isolated(function, kwargs, timeout_s=timeout_s, stderr_path=engine_log)
    if outcome.ok and Path(kwargs["json_path"]).is_file() and Path(kwargs["npz_path"]).is_file():
        return load_run(kwargs["json_path"])
    how = outcome.describe() or "exited 0 without writing its record"
    # The last line says what broke (ggml's assertion, a Python exception), so it comes first; the
    # lines before it follow, and the record's `exit` keeps the whole tail.
    last = outcome.last_words()
    record["error"] = f"{engine} process {how}"
    if last:
        record["error"] += f"; last stderr line: {last[-1][-400:]}"
        if len(last) > 1:
            record["error"] += f" (before it: {' | '.join(last[:-1])[-300:]})"
    record["exit"] = outcome.as_dict()
    write_run(record, {}, kwargs["json_path"], kwargs["npz_path"])
    return record


def write_run(record: dict, logits: dict[str, np.ndarray], json_path, npz_path) -> None:
    """The record as JSON and the logits as .npz (empty when skipped), each written atomically."""
    with atomic_file(npz_path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **logits)
    write_json(json_path, record)


def load_run(json_path, npz_path=None) -> dict:
    """A run record with `logits` (prompt id -> array) and `hidden` (capture key -> array, under
    transformers) attached when the .npz is given."""
    import json

    try:
        with open(json_path) as fh:
            record = json.load(fh)
        if not isinstance(record, dict):
            raise ValueError(f"a run record is a JSON object, not {type(record).__name__}")
    except (OSError, ValueError) as exc:  # a damaged record is the run's failure, not the gate job's
        return {"skipped": None, "prompts": [], "logits": {},
                "error": f"run record {json_path} unreadable: {type(exc).__name__}: {exc}"}
    record["logits"], record["hidden"] = {}, {}
    if npz_path is not None and Path(npz_path).exists():
        try:
            with np.load(npz_path, allow_pickle=False) as data:
                for key in data.files:
                    if key.startswith(HIDDEN_PREFIX):
                        record["hidden"][key[len(HIDDEN_PREFIX):]] = data[key]
                    else:
                        record["logits"][key] = data[key]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:  # a damaged .npz is the run's failure, not the gate job's
            record["error"] = record.get("error") or f"logits file {npz_path} unreadable: {type(exc).__name__}: {exc}"
    return record


# ---------------------------------------------------------------- serve


def serve_prompts(
    artifact_path: str | os.PathLike,
    source_dir: str | os.PathLike,
    engine_name: str,
    prompts: list[Prompt],
    max_new_tokens: int,
    threads: int,
    log_path: str | os.PathLike | None = None,
    mem_mb: float | None = None,
) -> dict:
    """Answers of the engine's HTTP server (cpu) to the prompts (`skipped` when the artifact is too
    big for the machine or `mem_mb`, convqa.infer.memory).

    transformers: completions by the ground-truth ids (answer ids compared exactly) and chat
    messages rendered server-side with the artifact's own template. llama.cpp: completions by text
    (its server tokenizes itself), compared by text; chat prompts are not sent.
    """
    record = {"artifact": os.fspath(artifact_path), "engine": engine_name, "backend": "cpu", "skipped": None,
              "error": None, "answers": []}
    available, reason = capability(engine_name, "cpu")
    if not available:
        record["skipped"] = reason
        return record
    from convqa.infer.memory import too_big

    if reason := too_big(artifact_path, engine_name, mem_mb, source=source_dir):  # the server loads the whole model
        record["skipped"] = reason
        return record
    if failure := no_artifact.read(artifact_path):  # a failed conversion: nothing to serve
        record["error"], record["no_artifact"] = no_artifact.describe(failure), failure
        return record
    tokenizer = ground_truth_tokenizer(source_dir)
    stop_ids = stop_ids_of(tokenizer)
    if engine_name == "transformers":
        record["weights_dtype"] = weights_dtype_for(source_dir)  # answers compared with the run's, same dtype
        record["compute"] = TRANSFORMERS_COMPUTE
        server = ServerProcess.transformers(artifact_path, source_dir, threads=threads, stop_ids=stop_ids,
                                            log_path=log_path, weights_dtype=record["weights_dtype"])
    else:
        record["compute"] = LLAMACPP_COMPUTE
        server = ServerProcess.llama_cpp(artifact_path, threads=threads, log_path=log_path)
    try:
        with server:
            record["server_pid"] = server.pid
            for prompt in prompts:
                answer = {"prompt_id": prompt.id, "modality": prompt.modality, "error": None}
                try:
                    answer.update(_ask(server, engine_name, tokenizer, prompt, max_new_tokens))
                except ServerError as exc:
                    answer["error"] = str(exc)
                    answer["server_died"] = server.exit_state() != "server still running"
                record["answers"].append(answer)
    except ServerError as exc:  # did not start: a finding for F-SERVE-001
        record["error"] = str(exc)[-2000:]
    return record


def _ask(server: ServerProcess, engine_name: str, tokenizer, prompt: Prompt, max_new_tokens: int) -> dict:
    if engine_name == "transformers":
        if prompt.modality == RUN:
            body = {"prompt": list(tokenizer.encode(prompt.text, add_special_tokens=True)),
                    "max_tokens": max_new_tokens, "temperature": 0.0}
            choice = server.post("/v1/completions", body)["choices"][0]
            return {"token_ids": choice["token_ids"], "text": choice["text"]}
        body = {"messages": prompt.messages, "max_tokens": max_new_tokens, "temperature": 0.0}
        choice = server.post("/v1/chat/completions", body)["choices"][0]
        return {"token_ids": choice["token_ids"], "text": choice["message"]["content"]}
    if prompt.modality == CHAT:
        return {"not_sent": "llama.cpp serve is compared on completions only"}
    body = {"prompt": prompt.text, "max_tokens": max_new_tokens, **LLAMACPP_GREEDY}
    choice = server.post("/v1/completions", body)["choices"][0]
    return {"text": choice["text"]}
