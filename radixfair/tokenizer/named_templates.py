"""`--chat-template`: a built-in template by SGLang's name, or a jinja file.

SGLang's built-in templates are Python conversation objects (`sglang.srt.conversation`); the
text-only ones are written here as jinja that renders the same prompt, so that one renderer
(`chat_template`, transformers' semantics) serves every template. As in SGLang, a system message
replaces the template's default one, and other roles than system, user and assistant are refused.
"""

from __future__ import annotations

import os

import jinja2

from radixfair.tokenizer.chat_template import compile_chat_template

_SYSTEM_AND_TURNS = (
    r"{%- for m in messages if m['role'] not in ('system', 'user', 'assistant') -%}"
    r"{{- raise_exception('this chat template takes system, user and assistant messages, not ' + m['role']) -}}"
    r"{%- endfor -%}"
    r"{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endfor -%}"
    r"{%- set turns = messages | rejectattr('role', 'equalto', 'system') | list -%}"
)

NAMED_CHAT_TEMPLATES: dict[str, str] = {
    # <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n
    "chatml": (
        r"{%- set ns = namespace(system='You are a helpful assistant.') -%}" + _SYSTEM_AND_TURNS
        + r"{{- '<|im_start|>system\n' + ns.system + '<|im_end|>\n' -}}"
        r"{%- for m in turns -%}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
    ),
    # [INST] <<SYS>>\n...\n<</SYS>>\n\nfirst [/INST] answer </s><s>[INST] next [/INST]
    "llama-2": (
        r"{%- set ns = namespace(system='') -%}" + _SYSTEM_AND_TURNS
        + r"{{- ('[INST] <<SYS>>\n' + ns.system + '\n<</SYS>>\n\n') if ns.system else '[INST] ' -}}"
        r"{%- for m in turns -%}"
        r"{%- if loop.first -%}{{- m['content'] + ' ' -}}"
        r"{%- elif loop.index0 % 2 == 1 -%}{{- '[/INST] ' + m['content'] + ' </s><s>' -}}"
        r"{%- else -%}{{- '[INST] ' + m['content'] + ' ' -}}{%- endif -%}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '[/INST]' if turns | length % 2 == 1 else '[INST]' -}}{%- endif -%}"
    ),
    # SYSTEM USER: first ASSISTANT: answer</s>USER: next ASSISTANT:
    "vicuna_v1.1": (
        r"{%- set ns = namespace(system=" + '"A chat between a curious user and an artificial intelligence '
        "assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.\""
        + r") -%}" + _SYSTEM_AND_TURNS
        + r"{{- ns.system + ' ' -}}"
        r"{%- for m in turns -%}"
        r"{{- ('USER' if m['role'] == 'user' else 'ASSISTANT') + ': ' + m['content']"
        r" + (' ' if loop.index0 % 2 == 0 else '</s>') -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    ),
}


def load_chat_template(arg: str) -> str:
    """The jinja source `--chat-template ARG` names: a built-in template, or a jinja file (checked to
    compile, so that a broken file fails at start and not on the first chat request)."""
    if arg in NAMED_CHAT_TEMPLATES:
        return NAMED_CHAT_TEMPLATES[arg]
    names = ", ".join(NAMED_CHAT_TEMPLATES)
    path = os.path.expanduser(arg)
    if not os.path.isfile(path):
        raise ValueError(f"--chat-template {arg!r} is neither a built-in template ({names}) nor a file")
    if path.lower().endswith(".json"):
        raise ValueError(f"--chat-template {arg!r}: SGLang's JSON conversation templates are not supported; "
                         f"write the template as a .jinja file, or use a built-in one ({names})")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--chat-template {arg!r}: cannot read it ({e})") from e
    try:
        compile_chat_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template {arg!r} is not a valid jinja template (line {e.lineno}: {e.message})") from e
    return source
