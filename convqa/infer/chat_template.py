"""Chat prompts rendered from the template an artifact carries, as transformers renders them."""

from __future__ import annotations

import json
import time

from convqa.model import TokenizerSpec


def render_chat(
    chat_template: str,
    messages: list[dict],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> str:
    """Render `messages` with a Jinja chat template the way transformers does.

    Same sandbox and whitespace settings as `transformers.utils.chat_template_utils`
    (trim_blocks, lstrip_blocks, `raise_exception`), so the text equals `apply_chat_template`;
    `tools` (JSON schemas) is passed as transformers passes it, None when there are none.
    """
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def strftime_now(fmt):
        return time.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(chat_template).render(
        messages=messages, tools=tools, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
    )


def special_token_text(spec: TokenizerSpec | None, token_id: int | None) -> str:
    """The spelling of a special token in the artifact's own vocabulary ('' when absent)."""
    if spec is None or token_id is None or not 0 <= token_id < len(spec.tokens):
        return ""
    return spec.tokens[token_id]
