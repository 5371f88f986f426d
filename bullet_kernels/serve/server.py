"""The HTTP server: SGLang-native ``/generate`` and OpenAI ``/v1/completions`` and
``/v1/chat/completions``, streaming as server-sent events, ``/health`` and Prometheus ``/metrics``.

Built on aiohttp (server and the load generator's client alike; it is also on our offline GPU
image, unlike other ASGI stacks) and prometheus_client. Errors are JSON ``{"error": {"message",
"type", "code"}}``: 400 for a malformed body, an unknown field or a request that can never be
served (longer than the context or the KV cache), 429 when the queue is full, 503 while shutting
down. A client that disconnects is aborted and its KV pages are freed at the next step (or, for
a prompt whose bullet prefill is in flight, when that prefill lands).

Streaming formats: ``/generate`` sends ``data: {"text": <all text so far>, "output_ids": <ids of
this chunk>, "meta_info": {"id", "prompt_tokens", "completion_tokens", "finish_reason"}}`` per
step then ``data: [DONE]`` (SGLang's shape, so its ``bench_serving`` and ours read both); OpenAI
routes send their ``*.chunk`` objects with text deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from .engine import LoopSink, ServingEngine, ShuttingDown
from .request import BadRequest, Request, SamplingParams
from .scheduler import QueueFull
from .tokenizer import TextTokenizer

SAMPLING_FIELDS = {"max_new_tokens", "temperature", "top_p", "stop_token_ids", "ignore_eos", "seed"}
# SGLang /generate fields we do not implement, accepted at the value that turns them off: SGLang's
# own benchmark client sends these on every request (0.5.15); any other value is refused.
GENERATE_OFF_FIELDS = {"lora_path": None, "return_logprob": False, "return_routed_experts": False,
                       "logprob_start_len": -1, "top_logprobs_num": 0, "token_ids_logprob": None}
GENERATE_FIELDS = {"text", "input_ids", "sampling_params", "stream", "rid", *GENERATE_OFF_FIELDS}
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stream", "seed", "ignore_eos",
                     "stop_token_ids", "n", "user"}
CHAT_FIELDS = (COMPLETION_FIELDS - {"prompt"}) | {"messages"}


def error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


async def read_json(request: web.Request, allowed: set[str]) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    return body


def sampling(fields: dict) -> SamplingParams:
    unknown = sorted(set(fields) - SAMPLING_FIELDS)
    if unknown:
        raise BadRequest(f"unknown sampling_params {unknown}; allowed: {sorted(SAMPLING_FIELDS)}")
    try:
        return SamplingParams(**fields)
    except TypeError as exc:
        raise BadRequest(str(exc)) from None


def stream_flag(body: dict) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {json.dumps(stream)}")
    return stream


class Metrics:
    def __init__(self, app_state: "Service"):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("bullet_requests", "requests answered, by HTTP status", ["status"], registry=r)
        self.tokens = Counter("bullet_generated_tokens", "output tokens generated", registry=r)
        self.free_pages = Gauge("bullet_kv_free_pages", "free KV-cache pages", registry=r)
        self.queue = Gauge("bullet_queue_depth", "requests waiting for admission", registry=r)
        self.running = Gauge("bullet_running_requests", "requests in the decode batch", registry=r)
        self.lane_sms = Gauge("bullet_lane_sms", "SMs of each lane at the last step (0: whole GPU)", ["lane"], registry=r)
        self.preemptions = Gauge("bullet_preemptions", "requests preempted for KV pages so far", registry=r)
        self.step = Histogram("bullet_step_seconds", "wall time of one engine step", registry=r,
                              buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self._state = app_state

    def render(self) -> bytes:
        s = self._state.engine.scheduler
        self.free_pages.set(s.runner.kv_cache.num_free_pages)
        self.queue.set(self._state.engine.queue_depth)
        self.running.set(len(s.running))
        self.preemptions.set(s.counters["preemptions"])
        for lane, sms in s.last_split.items():
            self.lane_sms.labels(lane).set(sms)
        return generate_latest(self.registry)


class Service:
    """The routes, over one engine and tokenizer."""

    def __init__(self, engine: ServingEngine, tokenizer: TextTokenizer, model: str, mode: str):
        self.engine, self.tokenizer, self.model, self.mode = engine, tokenizer, model, mode
        self.metrics = Metrics(self)
        engine.observe_step = self.metrics.step.observe  # on the loop thread; prometheus_client is thread-safe

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.add_routes([
            web.get("/health", self.health), web.get("/metrics", self.prometheus), web.get("/v1/models", self.models),
            web.post("/generate", self.generate), web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat),
        ])
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, app) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)

    async def health(self, request: web.Request) -> web.Response:
        s = self.engine.scheduler
        if not self.engine.alive:
            return error(503, "the serving loop has stopped", "unavailable")
        return web.json_response({"status": "ok", "model": self.model, "mode": self.mode, "tokenizer": self.tokenizer.kind,
                                  "kv_free_pages": s.runner.kv_cache.num_free_pages, "queue_depth": self.engine.queue_depth,
                                  "running": len(s.running)})

    async def models(self, request: web.Request) -> web.Response:
        """OpenAI's model list, of the one model served: OpenAI clients and SGLang's benchmark
        client ask it before they send (the latter waits until it answers)."""
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "bullet_kernels"}]})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- the three generation routes share one path ----------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        async def parse():
            body = await read_json(request, GENERATE_FIELDS)
            for field, off in GENERATE_OFF_FIELDS.items():
                if field in body and (body[field] != off or type(body[field]) is not type(off)):  # 0 is not false
                    raise BadRequest(f"{field}={body[field]!r} is not supported by this server; "
                                     f"leave it out or give {json.dumps(off)}")
            if ("text" in body) == ("input_ids" in body):
                raise BadRequest("give exactly one of text and input_ids")
            ids = body["input_ids"] if "input_ids" in body else self.tokenizer.encode(body["text"])
            if not isinstance(ids, list):
                raise BadRequest("input_ids must be a list of token ids")
            params = body.get("sampling_params", {})
            if not isinstance(params, dict):
                raise BadRequest("sampling_params must be an object")
            return ids, sampling(params), stream_flag(body), str(body.get("rid") or uuid.uuid4().hex)

        def chunk(req, ev, text):
            return {"text": text, "output_ids": ev.new_tokens, "meta_info": self._meta(req, ev.finished, ev.num_output)}

        def final(req, text):
            return {"text": text, "output_ids": req.output, "meta_info": self._meta(req, True)}

        return await self._serve(request, parse, chunk, final)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=True)

    async def _openai(self, request: web.Request, chat: bool) -> web.StreamResponse:
        created, kind = int(time.time()), "chat.completion" if chat else "text_completion"

        async def parse():
            body = await read_json(request, CHAT_FIELDS if chat else COMPLETION_FIELDS)
            if body.get("n", 1) != 1:
                raise BadRequest("only n=1 is supported")
            if chat:
                ids = self.tokenizer.encode(self.tokenizer.chat_prompt(body.get("messages")))
            else:
                prompt = body.get("prompt")
                ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt) if isinstance(prompt, str) else None
                if ids is None:
                    raise BadRequest("prompt must be a string or a list of token ids")
            fields = {k: body[k] for k in ("temperature", "top_p", "seed", "ignore_eos", "stop_token_ids") if k in body}
            fields["max_new_tokens"] = body.get("max_tokens", 16)
            return ids, sampling(fields), stream_flag(body), f"cmpl-{uuid.uuid4().hex}"

        def choice(req, text, delta: bool, done: bool):
            reason = req.finish_reason if done else None
            if chat:
                key = "delta" if delta else "message"
                return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": reason}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        def head(req):
            return {"id": req.rid, "object": kind + (".chunk" if chat else ""), "created": created, "model": self.model}

        previous: dict[str, str] = {}

        def chunk(req, ev, text):
            done = ev.finished
            # A token can end inside a multi-byte character: its text ends in U+FFFD until the
            # next token completes it. Send only the settled part; the end sends the rest.
            settled = text if done else text.rstrip("\ufffd")
            sent = previous.get(req.rid, "")
            previous[req.rid] = settled
            return {**head(req), "choices": [choice(req, settled[len(sent):], True, done)]}

        def final(req, text):
            usage = {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.output),
                     "total_tokens": len(req.prompt) + len(req.output)}
            return {**head(req), "object": kind, "choices": [choice(req, text, False, True)], "usage": usage}

        return await self._serve(request, parse, chunk, final)

    async def _serve(self, request: web.Request, parse, chunk, final) -> web.StreamResponse:
        try:
            ids, params, stream, rid = await parse()
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            req = Request(rid, list(ids), params)
            self.engine.submit(req, LoopSink(loop, queue))
        except BadRequest as exc:
            return self._count(error(400, str(exc)))
        except QueueFull as exc:
            return self._count(error(429, str(exc), "overloaded"))
        except ShuttingDown as exc:
            return self._count(error(503, str(exc), "unavailable"))
        try:
            if stream:
                return await self._stream(request, req, queue, chunk)
            while not (await queue.get()).finished:
                pass
            if req.finish_reason and req.finish_reason.startswith("error"):
                return self._count(error(500, req.finish_reason, "server_error"))
            if req.finish_reason == "shutdown":
                return self._count(error(503, "the server shut down before this request finished", "unavailable"))
            self.metrics.tokens.inc(len(req.output))
            return self._count(web.json_response(final(req, self.tokenizer.decode(req.output))))
        except (asyncio.CancelledError, ConnectionResetError):
            self.engine.abort(rid)  # the client went away: free its KV
            raise

    async def _stream(self, request, req, queue, chunk) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        while True:
            ev = await queue.get()
            # The request keeps growing on the loop thread: read it as of this event.
            text = self.tokenizer.decode(req.output[: ev.num_output])
            await resp.write(f"data: {json.dumps(chunk(req, ev, text))}\n\n".encode())
            self.metrics.tokens.inc(len(ev.new_tokens))
            if ev.finished:
                break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        self.metrics.requests.labels("200").inc()
        return resp

    def _count(self, resp: web.Response) -> web.Response:
        self.metrics.requests.labels(str(resp.status)).inc()
        return resp

    def _meta(self, req: Request, done: bool, num_output: int | None = None) -> dict:
        reason = {"type": req.finish_reason} if done and req.finish_reason else None
        tokens = len(req.output) if num_output is None else num_output
        return {"id": req.rid, "prompt_tokens": len(req.prompt), "completion_tokens": tokens,
                "finish_reason": reason, "e2e_latency": time.perf_counter() - req.arrival}


async def start(service: Service, host: str = "127.0.0.1", port: int = 30000) -> web.AppRunner:
    """Start serving on ``host:port`` (port 0: any free port; see ``runner.addresses``)."""
    runner = web.AppRunner(service.app(), handler_cancellation=True)  # a disconnect cancels its handler
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def run(service: Service, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then drain the engine (aiohttp's run_app handles the signals)."""
    with contextlib.suppress(KeyboardInterrupt):
        web.run_app(service.app(), host=host, port=port, handler_cancellation=True, print=None)
