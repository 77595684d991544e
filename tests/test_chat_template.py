"""Chat templates vs llama.cpp's built-in renderings and llama-cpp-python's Jinja
rendering of the GGUF template (golden data in tests/data)."""
from __future__ import annotations

import pytest

from golden import load_golden
from tp_numa.chat_template import BUILTIN_TEMPLATES, builtin_name, render_builtin, render_jinja
from tp_numa.errors import TpNumaError
from tp_numa.tokenizer import Tokenizer

MODELS = ("qwen2.5-coder-0.5b", "gemma3-270m")


@pytest.fixture(scope="module", params=MODELS)
def case(request, model_path):
    return Tokenizer.from_gguf(model_path(request.param)), load_golden(request.param)


def test_builtin_templates_equal_llama_cpp(case):
    _, g = case
    entries = [e for e in g["chat"] if e["template"] in BUILTIN_TEMPLATES]
    assert {e["template"] for e in entries} == set(BUILTIN_TEMPLATES)
    for e in entries:
        assert render_builtin(e["template"], e["messages"], e["add_generation_prompt"]) == e["text"], \
            (e["template"], e["add_generation_prompt"])


def test_model_template_equals_reference(case):
    """qwen: the GGUF's Jinja template as llama-cpp-python renders it; gemma3-270m has no
    template, so the built-in gemma format (as llama.cpp's 'gemma') is used."""
    tok, g = case
    if tok.chat_template:
        entries = [e for e in g["chat"] if e["template"] == "jinja"]
        assert len(entries) >= 4
    else:
        assert tok.architecture == "gemma3"
        entries = [e for e in g["chat"] if e["template"] == "gemma"]
    for e in entries:
        assert tok.apply_chat_template(e["messages"], add_generation_prompt=e["add_generation_prompt"]) == e["text"]


def test_chat_prompt_tokenizes_to_turn_tokens(case):
    tok, _ = case
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(text, parse_special=True)
    if tok.architecture == "gemma3":
        assert text == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        start, end = tok.token_to_id["<start_of_turn>"], tok.token_to_id["<end_of_turn>"]
    else:
        assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        start, end = tok.token_to_id["<|im_start|>"], tok.token_to_id["<|im_end|>"]
    assert ids.count(start) == text.count(tok.tokens[start]) and end in ids
    assert tok.is_eog(end)


def test_builtin_choice_by_architecture():
    assert builtin_name("gemma3") == "gemma"
    assert builtin_name("llama", "gpt2", {"<|start_header_id|>": 1}) == "llama3"
    assert builtin_name("llama", "llama", {}) == "llama2"
    assert builtin_name("qwen2", "gpt2", {"<|im_start|>": 5}) == "chatml"
    assert builtin_name("mystery") == "chatml"


def test_gemma_folds_system_into_first_user_turn():
    msgs = [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi "},
            {"role": "assistant", "content": "Hello"}]
    assert render_builtin("gemma", msgs, False) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n")


def test_jinja_environment_matches_transformers():
    tmpl = ("{% for m in messages %}{{ m.role }}:{{ m.content | tojson }}\n{% endfor %}"
            "{% if add_generation_prompt %}{{ bos_token }}go{% endif %}{{ strftime_now('%Y')[:2] }}")
    out = render_jinja(tmpl, [{"role": "user", "content": "héllo"}], True, {"bos_token": "<s>"})
    assert out == 'user:"héllo"\n<s>go20'
    with pytest.raises(TpNumaError, match="only user turns"):
        render_jinja("{{ raise_exception('only user turns') }}", [], True)
    with pytest.raises(TpNumaError, match="does not parse"):
        render_jinja("{% for %}", [], True)
    with pytest.raises(TpNumaError, match="message 0"):
        render_builtin("chatml", [{"content": "no role"}], True)
    with pytest.raises(TpNumaError, match="unknown built-in"):
        render_builtin("nope", [], True)
