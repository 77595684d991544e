"""Chat templates: messages -> prompt text.

A GGUF's ``tokenizer.chat_template`` (a Jinja template from the model's Hugging Face
tokenizer_config.json) is rendered the way transformers renders it: a sandboxed Jinja
environment with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a
``tojson`` filter that keeps non-ASCII text, and the globals ``raise_exception`` and
``strftime_now``; the context holds ``messages``, ``add_generation_prompt``, ``tools``,
``documents`` and the special-token texts (``bos_token``, ``eos_token``, ...).

A GGUF without a template gets a built-in one chosen by architecture, written out as
llama.cpp's ``llama_chat_apply_template`` writes it for the same name:

    gemma   <start_of_turn>user\\n{content}<end_of_turn>\\n ... <start_of_turn>model\\n
            (roles: assistant -> model; a system message is prefixed to the next user turn)
    llama3  <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> ...
    llama2  [INST] {user} [/INST]{assistant}</s>[INST] ...   (system: folded into the turn)
    chatml  <|im_start|>{role}\\n{content}<|im_end|>\\n ...   (fallback)

The rendered text contains special-token strings; encode it with ``parse_special=True``.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Callable, Sequence

from .errors import TpNumaError

_C_SPACE = " \t\n\v\f\r"  # C isspace(): what llama.cpp's trim() removes


def _trim(s: str) -> str:
    return s.strip(_C_SPACE)


def _chatml(messages, add_generation_prompt):
    out = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _gemma(messages, add_generation_prompt):
    out, system = [], ""
    for m in messages:
        role = m["role"]
        if role == "system":
            system += _trim(m["content"])
            continue
        role = "model" if role == "assistant" else role
        out.append(f"<start_of_turn>{role}\n")
        if system and role != "model":
            out.append(system + "\n\n")
            system = ""
        out.append(_trim(m["content"]) + "<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


def _llama3(messages, add_generation_prompt):
    out = [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{_trim(m['content'])}<|eot_id|>"
           for m in messages]
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def _llama2(messages, add_generation_prompt):
    # llama.cpp's plain 'llama2': no <<SYS>> block, the assistant turn is opened by [/INST].
    out, inside = ["[INST] "], True
    for m in messages:
        if not inside:
            inside = True
            out.append("[INST] ")
        if m["role"] == "system":
            out.append(m["content"] + "\n")
        elif m["role"] == "user":
            out.append(m["content"] + " [/INST]")
        else:
            out.append(m["content"] + "</s>")
            inside = False
    return "".join(out)


BUILTIN_TEMPLATES: dict[str, Callable] = {
    "chatml": _chatml, "gemma": _gemma, "llama3": _llama3, "llama2": _llama2,
}


def builtin_name(architecture: str, tokenizer_model: str = "", vocab: dict | None = None) -> str:
    """The built-in template for a model without one: gemma for Gemma models, llama3 for
    vocabularies with Llama 3 headers, llama2 for SentencePiece Llama/Mistral, else chatml."""
    vocab = vocab or {}
    if architecture.startswith("gemma"):
        return "gemma"
    if "<|start_header_id|>" in vocab:
        return "llama3"
    if "<|im_start|>" in vocab:
        return "chatml"
    if architecture == "llama" and tokenizer_model == "llama":
        return "llama2"
    return "chatml"


def render_builtin(name: str, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    try:
        fn = BUILTIN_TEMPLATES[name]
    except KeyError:
        raise TpNumaError(f"unknown built-in chat template '{name}' "
                          f"(known: {', '.join(sorted(BUILTIN_TEMPLATES))})") from None
    _check_messages(messages)
    return fn(messages, add_generation_prompt)


def _check_messages(messages) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TpNumaError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r}")


_env_cache: dict[str, object] = {}


def _compile(template: str):
    """Compile ``template`` once, in a sandbox configured like transformers'."""
    compiled = _env_cache.get(template)
    if compiled is not None:
        return compiled
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): pass through."""
        tags = {"generation"}

        def parse(self, parser):
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TpNumaError(f"chat template (tokenizer.chat_template) does not parse: {e.message} (line {e.lineno})") from None
    _env_cache[template] = compiled
    return compiled


def render_jinja(template: str, messages: Sequence[dict], add_generation_prompt: bool = True,
                 special_tokens: dict | None = None, **extra) -> str:
    """Render a Hugging Face style Jinja chat template."""
    import jinja2

    _check_messages(messages)
    compiled = _compile(template)
    ctx = {"tools": None, "documents": None, **(special_tokens or {}), **extra}
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **ctx)
    except jinja2.exceptions.TemplateError as e:
        raise TpNumaError(f"chat template (tokenizer.chat_template) failed: {e}") from None


def apply_chat_template(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                        template: str | None = None, **extra) -> str:
    """Prompt text for ``messages`` ([{'role': ..., 'content': ...}, ...]).

    ``template``: None = the GGUF's template, else the built-in for the architecture;
    a built-in name ('gemma', 'chatml', 'llama3', 'llama2') or a Jinja template string
    overrides it. ``extra`` is passed to Jinja templates (e.g. ``tools=[...]``).
    """
    if template is None:
        template = tokenizer.chat_template or builtin_name(
            tokenizer.architecture, tokenizer.model, tokenizer.token_to_id)
    if template in BUILTIN_TEMPLATES:
        return render_builtin(template, messages, add_generation_prompt)

    def text(i):
        return tokenizer.tokens[i] if i is not None else ""

    special = {"bos_token": text(tokenizer.bos_id), "eos_token": text(tokenizer.eos_id),
               "unk_token": text(tokenizer.unk_id), "pad_token": text(tokenizer.pad_id)}
    return render_jinja(template, messages, add_generation_prompt, special, **extra)
