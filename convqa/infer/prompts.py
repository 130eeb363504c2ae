"""The fixed prompt set every inference run uses, and how prompts become token ids.

Run prompts are tokenized once with the ground truth's tokenizer and the same ids are fed to every
engine, so a difference in logits is the artifact's doing, never the tokenizer's. Chat prompts are
rendered with the chat template carried by the artifact under test (its own metadata), then
tokenized with the ground-truth tokenizer: an artifact that lost or altered its template renders
different ids, and the chat gate sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from convqa.infer.chat_template import render_chat, special_token_text
from convqa.model import TokenizerSpec

RUN, CHAT = "run", "chat"
NO_CHAT_TEMPLATE = "artifact carries no chat template"


@dataclass(frozen=True)
class Prompt:
    id: str
    modality: str  # run | chat
    text: str = ""  # run prompts
    messages: list[dict] = field(default_factory=list)  # chat prompts


# Like the anchor playbook's MVP set: a fact, code, a long multi-step instruction, a chat exchange.
DEFAULT_PROMPTS = (
    Prompt("arithmetic", RUN, text="What is 2+2?"),
    Prompt("code", RUN, text="def fibonacci(n):"),
    Prompt(
        "multistep",
        RUN,
        text=(
            "Follow these steps carefully. First, list three primary colors. Second, name a fruit "
            "for each color. Third, write one sentence that uses all three fruits. Answer:"
        ),
    ),
    Prompt(
        "chat",
        CHAT,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    ),
)


def run_prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Ground-truth ids of a run prompt, with the specials the tokenizer adds by itself (BOS...)."""
    return list(tokenizer.encode(prompt.text, add_special_tokens=True))


def chat_prompt_ids(tokenizer, spec: TokenizerSpec | None, prompt: Prompt) -> tuple[list[int] | None, str]:
    """(ids, "") of a chat prompt rendered with `spec`'s own template, or (None, reason)."""
    if spec is None or not spec.chat_template:
        return None, NO_CHAT_TEMPLATE
    text = render_chat(
        spec.chat_template,
        prompt.messages,
        bos_token=special_token_text(spec, spec.bos_token_id),
        eos_token=special_token_text(spec, spec.eos_token_id),
    )
    # The template spells out every special token it wants.
    return list(tokenizer.encode(text, add_special_tokens=False)), ""


def prompt_ids(tokenizer, spec: TokenizerSpec | None, prompt: Prompt) -> tuple[list[int] | None, str]:
    """(ids, "") for any prompt, or (None, why it cannot be rendered for this artifact)."""
    if prompt.modality == RUN:
        return run_prompt_ids(tokenizer, prompt), ""
    return chat_prompt_ids(tokenizer, spec, prompt)
