"""The tokenizer and chat-template parity gates, decided from parity records (rule parity,
convqa.infer.parity): pure functions over the loaded JSON, no engines.

- F-TOK-001 (each GGUF): llama.cpp's tokenizer built from the file encodes the fixed corpus to the
  source HF tokenizer's ids, with specials parsed and without BOS, and with the specials each side
  adds itself. The reason names the first differing text and both id sequences.
- F-CHAT-001 (each artifact x renderer): the chat template the artifact carries renders every
  fixed conversation to exactly the source's `apply_chat_template` text; renderer `transformers`
  is Jinja2 as transformers renders, `llama.cpp` is llama-cpp-python's Jinja2ChatFormatter over
  the template llama.cpp reads from a GGUF. An artifact without a template where the source has
  one (or with one where the source has none) fails; neither with one: skipped.
"""

from __future__ import annotations

import json

from convqa.formats import no_artifact
from convqa.workflow.plan import target_format
from convqa.gates.rows import DETAILED_PROBLEMS, FAIL, NOT_EVALUATED, SKIPPED, GateRow, label, verdict

TOKENIZER_GATE = "F-TOK-001"
CHAT_GATE = "F-CHAT-001"
SOURCE_CHAIN = "st"
SHOWN_IDS = 24  # ids of each sequence a reason shows, from a little before the first difference
SHOWN_CHARS = 60


def _subject(variant: str, chain: str, who: str) -> str:
    return f"{label(variant, chain)}/{who}"


def _first_difference(a, b) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _window(seq, at: int, width: int):
    start = max(0, at - 4)
    return ("..." if start else "") + str(list(seq[start:start + width]))[1:-1].join("[]") + (
        "..." if start + width < len(seq) else "")


def _unusable(record: dict) -> tuple[str, str] | None:
    """(status, reason) when a record cannot be judged: a failed conversion upstream waits, an
    unreadable artifact fails."""
    if record.get("no_artifact"):
        return NOT_EVALUATED, no_artifact.describe(record["no_artifact"])
    if record.get("error"):
        return FAIL, record["error"][:500]
    return None


def tokenizer_rows(model: str, variant: str, records: dict[str, dict]) -> list[GateRow]:
    """F-TOK-001 per GGUF chain. records: chain -> loaded parity record."""
    rows = []
    for chain, record in sorted(records.items()):
        if not _is_gguf(chain):
            continue
        row = GateRow(TOKENIZER_GATE, _subject(variant, chain, "llama.cpp"),
                      reference=_subject(variant, SOURCE_CHAIN, "transformers"),
                      metric="corpus texts tokenized differently", threshold="0", model=model, variant=variant)
        if unusable := _unusable(record):
            row.status, row.reason = unusable
        elif (record.get("llama_cpp") or {}).get("error"):
            row.status, row.reason = FAIL, f"llama.cpp could not build its tokenizer from the file: {record['llama_cpp']['error'][:400]}"
        elif not record.get("tokenizer"):
            row.reason = "no corpus text was tokenized"
        else:
            problems, mismatches = [], []
            for entry in record["tokenizer"]:
                ref, cand = entry["reference"], entry["candidate"]
                if ref == cand:
                    continue
                at = _first_difference(ref, cand)
                problems.append(f"{entry['id']} ({entry['mode']}) {entry['text'][:SHOWN_CHARS]!r}: first difference at id "
                                f"{at}: source {_window(ref, at, SHOWN_IDS)} vs llama.cpp {_window(cand, at, SHOWN_IDS)}")
                mismatches.append({**entry, "first_difference": at})
            verdict(row, len(problems), problems)
            if problems:
                row.details = json.dumps({"problems": problems[:DETAILED_PROBLEMS], "mismatches": mismatches[:20],
                                          "pre": record["llama_cpp"].get("pre")})
            else:
                row.reason = (f"{len(record['tokenizer'])} encodings equal ({len(record['tokenizer']) // 2} texts, "
                              f"specials parsed, without and with the specials each side adds)")
        rows.append(row)
    return rows


def _is_gguf(chain: str) -> bool:
    return chain != SOURCE_CHAIN and target_format(chain) == "gguf"


def _renderers(chain: str) -> list[str]:
    return ["transformers", "llama.cpp"] if _is_gguf(chain) else ["transformers"]


def _text_difference(expected: str, got: str) -> str:
    at = _first_difference(expected, got)
    lo = max(0, at - 20)
    return (f"first difference at character {at}: source {expected[lo:at + SHOWN_CHARS]!r} vs artifact "
            f"{got[lo:at + SHOWN_CHARS]!r}")


def chat_rows(model: str, variant: str, records: dict[str, dict]) -> list[GateRow]:
    """F-CHAT-001 per (chain, renderer). records: chain -> loaded parity record."""
    rows = []
    for chain, record in sorted(records.items()):
        for renderer in _renderers(chain):
            row = GateRow(CHAT_GATE, _subject(variant, chain, renderer),
                          reference=_subject(variant, SOURCE_CHAIN, "apply_chat_template"),
                          metric="conversations rendered differently", threshold="0", model=model, variant=variant)
            rows.append(_judge_chat(row, record, renderer))
    return rows


def _judge_chat(row: GateRow, record: dict, renderer: str) -> GateRow:
    if unusable := _unusable(record):
        row.status, row.reason = unusable
        return row
    chat = record.get("chat") or {}
    source, carried = chat.get("source_template"), chat.get("artifact_template")
    if not source and not carried:
        row.status, row.reason = SKIPPED, "neither the source nor the artifact carries a chat template"
        return row
    if source and not carried:
        row.value, row.status = "all", FAIL
        row.reason = "the artifact carries no chat template; the source has one"
        return row
    if carried and not source:
        row.value, row.status = "all", FAIL
        row.reason = "the artifact carries a chat template the source does not have"
        return row
    problems, compared, unrenderable = [], 0, []
    for conv in chat.get("conversations", []):
        if conv.get("reference") is None:
            unrenderable.append(f"{conv['id']}: {conv.get('reference_error')}")
            continue  # the source's own template refuses it: nothing to hold the artifact to
        compared += 1
        rendered = (conv.get("renders") or {}).get(renderer) or {"text": None, "error": "not rendered"}
        if rendered.get("text") is None:
            problems.append(f"{conv['id']}: {renderer} could not render it: {rendered.get('error')}")
        elif rendered["text"] != conv["reference"]:
            problems.append(f"{conv['id']} (add_generation_prompt={conv['add_generation_prompt']}): "
                            f"{_text_difference(conv['reference'], rendered['text'])}")
    if not compared:
        row.reason = "no conversation could be rendered by the source's template" + (
            f" ({'; '.join(unrenderable[:2])})" if unrenderable else "")
        return row
    verdict(row, len(problems), problems)
    if not problems:
        tools = " (a tool call among them)" if chat.get("tools") else ""
        row.reason = f"{compared} conversation(s) render to exactly the source's text{tools}"
    row.details = json.dumps({"problems": problems[:DETAILED_PROBLEMS], "compared": compared,
                              "source_refuses": unrenderable})
    return row


def parity_rows(model: str, variant: str, records: dict[str, dict]) -> list[GateRow]:
    """F-TOK-001 and F-CHAT-001 rows of one (model, variant)."""
    return tokenizer_rows(model, variant, records) + chat_rows(model, variant, records)
