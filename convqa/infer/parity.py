"""Tokenizer and chat-template parity of one artifact against its source (rule parity).

Where the inference runs feed every engine the ground truth's ids, this asks the artifact's own
tokenizer and template, as the engines build them from the file, to reproduce the source's:

- tokenizer (GGUF only): llama.cpp's tokenizer built from the file (`Llama(vocab_only=True)`)
  encodes a fixed corpus (English, code, digits, whitespace runs, CJK, emoji, accents, every
  added token of the source, and text that only looks like one) to the ids the source's HF
  tokenizer gives: with specials parsed and no BOS (`special=True, add_bos=False` against
  `add_special_tokens=False`), and with the specials each side adds itself (`add_bos=True`
  against `add_special_tokens=True`).
- chat template (every artifact): the template the artifact carries renders a fixed set of
  conversations (system/user/assistant, multi-turn, with and without the generation prompt, a
  tool call where the source's template knows tools) to exactly the source's
  `apply_chat_template` text, with Jinja2 as transformers renders it
  (convqa.infer.chat_template) and, for GGUF, with llama-cpp-python's own formatter
  (`Jinja2ChatFormatter` over the file's `tokenizer.chat_template` and its bos/eos text).

llama.cpp aborts the process on some files, so its side runs in a child
(convqa.infer.isolated): an abort becomes the record's `llama_cpp.error`. The gates
(convqa.gates.parity) decide from the record written here; nothing here decides pass or fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from convqa.errors import FormatError
from convqa.files import write_json
from convqa.formats import detect_format, open_model
from convqa.infer.chat_template import render_chat, special_token_text

# (id, text): the fixed corpus; the source's added tokens are appended per model (corpus()).
TOKENIZER_CORPUS = (
    ("english", "The quick brown fox jumps over the lazy dog. It's done; we've checked, they'll see, you'd agree."),
    ("code", "def add(a, b):\n    return a + b\n\nfor i in range(10):\n\tprint(f\"{i:>3} {i ** 2}\")  # note\n"),
    ("code-braces", 'if (x != null && n > 0) { return x[n - 1]; } else { throw new Error("empty"); }'),
    ("digits", "0 1 22 333 4444 55555 1234567890 3.14159 -2.5e-3 2024-01-31 $19.99 100% 0x1F 007"),
    ("whitespace", "a  b   c    d\t\te\n\nf\n\n\ng \n \n h      \r\n end   "),
    ("only-spaces", "     "),
    ("only-newlines", "\n\n\n"),
    ("leading-space", " leading space and trailing "),
    ("accents", "Naïve café résumé: déjà vu, über, São Paulo, Zürich, Ångström, façade, coöperate"),
    ("scripts", "Ελληνικά русский עברית العربية हिन्दी ไทย"),
    ("cjk", "日本語のテキスト、中文文本。한국어 텍스트"),
    ("emoji", "emoji 😀 👍🏽 👨‍👩‍👧 🇫🇷 ✨🔥 and ❤️"),
    ("mixed-case", "HELLO hello Hello hElLo I'M DON'T WE'LL"),
    ("punctuation", "...!!! ??? --- ___ *** ''' \"\"\" ((( ))) [[[ ]]] {{{ }}} <<< >>> ||| \\\\"),
)
# Text that looks like a special token without being one: none of these may be parsed as one.
LOOKALIKE_SPELLINGS = (
    lambda t: t[:1] + " " + t[1:],  # a space after the opening character
    lambda t: t.upper() if t.upper() != t else t.lower(),
    lambda t: t[:-1],  # the closing character missing
    lambda t: t[1:],  # the opening character missing
)

# Conversations (id, messages, add_generation_prompt, needs_tools).
_SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                       "required": ["city"]},
    },
}]
CONVERSATIONS = (
    ("system-user", [_SYSTEM, {"role": "user", "content": "What is the capital of France?"}], True, False),
    ("system-user-no-prompt", [_SYSTEM, {"role": "user", "content": "What is the capital of France?"}], False, False),
    ("user-only", [{"role": "user", "content": "Hello!"}], True, False),
    ("multi-turn", [
        _SYSTEM,
        {"role": "user", "content": "Write a haiku about tensors."},
        {"role": "assistant", "content": "Rows of numbers flow,\nshapes fold into one another,\ngradients descend."},
        {"role": "user", "content": "Now one about café crème, 日本語 and 😀."},
    ], True, False),
    ("multi-turn-ends-with-assistant", [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  and 3+3?\n"},
        {"role": "assistant", "content": "6"},
    ], False, False),
    ("tool-call", [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "{\"temperature\": 21, \"sky\": \"clear\"}"},
    ], True, True),
)


def template_supports_tools(template: str | None) -> bool:
    """Whether a chat template reads `tools` (transformers' templates that know tools all do)."""
    return bool(template) and "tools" in template


def corpus(tokenizer) -> list[tuple[str, str]]:
    """The fixed corpus plus, for each added token of the source, a text holding it between words
    and one holding only lookalikes of it."""
    texts = list(TOKENIZER_CORPUS)
    added = sorted({t.content for t in tokenizer.added_tokens_decoder.values()})
    for token in added:
        texts.append((f"added:{token}", f"x{token}y {token}\n{token}{token} z"))
        lookalikes = [spell(token) for spell in LOOKALIKE_SPELLINGS]
        lookalikes = [s for s in dict.fromkeys(lookalikes) if s and s != token and s not in added]
        if lookalikes:
            texts.append((f"lookalike:{token}", " ".join(lookalikes)))
    return texts


# ---------------------------------------------------------------- the llama.cpp side (child process)


def llama_cpp_vocab_job(artifact: str, texts: list[str], json_path: str) -> None:
    """Tokenize `texts` with llama.cpp's tokenizer built from the GGUF (vocab only, no weights),
    both modes; record its chat template and bos/eos text as llama-cpp-python reads them."""
    from llama_cpp import Llama

    # verbose: llama.cpp's own account of a refused file ("error loading model: ...") goes to the log.
    llm = Llama(model_path=artifact, vocab_only=True, verbose=True)
    try:
        def text_of(token_id: int) -> str:
            return llm._model.token_get_text(token_id) if token_id >= 0 else ""

        record = {
            "pre": llm.metadata.get("tokenizer.ggml.pre"),
            "chat_template": llm.metadata.get("tokenizer.chat_template"),
            "bos_token": text_of(llm.token_bos()),
            "eos_token": text_of(llm.token_eos()),
            "plain": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts],
            "with_specials": [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in texts],
        }
    finally:
        llm.close()
    write_json(json_path, record)


def llama_cpp_vocab_isolated(artifact: str, texts: list[str], json_path: str, *, timeout_s: float,
                             engine_log: str) -> dict:
    """llama_cpp_vocab_job in a child: {the child's record} or {"error": how the child ended}."""
    from convqa.infer.isolated import run_isolated

    Path(json_path).unlink(missing_ok=True)
    outcome = run_isolated("convqa.infer.parity:llama_cpp_vocab_job",
                           {"artifact": artifact, "texts": texts, "json_path": json_path},
                           timeout_s=timeout_s, stderr_path=engine_log)
    try:
        if outcome.ok and Path(json_path).is_file():
            with open(json_path) as fh:
                return json.load(fh)
    finally:
        Path(json_path).unlink(missing_ok=True)
    how = outcome.describe() or "exited 0 without writing its record"
    last = outcome.last_words()
    said = [line.strip() for line in outcome.stderr_tail.splitlines() if "error loading model" in line]
    return {"error": f"llama.cpp process {how}" + (f"; last stderr line: {last[-1][-400:]}" if last else "")
            + (f"; llama.cpp: {said[0][-400:]}" if said else ""),
            "exit": outcome.as_dict()}


# ---------------------------------------------------------------- the record


def _render_source(tokenizer, messages, add_generation_prompt, tools):
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             tokenize=False), None
    except Exception as exc:  # a template that raises for this conversation
        return None, f"{type(exc).__name__}: {exc}"[:400]


def _render(render, *args):
    try:
        return render(*args), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"[:400]


def parity_record(artifact: str | os.PathLike, source: str | os.PathLike, *, timeout_s: float,
                  engine_log: str | os.PathLike, scratch: str | os.PathLike) -> dict:
    """What the parity gates read for one artifact (see the module docstring). `scratch` is a
    path the llama.cpp child may write its answer to (removed afterwards)."""
    from transformers import AutoTokenizer

    artifact, source = os.fspath(artifact), os.fspath(source)
    record = {"artifact": artifact, "source": source, "format": None, "error": None}
    try:
        record["format"] = detect_format(artifact)
        with open_model(artifact) as model:
            spec = model.tokenizer
    except FormatError as exc:  # the strict reader refuses it (a failed conversion's placeholder...)
        record["error"] = f"artifact unreadable: {exc}"[:2000]
        record["no_artifact"] = getattr(exc, "failure", None)
        return record
    tokenizer = AutoTokenizer.from_pretrained(source)
    source_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    texts = corpus(tokenizer)
    llama = None
    if record["format"] == "gguf":
        llama = llama_cpp_vocab_isolated(artifact, [t for _, t in texts], os.fspath(scratch),
                                         timeout_s=timeout_s, engine_log=os.fspath(engine_log))
        record["llama_cpp"] = {k: v for k, v in llama.items() if k not in ("plain", "with_specials")}
        record["tokenizer"] = [
            {"id": text_id, "text": text, "mode": mode, "reference": list(tokenizer.encode(text, add_special_tokens=adds)),
             "candidate": None if llama.get("error") else llama[mode][i]}
            for mode, adds in (("plain", False), ("with_specials", True))
            for i, (text_id, text) in enumerate(texts)
        ]
    artifact_template = spec.chat_template if spec is not None else None
    record["chat"] = {
        "source_template": source_template is not None,
        "artifact_template": artifact_template is not None,
        "tools": template_supports_tools(source_template),
        "conversations": [],
    }
    if source_template is None or artifact_template is None:
        return record
    renderers = {"transformers": lambda m, g, t: render_chat(
        artifact_template, m, bos_token=special_token_text(spec, spec.bos_token_id),
        eos_token=special_token_text(spec, spec.eos_token_id), add_generation_prompt=g, tools=t)}
    if llama is not None:
        renderers["llama.cpp"] = _llama_cpp_renderer(llama)
    for conv_id, messages, generation_prompt, needs_tools in CONVERSATIONS:
        if needs_tools and not record["chat"]["tools"]:
            continue
        tools = _TOOLS if needs_tools else None
        expected, why = _render_source(tokenizer, messages, generation_prompt, tools)
        entry = {"id": conv_id, "add_generation_prompt": generation_prompt, "reference": expected,
                 "reference_error": why, "renders": {}}
        for name, render in renderers.items():
            text, error = _render(render, messages, generation_prompt, tools)
            entry["renders"][name] = {"text": text, "error": error}
        record["chat"]["conversations"].append(entry)
    return record


def _llama_cpp_renderer(llama: dict):
    """llama-cpp-python's own formatter over the template llama.cpp read from the file."""
    def render(messages, add_generation_prompt, tools):
        if llama.get("error"):
            raise RuntimeError(f"llama.cpp could not read the file: {llama['error']}")
        if not llama.get("chat_template"):
            raise RuntimeError("llama.cpp finds no tokenizer.chat_template in the file")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(llama["chat_template"], eos_token=llama["eos_token"],
                                        bos_token=llama["bos_token"], add_generation_prompt=add_generation_prompt)
        return formatter(messages=messages, tools=tools).prompt

    return render


def parity_job(artifact: str, source: str, json_path: str, *, timeout_s: float, engine_log: str) -> dict:
    """parity_record written to json_path (what rule parity calls). Returns the record."""
    record = parity_record(artifact, source, timeout_s=timeout_s, engine_log=engine_log,
                           scratch=f"{json_path}.llama.json")
    write_json(json_path, record)
    return record


def load_parity(json_path) -> dict:
    """A parity record; a damaged one is the artifact's failure, not the gate job's."""
    try:
        with open(json_path) as fh:
            record = json.load(fh)
        if not isinstance(record, dict):
            raise ValueError(f"a parity record is a JSON object, not {type(record).__name__}")
        return record
    except (OSError, ValueError) as exc:
        return {"error": f"parity record {json_path} unreadable: {type(exc).__name__}: {exc}"}
