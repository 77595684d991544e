"""OpenAI request bodies -> ``GenRequest``, and the response objects (chat, completions,
streaming chunks, errors), as OpenAI and llama-server define them.

Every problem with a request raises ``RequestError`` naming the field; the app answers it
with HTTP 400 (or ``status``) in OpenAI's error shape ``{"error": {"message", "type",
"param", "code"}}``. Sampling defaults are llama-server's (temperature 0.8, top_k 40,
top_p 0.95, min_p 0.05).
"""
from __future__ import annotations

import math
import time
import uuid

from ..sampling import SamplingParams
from .requests import Event, GenRequest, TokenLogprob, Usage

MAX_STOP = 16
MAX_TOP_LOGPROBS = 20


class RequestError(Exception):
    """A bad request: ``message`` names the field ``param``; answered with ``status``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if not (math.isfinite(float(v)) and lo <= v <= hi):
        raise RequestError(f"'{name}' must be in [{lo}, {hi}], got {v!r}", name)
    return int(v) if integer else float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"'{name}' must be true or false, got {v!r}", name)
    return v


def _sampling(body: dict) -> SamplingParams:
    seed = body.get("seed")
    if seed is not None:
        seed = _number(body, "seed", None, -1, 2**63 - 1, integer=True)
        seed = None if seed < 0 else seed          # llama-server: -1 = random
    return SamplingParams(
        temperature=_number(body, "temperature", 0.8, 0.0, 100.0),
        top_k=_number(body, "top_k", 40, 0, 1 << 30, integer=True),
        top_p=_number(body, "top_p", 0.95, 1e-9, 1.0),
        min_p=_number(body, "min_p", 0.05, 0.0, 1.0),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 1e-6, 100.0),
        repeat_last_n=_number(body, "repeat_last_n", 64, 0, 1 << 30, integer=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=seed,
    )


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > MAX_STOP:
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
    return [s for s in v if s]


def _max_tokens(body: dict, prompt_len: int, slot_context: int, default: int | None) -> int:
    room = slot_context - prompt_len
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    n = _number(body, name, None, -1, 1 << 31, integer=True)
    if n is None or n < 0:                         # absent, or llama-server's -1: up to the context
        n = room if default is None else min(default, room)
    if n > room:
        raise RequestError(f"'{name}' is {n} but the prompt ({prompt_len} tokens) leaves {room} of the "
                           f"{slot_context} positions of a slot; lower it or shorten the prompt", name)
    return n


def _common(body: dict) -> None:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    n = _number(body, "n", 1, 1, 1 << 20, integer=True)
    if n != 1:
        raise RequestError("only 'n': 1 is supported", "n")


def messages_text(tok, messages) -> str:
    """The chat template applied to OpenAI ``messages`` (assistant turn opened)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role'", "messages")
        if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(f"messages[{i}].role {m['role']!r} is not one of system, user, assistant, tool",
                               "messages")
        content = m.get("content")
        if isinstance(content, list):        # content parts: only text is understood
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise RequestError(f"messages[{i}].content: only text parts are supported", "messages")
                parts.append(p["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": content})
    return tok.apply_chat_template(clean, add_generation_prompt=True)


def chat_prompt_ids(tok, text: str) -> list[int]:
    """Token ids of a rendered chat template: special tokens parsed; a template that
    starts with the BOS text does not get a second BOS (as llama.cpp strips it)."""
    bos_text = tok.tokens[tok.bos_id] if tok.bos_id is not None else None
    if tok.add_bos and bos_text and text.startswith(bos_text):
        text = text[len(bos_text):]
    return list(tok.encode(text, parse_special=True))


def parse_chat(body: dict, tok, slot_context: int) -> tuple[GenRequest, dict]:
    """A /v1/chat/completions body -> (GenRequest, options {stream, include_usage, logprobs})."""
    _common(body)
    ids = chat_prompt_ids(tok, messages_text(tok, body.get("messages")))
    return _request(body, ids, slot_context, default_max=None, chat=True)


def parse_completion(body: dict, tok, slot_context: int) -> tuple[GenRequest, dict]:
    """A /v1/completions body (prompt: a string or a list of token ids) -> (GenRequest, options)."""
    _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = list(tok.encode(prompt))
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise RequestError("'prompt' must be a string or a non-empty list of token ids", "prompt")
    return _request(body, ids, slot_context, default_max=16, chat=False)


def _request(body: dict, ids: list[int], slot_context: int, default_max: int | None, chat: bool):
    if not ids:
        raise RequestError("the prompt is empty (no tokens)", "messages" if chat else "prompt")
    if len(ids) >= slot_context:
        raise RequestError(f"the prompt has {len(ids)} tokens but a slot holds {slot_context} positions "
                           "(prompt and reply together); shorten it or start the server with a larger --ctx-size",
                           "messages" if chat else "prompt")
    if chat:
        want = _bool(body, "logprobs", False)
        top = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
        logprobs = max(top, 1) if want else 0
        top_n = top
    else:
        top_n = _number(body, "logprobs", 0, 0, 5, integer=True) if body.get("logprobs") is not False else 0
        logprobs = max(top_n, 1) if body.get("logprobs") not in (None, False) else 0
    stream = _bool(body, "stream", False)
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    req = GenRequest(prompt_ids=ids, max_tokens=_max_tokens(body, len(ids), slot_context, default_max),
                     sampling=_sampling(body), stop=_stop(body), logprobs=logprobs,
                     ignore_eos=_bool(body, "ignore_eos", False))
    return req, {"stream": stream, "include_usage": bool(so.get("include_usage", False)), "top_n": top_n,
                 "echo": False}


# ---- responses ----------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_json(u: Usage | None) -> dict | None:
    if u is None:
        return None
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def finish_json(reason: str | None) -> str | None:
    return {"abort": "stop", "error": "stop"}.get(reason, reason) if reason else None


def chat_logprobs(lps: list[TokenLogprob], top_n: int) -> dict:
    def entry(t: str, lp: float) -> dict:
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
    return {"content": [dict(entry(x.text, x.logprob), top_logprobs=[entry(t, v) for _, t, v in x.top[:top_n]])
                        for x in lps]}


def completion_logprobs(lps: list[TokenLogprob], top_n: int, offset0: int) -> dict:
    offsets, off = [], offset0
    for x in lps:
        offsets.append(off)
        off += len(x.text)
    return {"tokens": [x.text for x in lps], "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [{t: v for _, t, v in x.top[:top_n]} for x in lps], "text_offset": offsets}


class Reply:
    """Collects a request's events into the final response, or turns each into a chunk."""

    def __init__(self, model: str, chat: bool, opts: dict):
        self.model, self.chat, self.opts = model, chat, opts
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.text: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.final: Event | None = None
        self._sent_role = False
        self._offset = 0

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def add(self, ev: Event) -> None:
        self.text.append(ev.text)
        self.logprobs.extend(ev.logprobs)
        if ev.final:
            self.final = ev

    def response(self) -> dict:
        text = "".join(self.text)
        ev = self.final
        lp = None
        if self.opts.get("top_n") is not None and self.logprobs:
            lp = (chat_logprobs(self.logprobs, self.opts["top_n"]) if self.chat
                  else completion_logprobs(self.logprobs, self.opts["top_n"], 0))
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": finish_json(ev.finish_reason)}
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_json(ev.finish_reason)}
            out = self._head("text_completion")
        out["choices"] = [choice]
        out["usage"] = usage_json(ev.usage)
        return out

    def chunk(self, ev: Event) -> dict | None:
        """The streaming chunk for ``ev`` (None when it carries nothing to send)."""
        if not ev.text and not ev.final and not ev.logprobs:
            return None
        lp = None
        if ev.logprobs:
            lp = (chat_logprobs(ev.logprobs, self.opts["top_n"]) if self.chat
                  else completion_logprobs(ev.logprobs, self.opts["top_n"], self._offset))
        self._offset += len(ev.text)
        if self.chat:
            delta = {"content": ev.text} if ev.text else {}
            if not self._sent_role:
                delta["role"] = "assistant"
                self._sent_role = True
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_json(ev.finish_reason)}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": ev.text, "logprobs": lp, "finish_reason": finish_json(ev.finish_reason)}
            out = self._head("text_completion")
        out["choices"] = [choice]
        if ev.final and self.opts.get("include_usage"):
            out["usage"] = usage_json(ev.usage)
        return out
