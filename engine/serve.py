"""`lutengine serve`: an OpenAI-compatible HTTP server over continuous batching (engine/batch.py).

Starlette + uvicorn, the optional extra `lutengine[serve]`. Generation runs in
the scheduler's threads; the event loop only parses requests, queues them and
relays pieces, so a slow or vanished client never holds up the decode step.
Every failure of a request becomes an OpenAI-style error body
{"error": {"message", "type", "param", "code"}}; none stops the server.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import socket
import sys
import time

from .api import Reply, check_messages, check_response_format, fit_max_tokens, json_vocabulary, stop_list
from .batch import QueueFull, Request, Scheduler
from .chat import TemplateError
from .generate import ContextError
from .sampling import SamplingParams

INSTALL = "pip install 'lutengine[serve]'"
RETRY_AFTER_S = 1
MAX_BODY = 8 << 20  # bytes of a request body: a prompt of a full 128k context is a few hundred KB

_NUM = (int, float)
# Accepted fields and their JSON types (None: null allowed). top_k, min_p, repeat_penalty and ignore_eos are
# llama.cpp server's extensions (the openai client sends them through extra_body).
_COMMON = {"model": (str,), "max_tokens": (int, None), "temperature": _NUM, "top_p": _NUM, "seed": (int, None),
           "stop": (str, list, None), "stream": (bool,), "stream_options": (dict, None), "n": (int,),
           "response_format": (dict, None), "user": (str,), "presence_penalty": _NUM, "frequency_penalty": _NUM,
           "top_k": (int,), "min_p": _NUM, "repeat_penalty": _NUM, "ignore_eos": (bool,)}
FIELDS = {"chat.completion": {**_COMMON, "messages": (list,), "max_completion_tokens": (int, None)},
          "text_completion": {**_COMMON, "prompt": (str, list)}}
REQUIRED = {"chat.completion": "messages", "text_completion": "prompt"}
_JSON_TYPE = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
              dict: "an object", None: "null"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _typed(value, types) -> bool:
    if value is None:
        return None in types
    if isinstance(value, bool):
        return bool in types
    return any(t is not None and isinstance(value, t) for t in types)


def parse_body(raw: bytes, kind: str) -> dict:
    """The request's JSON, field names and types checked (422 naming the field), or 400 for bad JSON."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    fields = FIELDS[kind]
    for name, value in body.items():
        if name not in fields:
            raise ApiError(422, f"unrecognized request argument: {name}", name, code="unknown_parameter")
        if not _typed(value, fields[name]):
            want = " or ".join(_JSON_TYPE[t] for t in fields[name] if not (t is int and float in fields[name]))
            raise ApiError(422, f"{name} must be {want}, got {json.dumps(value)[:60]}", name,
                           code="invalid_type")
    if REQUIRED[kind] not in body:
        raise ApiError(422, f"missing required argument: {REQUIRED[kind]}", REQUIRED[kind], code="missing")
    return body


def _field(check, param: str):
    try:
        return check()
    except (ValueError, TypeError, TemplateError) as e:
        raise ApiError(422, f"{param}: {e}", param) from None


def prepare(model, body: dict, kind: str, context: int) -> tuple[list[int], int, SamplingParams, list[str], object]:
    """Prompt ids, max_tokens, sampling, stop strings and JSON grammar (or None) of a checked body
    (ApiError on what does not fit)."""
    if body.get("n", 1) != 1:
        raise ApiError(422, "only n=1 is supported", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name, 0) != 0:
            raise ApiError(422, f"{name} is not supported (use repeat_penalty)", name)
    grammar = _field(lambda: check_response_format(body.get("response_format")), "response_format")
    if kind == "chat.completion":
        try:
            ids = model.chat_ids(_field(lambda: check_messages(body["messages"]), "messages"))
        except TemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = body.get(name)
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list):  # OpenAI takes a batch of prompts; one is what n=1 serves
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise ApiError(422, "prompt must be a string or a list of one string", "prompt")
            prompt = prompt[0]
        ids = _field(lambda: model.tokenize(prompt), "prompt")
        name, max_tokens = "max_tokens", body.get("max_tokens", 16)
    if not ids:
        raise ApiError(400, "the prompt is empty", REQUIRED[kind])
    try:
        max_tokens = fit_max_tokens(len(ids), max_tokens, context)
    except ContextError as e:
        raise ApiError(400, str(e), name, code="context_length_exceeded") from None
    except ValueError as e:
        raise ApiError(422, str(e), name) from None
    stops = _field(lambda: stop_list(body.get("stop")), "stop")
    sampling = {k: body[k] for k in ("temperature", "top_p", "seed", "top_k", "min_p", "repeat_penalty") if k in body}
    for k, v in sampling.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ApiError(422, f"{k} must be finite", k)
    if sampling.get("seed") is not None and not 0 <= sampling["seed"] < 2 ** 64:
        raise ApiError(422, f"seed must be in [0, 2**64), got {sampling['seed']}", "seed")
    if "temperature" in sampling and not 0 <= sampling["temperature"] <= 2:
        raise ApiError(422, f"temperature must be in [0, 2], got {sampling['temperature']}", "temperature")
    try:
        params = SamplingParams(**sampling)
    except ValueError as e:
        raise ApiError(422, str(e), next((k for k in sampling if k.replace("_", "-") in str(e)), None)) from None
    return ids, max_tokens, params, stops, grammar


def build_app(model, scheduler: Scheduler, api_key: str | None = None, model_id: str | None = None):
    """The Starlette app (needs the serve extra)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    model_id = model_id or model.info.get("name", "lutengine")
    created = int(time.time())
    context = model.max_context

    def error(e: ApiError) -> Response:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    def guarded(handler, public: bool = False):
        async def endpoint(request):
            try:
                if api_key is not None and not public:
                    got = request.headers.get("authorization", "")
                    if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                        raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                       kind="authentication_error", code="invalid_api_key")
                return await handler(request)
            except ApiError as e:
                return error(e)
            except Exception as e:  # the server outlives any request
                return error(ApiError(500, f"{type(e).__name__}: {e}", kind="server_error"))
        return endpoint

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "lutengine",
             "meta": {**model.info, "context": context, "slots": scheduler.parallel}}]})

    async def health(request):
        s = scheduler.snapshot()
        return JSONResponse({"status": "ok", "slots_idle": s["slots"] - s["active"], "slots_processing": s["active"],
                             "queue": s["queue"]})

    async def metrics(request):
        return PlainTextResponse(metrics_text(scheduler.snapshot()), media_type="text/plain; version=0.0.4")

    async def generate(request, kind: str):
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="body_too_large")
        body = parse_body(raw, kind)
        ids, max_tokens, params, stops, grammar = prepare(model, body, kind, context)
        wrap = None
        if grammar is not None:
            from .jsonmode import JsonConstraint

            vocabulary = await asyncio.get_running_loop().run_in_executor(None, json_vocabulary, model)
            wrap = lambda m: JsonConstraint(m, vocabulary, grammar)  # noqa: E731
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()

        def emit(item):  # from a slot's thread; the loop may be gone once the server stops
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:
                pass

        req = Request(ids, params, max_tokens, stops, emit, body.get("ignore_eos", False), wrap)
        try:
            scheduler.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        reply = Reply(kind, model_id, len(ids), req.stats, include_usage)
        if body.get("stream", False):
            return EventStream(reply, req, pieces)
        watcher = asyncio.ensure_future(cancel_on_disconnect(request.receive, req))
        try:
            text = []
            while (piece := await pieces.get()) is not None:  # a cancelled request still ends with None
                text.append(piece)
        except BaseException:  # the task itself cancelled (the server stopping): free the slot
            req.cancel()
            raise
        finally:
            watcher.cancel()
        if req.cancelled:
            return Response(status_code=499)  # nobody reads it: the client went away
        if req.error is not None:
            raise ApiError(500, f"generation failed: {type(req.error).__name__}: {req.error}", kind="server_error")
        return JSONResponse(reply.result(text))

    async def chat(request):
        return await generate(request, "chat.completion")

    async def completions(request):
        return await generate(request, "text_completion")

    async def not_found(request, exc):
        return error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              code="not_found" if exc.status_code == 404 else None))

    routes = [Route("/v1/models", guarded(models), methods=["GET"]),
              Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
              Route("/v1/completions", guarded(completions), methods=["POST"]),
              Route("/health", guarded(health, public=True), methods=["GET"]),
              Route("/metrics", guarded(metrics), methods=["GET"])]
    from starlette.exceptions import HTTPException

    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


async def cancel_on_disconnect(receive, req: Request) -> None:
    """Once the request's body is read, what the server receives next is the client's disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass
    req.cancel()


class EventStream:
    """Server-sent events of a streaming reply, ending `data: [DONE]`. It listens for the client's
    disconnect while it waits for pieces, so a client that goes away frees its slot at the next token."""

    def __init__(self, reply: Reply, req: Request, pieces: asyncio.Queue):
        self.reply, self.req, self.pieces = reply, req, pieces

    @staticmethod
    def event(obj) -> bytes:
        return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"

    async def events(self):
        for c in self.reply.opening():
            yield self.event(c)
        while (piece := await self.pieces.get()) is not None:
            yield self.event(self.reply.chunk(piece))
        if self.req.error is not None:
            e = ApiError(500, f"generation failed: {type(self.req.error).__name__}: {self.req.error}",
                         kind="server_error")
            yield self.event(e.body())
        else:
            for c in self.reply.closing():
                yield self.event(c)
        yield self.event(b"[DONE]")

    async def __call__(self, scope, receive, send):
        watcher = asyncio.ensure_future(cancel_on_disconnect(receive, self.req))
        finished = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
            async for chunk in self.events():
                if self.req.cancelled:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True
        except OSError:  # the client went away while we wrote to it
            pass
        finally:
            watcher.cancel()
            if not finished:
                self.req.cancel()


def metrics_text(s: dict) -> str:
    """llama.cpp server's /metrics in Prometheus text form, under lutengine: names."""
    rate = lambda n, t: n / t if t > 0 else 0.0  # noqa: E731
    rows = [
        ("prompt_tokens_total", "counter", "prompt tokens evaluated", s["prompt_tokens"]),
        ("tokens_predicted_total", "counter", "tokens generated", s["generated_tokens"]),
        ("prompt_tokens_seconds", "gauge", "prompt tokens per second of prefill",
         rate(s["prompt_tokens"], s["prompt_s"])),
        ("predicted_tokens_seconds", "gauge", "generated tokens per second of one stream (mean over requests)",
         rate(s["generated_tokens"], s["gen_s"])),
        ("decode_tokens_seconds", "gauge", "generated tokens per second of the decode thread's busy time, "
         "all streams together", rate(s["step_rows"], s["decode_busy_s"])),
        ("time_to_first_token_seconds", "gauge", "seconds from a request's arrival to its first text (mean)",
         rate(s["ttft_s"], s["first_tokens"])),
        ("decode_steps_total", "counter", "batched decode steps", s["steps"]),
        ("decode_rows_per_step", "gauge", "sequences per decode step (mean)", rate(s["step_rows"], s["steps"])),
        ("requests_processing", "gauge", "requests in a slot", s["active"]),
        ("requests_deferred", "gauge", "requests waiting for a slot (queue depth)", s["queue"]),
        ("slots_total", "gauge", "slots (--parallel)", s["slots"]),
        ("requests_total", "counter", "requests accepted", s["requests"]),
        ("requests_rejected_total", "counter", "requests refused with 429 (queue full)", s["rejected"]),
        ("requests_cancelled_total", "counter", "requests whose client went away", s["cancelled"]),
        ("requests_failed_total", "counter", "requests that failed in generation", s["failed"]),
    ]
    out = []
    for name, kind, help_, value in rows:
        out += [f"# HELP lutengine:{name} {help_}", f"# TYPE lutengine:{name} {kind}",
                f"lutengine:{name} {value:.6g}" if isinstance(value, float) else f"lutengine:{name} {value}"]
    return "\n".join(out) + "\n"


def listen(host: str, port: int) -> socket.socket:
    """The bound socket (port 0: a free one), so the address printed is the one served."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def server(app, log_level: str = "warning"):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))


def run(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print(f"lutengine: error: serve needs Starlette and uvicorn: {INSTALL}", file=sys.stderr)
        return 2
    from . import memory
    from .load import load

    if args.parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
    est = memory.for_model(args.model, args.ctx, args.kv_type)
    if est is not None:  # before any weight is read; the model's own cache and one per slot
        est = dataclasses.replace(est, kv=est.kv * (args.parallel + 1))
        if not est.fits:
            raise memory.MemoryLimitError(f"{args.model or 'the default model'} with --parallel {args.parallel}: "
                                          f"{est.line()}; fewer slots, a smaller --ctx or --kv-type q8 need less")
    model = load(args.model, threads=args.threads, max_context=args.ctx, kv_type=args.kv_type, progress=True,
                 opened=est and est.qfile)
    sock = listen(args.host, args.port)
    scheduler = Scheduler(model, args.parallel, args.queue)
    host, port = sock.getsockname()[:2]
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lutengine: warning: serving on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    print(f"lutengine: serving {model.info['name']} on http://{host}:{port}/v1 ({args.parallel} slots, "
          f"context {model.max_context}{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)
    try:
        server(build_app(model, scheduler, args.api_key), args.log_level).run(sockets=[sock])
    finally:
        scheduler.close()
        sock.close()
    return 0
