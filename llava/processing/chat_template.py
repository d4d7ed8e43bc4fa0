"""Our conversation templates as Jinja chat templates, for transformers' `apply_chat_template`.

An exported checkpoint carries its template as `chat_template.jinja`, so transformers'
processor, pipelines, vLLM and SGLang build the very prompt `Template.render` builds (the
prompt the checkpoint was trained on) without our code.  Messages follow llava-hf:

    [{"role": "system", "content": "..."},                      # optional: replaces the system prompt
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A"}]}, ...]

Image parts become `<image>\\n` in front of the message's text and text parts are joined
as they are, which is what `llava.api` does with the same messages; a plain-string content is
used as it is.  An optional system message comes first and replaces the system prompt.  The
generated template emits no newline outside its string literals, so the Jinja whitespace
options a host may use (`trim_blocks`, `lstrip_blocks`) cannot change the output.
"""

from __future__ import annotations

from dataclasses import replace

from llava.processing.templates import SepStyle, Template

__all__ = ["jinja_literal", "to_jinja"]

_CONTENT_MACRO = (
    "{%- macro content(m) -%}"
    "{%- if m['content'] is none -%}"
    "{%- elif m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}"
    "{%- for p in m['content'] if p['type'] in ('image', 'image_url') -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for p in m['content'] if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)
# After the optional system message, roles must alternate user/assistant from a user message.
_ROLE_CHECK = (
    "{%- if m['role'] != ('user' if ns.i % 2 == 0 else 'assistant') -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/... "
    "after an optional first system message, starting with user.') }}"
    "{%- endif -%}"
)


def jinja_literal(text: str) -> str:
    """`text` as a Jinja string literal (Jinja unescapes literals like Python's unicode-escape)."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in "\\\"":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif 32 <= code < 127:
            out.append(ch)
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _few_shot_text(template: Template) -> str:
    """The canned example turns as rendered between the system block and the real turns."""
    if not template.few_shot:
        return ""
    bare = replace(template, system="", few_shot=())
    return bare.render(list(template.few_shot))[len(bare.render([])):]


def _turns(template: Template) -> str:
    """The Jinja for one message `text` (index `ns.i` among the real turns) of each style."""
    lit = jinja_literal
    user, assistant = template.roles
    end_user, end_assistant = lit(template._end_sep(0)), lit(template._end_sep(1))
    if template.style is SepStyle.LLAMA_2:
        return (
            "{%- if ns.i % 2 == 0 -%}"
            "{%- if ns.i == 0 and not text -%}{{ raise_exception('The first user message must not be empty.') }}"
            "{%- endif -%}"
            "{%- if ns.i == 0 and ns.system -%}"
            "{%- set text = '<<SYS>>\\n' ~ ns.system ~ '\\n<</SYS>>\\n\\n' ~ text -%}{%- endif -%}"
            f"{{%- if text -%}}{{{{ ({lit(template.sep)} if ns.i > 0 else '') ~ '[INST] ' ~ text ~ ' [/INST]' }}}}"
            "{%- endif -%}"
            f"{{%- elif text -%}}{{{{ ' ' ~ text ~ ' ' ~ {lit(template.sep2 or '')} }}}}"
            "{%- endif -%}"
        )
    if template.style is SepStyle.PLAIN:
        return f"{{%- if text -%}}{{{{ text ~ ({end_user} if ns.i % 2 == 0 else {end_assistant}) }}}}{{%- endif -%}}"
    # ChatML roles carry their own markup; the others are "ROLE: message" or a bare "ROLE:".
    head, space = ("role", "") if template.style is SepStyle.MPT else ("role ~ ':'", " ~ ' '")
    return (
        f"{{%- set role = {lit(user)} if ns.i % 2 == 0 else {lit(assistant)} -%}}"
        f"{{%- if text -%}}{{{{ {head}{space} ~ text ~ ({end_user} if ns.i % 2 == 0 else {end_assistant}) }}}}"
        f"{{%- else -%}}{{{{ {head} }}}}{{%- endif -%}}"
    )


def to_jinja(template: Template) -> str:
    """A self-contained Jinja chat template rendering exactly what `template` renders.

    `apply_chat_template(messages, add_generation_prompt=True)` equals
    `template.render(turns + [None])`; a conversation ending with the assistant's answer and
    no generation prompt equals `template.render(turns)`; a system message `s` renders as
    `template.with_system(s)` does.
    """
    if template.style is SepStyle.LLAMA_2 and template.few_shot:
        raise NotImplementedError(f"{template.name}: few-shot turns with the [INST] style")
    lit = jinja_literal
    open_turn = {SepStyle.LLAMA_2: "", SepStyle.PLAIN: "", SepStyle.MPT: template.roles[1]}.get(
        template.style, template.roles[1] + ":")
    if template.style is SepStyle.LLAMA_2:
        head = ""
    elif template.style is SepStyle.PLAIN:
        head = "{{ ns.system }}"
    else:
        head = f"{{{{ ns.system ~ {lit(template.sep)} }}}}"
    return "".join([
        _CONTENT_MACRO,
        f"{{%- set ns = namespace(system={lit(template.system)}, i=0, skip=0) -%}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        f"{{%- set ns.system = {lit(template.system_prefix)} ~ content(messages[0]) -%}}",
        "{%- set ns.skip = 1 -%}{%- endif -%}",
        head,
        f"{{{{ {lit(_few_shot_text(template))} }}}}" if template.few_shot else "",
        "{%- for m in messages[ns.skip:] -%}",
        _ROLE_CHECK,
        "{%- set text = content(m) -%}",
        _turns(template),
        "{%- set ns.i = ns.i + 1 -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt and ns.i % 2 == 1 -%}}{{{{ {lit(open_turn)} }}}}{{%- endif -%}}",
    ])
