"""The real server on loopback (aiohttp, tiny random Llama, eager on the CPU): both APIs with and
without streaming, the error codes, a client that disconnects, overload, a bounded load."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from bullet_kernels.serve import server
from bullet_kernels.serve.app import ServeOptions, build_service


def serve(opts=None, service=None):
    """Decorator-free helper: run ``body(session, base_url, service)`` against a fresh server."""

    def wrap(body):
        async def main():
            svc = service or build_service(opts or ServeOptions(model="tiny-llama3", mode="chunked", device="cpu",
                                                                kv_pages=128, max_context=256, chunk_size=32))
            runner = await server.start(svc, port=0)
            port = runner.addresses[0][1]
            try:
                async with aiohttp.ClientSession() as session:
                    return await body(session, f"http://127.0.0.1:{port}", svc)
            finally:
                await runner.cleanup()
                svc.engine.shutdown(drain=False, timeout_s=5)

        return asyncio.run(main())

    return wrap


async def sse(resp) -> list:
    """The JSON objects of an SSE response, and the [DONE] marker at the end."""
    out = []
    async for line in resp.content:
        line = line.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_generate_with_text_and_ids_streaming_and_not():
    @serve()
    async def run(s, url, svc):
        r = await s.post(f"{url}/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 7}})
        assert r.status == 200
        whole = await r.json()
        assert len(whole["output_ids"]) == 7 and whole["meta_info"]["completion_tokens"] == 7
        assert whole["meta_info"]["prompt_tokens"] == 5 and whole["meta_info"]["finish_reason"] == {"type": "length"}
        ids = svc.tokenizer.encode("hello")
        r = await s.post(f"{url}/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 7}, "stream": True})
        chunks = await sse(r)
        assert chunks[-1] == "[DONE]"
        streamed = [t for c in chunks[:-1] for t in c["output_ids"]]
        assert streamed == whole["output_ids"], "streaming must give the same greedy tokens"
        assert [c["meta_info"]["completion_tokens"] for c in chunks[:-1]] == list(range(1, 8))
        assert chunks[-2]["text"] == whole["text"]


def test_openai_completions_and_chat():
    @serve()
    async def run(s, url, svc):
        r = await s.post(f"{url}/generate", json={"text": "abc", "sampling_params": {"max_new_tokens": 2},
                                                 "lora_path": None, "return_logprob": False, "logprob_start_len": -1,
                                                 "return_routed_experts": False, "top_logprobs_num": 0,
                                                 "token_ids_logprob": None})  # SGLang's client sends these
        assert r.status == 200 and len((await r.json())["output_ids"]) == 2
        r = await s.get(f"{url}/v1/models")  # OpenAI clients and SGLang's benchmark ask it first
        assert r.status == 200 and [m["id"] for m in (await r.json())["data"]] == ["tiny-llama3"]
        r = await s.post(f"{url}/v1/completions", json={"model": "x", "prompt": "abc", "max_tokens": 6})
        body = await r.json()
        assert r.status == 200 and body["object"] == "text_completion"
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
        assert body["choices"][0]["finish_reason"] == "length"
        r = await s.post(f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 6, "stream": True})
        chunks = await sse(r)
        assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == body["choices"][0]["text"]
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        r = await s.post(f"{url}/v1/chat/completions", json={"messages": msgs, "max_tokens": 4})
        chat = await r.json()
        assert r.status == 200 and chat["object"] == "chat.completion"
        assert chat["choices"][0]["message"]["role"] == "assistant" and chat["usage"]["completion_tokens"] == 4
        assert chat["usage"]["prompt_tokens"] == len(svc.tokenizer.encode("system: be brief\nuser: hi\nassistant:"))
        r = await s.post(f"{url}/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "stream": True})
        chunks = await sse(r)
        assert chunks[0]["object"] == "chat.completion.chunk"
        assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1]) == chat["choices"][0]["message"]["content"]


@pytest.mark.parametrize("route,body,status,words", [
    ("/generate", b"{not json", 400, "not valid JSON"),
    ("/generate", json.dumps([1, 2]).encode(), 400, "JSON object"),
    ("/generate", json.dumps({"text": "a", "input_ids": [1]}).encode(), 400, "exactly one of text and input_ids"),
    ("/generate", json.dumps({"text": "a", "color": 1}).encode(), 400, "unknown field"),
    ("/generate", json.dumps({"text": "a", "return_logprob": True}).encode(), 400,
     "return_logprob=True is not supported by this server; leave it out or give false"),
    ("/generate", json.dumps({"text": "a", "logprob_start_len": 0}).encode(), 400, "give -1"),
    ("/generate", json.dumps({"text": "a", "return_logprob": 0}).encode(), 400, "give false"),
    ("/generate", json.dumps({"text": "a", "sampling_params": {"beam": 2}}).encode(), 400, "unknown sampling_params"),
    ("/generate", json.dumps({"text": "a", "sampling_params": {"max_new_tokens": 0}}).encode(), 400, "max_new_tokens"),
    ("/generate", json.dumps({"input_ids": [3] * 250, "sampling_params": {"max_new_tokens": 10}}).encode(), 400,
     "longer than the context of 256"),
    ("/generate", json.dumps({"input_ids": [999]}).encode(), 400, "outside the vocabulary"),
    ("/v1/completions", json.dumps({"prompt": 5}).encode(), 400, "prompt must be"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "messages[0]"),
    ("/v1/completions", json.dumps({"prompt": "a", "n": 2}).encode(), 400, "n=1"),
])
def test_bad_requests_get_4xx_with_the_reason(route, body, status, words):
    @serve()
    async def run(s, url, svc):
        r = await s.post(url + route, data=body, headers={"Content-Type": "application/json"})
        err = await r.json()
        assert r.status == status and words in err["error"]["message"], err
        assert svc.engine.queue_depth == 0


def test_a_client_that_disconnects_frees_its_kv():
    @serve()
    async def run(s, url, svc):
        kv = svc.engine.scheduler.runner.kv_cache
        r = await s.post(f"{url}/generate", json={"text": "stream me", "stream": True,
                                                   "sampling_params": {"max_new_tokens": 200}})
        await r.content.readline()  # the first chunk: the request is running
        r.close()  # the client goes away mid-stream
        for _ in range(500):
            if kv.num_free_pages == kv.num_pages and not svc.engine.scheduler.has_work():
                break
            await asyncio.sleep(0.01)
        assert kv.num_free_pages == kv.num_pages
        assert svc.engine.scheduler.counters["finished_abort"] == 1


def test_overload_answers_429_and_health_and_metrics_report():
    opts = ServeOptions(model="tiny-llama3", device="cpu", kv_pages=64, max_context=128, max_waiting=1, max_running=1,
                        max_prefill_tokens=96)

    @serve(opts)
    async def run(s, url, svc):
        async def one(i):
            r = await s.post(f"{url}/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 20}})
            return r.status, await r.json()

        assert svc.engine.scheduler.cfg.max_prefill_tokens == 96  # the option reached the scheduler
        answers = await asyncio.gather(*(one(i) for i in range(30)))  # one runs, one waits: the rest are refused
        refused = [body for status, body in answers if status == 429]
        served = [body for status, body in answers if status == 200]
        assert refused and served and len(refused) + len(served) == 30
        assert all("max_waiting 1" in body["error"]["message"] for body in refused)
        assert all(len(body["output_ids"]) == 20 for body in served)
        health = await (await s.get(f"{url}/health")).json()
        assert health["status"] == "ok" and health["queue_depth"] == 0 and "byte-level" in health["tokenizer"]
        text = await (await s.get(f"{url}/metrics")).text()
        for name in ("bullet_kv_free_pages 64.0", "bullet_queue_depth 0.0", 'bullet_requests_total{status="429"}',
                     "bullet_lane_sms", "bullet_step_seconds_count", "bullet_generated_tokens_total"):
            assert name in text, name


@pytest.mark.parametrize("mode,overlap,fuse", [("bullet", False, 0), ("chunked", False, 0), ("sequential", False, 0),
                                               ("bullet", True, 0), ("chunked", True, 0), ("bullet", False, 14),
                                               ("bullet", True, 14)])
def test_a_bounded_load_loses_no_request(mode, overlap, fuse):
    opts = ServeOptions(model="tiny-llama3", mode=mode, device="cpu", kv_pages=48, max_context=256, chunk_size=16,
                        max_running=16, overlap=overlap, fuse_prompt_tokens=fuse)

    @serve(opts)
    async def run(s, url, svc):
        async def one(i):
            n = 3 + i % 9
            r = await s.post(f"{url}/generate", json={"input_ids": [2 + (i * 7 + j) % 250 for j in range(5 + i % 23)],
                                                      "sampling_params": {"max_new_tokens": n}, "stream": i % 2 == 0})
            if i % 2:
                return len((await r.json())["output_ids"]) == n
            chunks = await sse(r)
            return chunks[-1] == "[DONE]" and chunks[-2]["meta_info"]["completion_tokens"] == n

        results = await asyncio.gather(*(one(i) for i in range(120)))
        assert all(results)
        kv = svc.engine.scheduler.runner.kv_cache
        assert kv.num_free_pages == kv.num_pages
        if fuse:  # prompts of 5-27 tokens: the short ones fused, the long ones on the prefill lane
            counters = svc.engine.scheduler.counters
            assert counters["mixed_steps"] > 0 and counters["prefills"] > 0, dict(counters)


def test_shutdown_drains_what_is_queued():
    svc = build_service(ServeOptions(model="tiny-llama3", device="cpu", kv_pages=64, max_context=128))
    from bullet_kernels.serve.request import Request, SamplingParams

    got = []
    for i in range(5):
        svc.engine.submit(Request(f"d{i}", [5, 6, 7], SamplingParams(max_new_tokens=4)), got.append)
    svc.engine.shutdown(drain=True, timeout_s=30)
    finished = [e.request for e in got if e.finished]
    assert len(finished) == 5 and all(r.finish_reason == "length" and len(r.output) == 4 for r in finished)


def test_bench_serving_against_our_server_writes_goodput(tmp_path, capsys):
    """`bullet bench-serving` end to end: our server in a thread, a short JSONL trace, two rates."""
    import threading

    from bullet_kernels import cli

    svc = build_service(ServeOptions(model="tiny-llama3", mode="bullet", device="cpu", kv_pages=128, max_context=256))
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder = {}

    def serve_forever():
        asyncio.set_event_loop(loop)
        holder["runner"] = loop.run_until_complete(server.start(svc, port=0))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve_forever, daemon=True)
    thread.start()
    assert started.wait(30)
    port = holder["runner"].addresses[0][1]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"prompt_len": 8 + i, "output_len": 4 + i % 3}) + "\n" for i in range(12)))
    try:
        code = cli.main(["bench-serving", "--url", f"http://127.0.0.1:{port}", "--model", "tiny-llama3",
                         "--trace-file", str(trace), "--num-prompts", "12", "--rates", "20", "inf",
                         "--tpot-slo-ms", "1000", "--label", "test", "--out", str(tmp_path)])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        svc.engine.shutdown(drain=False, timeout_s=5)
    assert code == 0
    (result,) = tmp_path.glob("serving-test-*.json")
    doc = json.loads(result.read_text())
    assert [r["rate"] for r in doc["rows"]] == [20.0, float("inf")]
    assert all(r["ok"] == 12 and r["failed"] == 0 for r in doc["rows"])
    assert doc["summary"]["goodput_tpot_1000ms"]["by_attainment"] is not None
    assert "goodput_tpot_1000ms" in capsys.readouterr().out


@pytest.mark.parametrize("argv,words", [
    (["serve", "--mode", "fast"], "invalid choice"),
    (["bench-serving", "--rates", "0"], "number > 0"),
    (["bench-serving", "--extend-to", "-3"], "number > 0"),
    (["bench-serving", "--trace", "lmsys"], "invalid choice"),
    (["bench-serving", "--trace-file", "/no/such/trace.jsonl"], "is not a file"),
    (["serve", "--split", "prefill=100"], "'prefill' and 'decode'"),
    (["serve", "--split", "prefill=100,decode=x"], "--split"),
    (["serve", "--fuse-prompt-tokens", "-5"], "tokens >= 0"),
    (["serve", "--prefill-ahead", "0"], "at least 1"),
    (["serve", "--backend", "mps"], "invalid choice: 'mps'"),
])
def test_serving_commands_refuse_bad_options(capsys, argv, words):
    from bullet_kernels import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and words in capsys.readouterr().err


def test_prefill_lane_options_are_refused_outside_bullet_mode(capsys):
    from bullet_kernels import cli

    assert cli.main(["serve", "--mode", "chunked", "--fuse-prompt-tokens", "256"]) == 2
    assert "apply to --mode bullet" in capsys.readouterr().err
    assert cli.main(["serve", "--mode", "sequential", "--prefill-ahead", "4"]) == 2
    assert "apply to --mode bullet" in capsys.readouterr().err
    assert cli.main(["serve", "--mode", "chunked", "--backend", "tpc"]) == 2
    assert "--backend apply to --mode bullet" in capsys.readouterr().err


def test_the_backend_option_reaches_the_engine_and_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("BULLET_BACKEND", "green")
    svc = build_service(ServeOptions(model="tiny-llama3", mode="bullet", device="cpu", kv_pages=64, max_context=128,
                                     backend="tpc"))
    try:
        assert svc.engine.scheduler.runner.cfg.backend == "tpc"
    finally:
        svc.engine.shutdown(drain=False, timeout_s=5)


def test_a_request_id_already_in_flight_is_refused():
    @serve()
    async def run(s, url, svc):
        body = {"rid": "same", "input_ids": [5, 6], "sampling_params": {"max_new_tokens": 60}, "stream": True}
        first = await s.post(f"{url}/generate", json=body)
        await first.content.readline()
        second = await s.post(f"{url}/generate", json=body)
        assert second.status == 400 and "already in flight" in (await second.json())["error"]["message"]
        chunks = await sse(first)
        assert chunks[-1] == "[DONE]" and chunks[-2]["meta_info"]["completion_tokens"] == 60


@pytest.mark.parametrize("field,value,words", [("stream", "false", "stream must be true or false"),
                                               ("ignore_eos", "false", "ignore_eos must be true or false"),
                                               ("seed", 1.5, "seed must be an integer")])
def test_flags_of_the_wrong_type_are_refused(field, value, words):
    @serve()
    async def run(s, url, svc):
        body = {"text": "a", "sampling_params": {}}
        if field == "stream":
            body["stream"] = value
        else:
            body["sampling_params"][field] = value
        r = await s.post(f"{url}/generate", json=body)
        assert r.status == 400 and words in (await r.json())["error"]["message"]


def test_a_sink_that_fails_does_not_stop_the_loop_and_shutdown_finishes_everyone():
    from bullet_kernels.serve.request import Request, SamplingParams

    svc = build_service(ServeOptions(model="tiny-llama3", device="cpu", kv_pages=64, max_context=128))

    def broken(ev):
        raise RuntimeError("client gone")

    got = []
    svc.engine.submit(Request("bad", [5, 6], SamplingParams(max_new_tokens=30)), broken)
    svc.engine.submit(Request("good", [7, 8], SamplingParams(max_new_tokens=30)), got.append)
    for _ in range(500):
        if got and got[-1].finished:
            break
        import time
        time.sleep(0.01)
    assert got[-1].finished and got[-1].num_output == 30 and svc.engine.alive
    held = []
    svc.engine.submit(Request("long", [9, 10], SamplingParams(max_new_tokens=100)), held.append)
    svc.engine.shutdown(drain=False, timeout_s=5)
    assert held and held[-1].finished and held[-1].request.finish_reason == "shutdown"
    assert not svc.engine.alive
    kv = svc.engine.scheduler.runner.kv_cache
    assert kv.num_free_pages == kv.num_pages


def test_one_step_wakes_each_event_loop_once():
    """A step's events for requests served by one asyncio loop reach it in one wake-up, in
    order; a closed loop drops only its own clients."""
    from bullet_kernels.serve.engine import LoopSink, ServingEngine
    from bullet_kernels.serve.request import Request, SamplingParams
    from bullet_kernels.serve.scheduler import Event

    class FakeLoop:
        def __init__(self, closed=False):
            self.calls, self.closed = [], closed

        def call_soon_threadsafe(self, fn, *args):
            if self.closed:
                raise RuntimeError("Event loop is closed")
            self.calls.append((fn, args))

    class FakeQueue(list):
        put_nowait = list.append

    svc = build_service(ServeOptions(model="tiny-llama3", device="cpu", kv_pages=64, max_context=128))
    svc.engine.shutdown(drain=False, timeout_s=5)  # the loop thread is not needed: _deliver is driven here
    engine: ServingEngine = svc.engine
    live, dead = FakeLoop(), FakeLoop(closed=True)
    queues = {rid: FakeQueue() for rid in ("a", "b", "c")}
    reqs = {rid: Request(rid, [5], SamplingParams(max_new_tokens=4)) for rid in queues}
    engine._sinks.update({"a": LoopSink(live, queues["a"]), "b": LoopSink(live, queues["b"]),
                          "c": LoopSink(dead, queues["c"])})
    step = [Event(reqs["a"], [1], False, 1), Event(reqs["b"], [2], False, 1), Event(reqs["c"], [3], False, 1),
            Event(reqs["a"], [4], True, 2)]
    engine._deliver(step)
    assert len(live.calls) == 1  # one wake-up for a and b
    fn, args = live.calls[0]
    fn(*args)  # what the event loop runs
    assert [ev.new_tokens for ev in queues["a"]] == [[1], [4]] and [ev.new_tokens for ev in queues["b"]] == [[2]]
    assert "c" not in engine._sinks and "a" not in engine._sinks and "b" in engine._sinks
