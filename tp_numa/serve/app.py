"""The FastAPI application of ``tp-numa serve`` (rank 0): OpenAI and llama-server endpoints
over a ``BatchEngine``.

Requests are parsed in ``protocol.py``; a parsed request goes to ``engine.submit`` with an
``on_event`` that hands the engine thread's events to this request's asyncio queue. A
streaming response is a server-sent-event stream of chunks ending in ``data: [DONE]``; when
the client goes away the stream is closed and the request is cancelled at once (its slot
is free at the next step). Every error is JSON in OpenAI's error shape; the server keeps
serving.
"""
from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import TpNumaError
from . import protocol
from .requests import FINISH_ERROR, QueueFull

_DISCONNECT_POLL_S = 0.25


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, kind, param, status), status_code=status)


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise protocol.RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise protocol.RequestError("the request body must be a JSON object")
    return body


def make_app(engine, llm, model_name: str) -> FastAPI:
    """The app for ``engine`` (a running BatchEngine) and ``llm`` (its model, tokenizer)."""
    app = FastAPI(title="tp-numa", docs_url=None, redoc_url=None, openapi_url=None)
    tok = llm.tokenizer

    @app.exception_handler(protocol.RequestError)
    async def _bad_request(_, e: protocol.RequestError):
        return _error(e.status, e.message, e.kind, e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "tp-numa", "meta": {"n_ctx_slot": engine.slot_context,
                                                                           "n_slots": engine.n_slots}}]}

    @app.get("/metrics")
    async def metrics():
        m = engine.metrics()
        rows = [
            ("requests_total", "counter", "requests received", m["requests_total"]),
            ("requests_failed_total", "counter", "requests ended by an error", m["requests_failed_total"]),
            ("requests_running", "gauge", "requests in a slot", m["requests_running"]),
            ("requests_waiting", "gauge", "requests queued for a slot", m["requests_waiting"]),
            ("slots", "gauge", "KV slots", m["slots"]),
            ("prompt_tokens_total", "counter", "prompt tokens received", m["prompt_tokens_total"]),
            ("cached_tokens_total", "counter", "prompt tokens served from the prefix cache", m["cached_tokens_total"]),
            ("generated_tokens_total", "counter", "tokens generated", m["generated_tokens_total"]),
            ("steps_total", "counter", "batched forward steps", m["steps_total"]),
            ("step_seconds_total", "counter", "seconds spent in forward steps", m["step_seconds_total"]),
            ("step_rows_total", "counter", "token rows run by the steps", m["step_rows_total"]),
        ]
        text = "".join(f"# HELP tp_numa_{n} {h}\n# TYPE tp_numa_{n} {t}\ntp_numa_{n} {v}\n" for n, t, h, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json_body(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise protocol.RequestError("'content' must be a string", "content")
        add_special = body.get("add_special", False)
        if not isinstance(add_special, bool):
            raise protocol.RequestError("'add_special' must be true or false", "add_special")
        return {"tokens": list(tok.encode(content, add_bos=add_special))}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _json_body(request)
        ids = body.get("tokens")
        vocab = len(tok.tokens)
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise protocol.RequestError("'tokens' must be a list of token ids", "tokens")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise protocol.RequestError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "tokens")
        return {"content": tok.decode(ids, skip_special=False)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _json_body(request)
        req, opts = protocol.parse_chat(body, tok, engine.slot_context)
        return await _run(request, req, opts, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        req, opts = protocol.parse_completion(body, tok, engine.slot_context)
        return await _run(request, req, opts, chat=False)

    async def _run(request: Request, req, opts: dict, chat: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            rid = engine.submit(req, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        except QueueFull as e:
            return _error(503, str(e), "server_busy")
        except TpNumaError as e:
            raise protocol.RequestError(str(e)) from None
        reply = protocol.Reply(model_name, chat, opts)
        if opts["stream"]:
            return StreamingResponse(_stream(rid, queue, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), _DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(rid)
                    return _error(499, "the client closed the connection")
                continue
            reply.add(ev)
            if ev.final:
                break
        if reply.final.finish_reason == FINISH_ERROR:
            return _error(500, reply.final.error or "the request failed", "server_error")
        return reply.response()

    async def _stream(rid: int, queue: asyncio.Queue, reply: protocol.Reply):
        done = False
        try:
            while True:
                ev = await queue.get()
                if ev.final and ev.finish_reason == FINISH_ERROR:
                    done = True
                    err = protocol.error_body(ev.error or "the request failed", "server_error")
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                chunk = reply.chunk(ev)
                if chunk is not None:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                if ev.final:
                    done = True
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not done:           # the client went away mid-stream: free the slot now
                engine.cancel(rid)

    return app
