"""`lutengine serve` driven by the real openai client over loopback, and the Python API's OpenAI dicts.

The reference for every served text is the in-process Model (engine/generate.py's
Session on the single-token decoder), a separate path from the server's batched
step: a served reply must equal it token for token, alone or beside others.
"""
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from engine.load import load
from engine.generate import ContextError
from tiny_models import write_gguf

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from engine.batch import Scheduler  # noqa: E402
from engine.serve import build_app, listen, server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTX = 4096
DEADLINE_S = 20  # any wait in these tests gives up after this


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("serve") / "tiny.gguf", "llama", max_context=CTX)


@pytest.fixture(scope="module")
def model(gguf):
    return load(str(gguf))


@contextmanager
def live(model, parallel=4, queue=8, api_key=None):
    """A server on a free loopback port in a thread; yields (port, scheduler)."""
    scheduler = Scheduler(model, parallel, queue)
    sock = listen("127.0.0.1", 0)
    srv = server(build_app(model, scheduler, api_key, model_id="tiny"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not srv.started:
        assert thread.is_alive() and time.monotonic() - t0 < DEADLINE_S, "the server did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1], scheduler
    finally:
        srv.should_exit = True
        thread.join(DEADLINE_S)
        scheduler.close()
        sock.close()


def client(port, key="none"):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=DEADLINE_S)


def raw(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        conn.request(method, path, body, headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        conn.close()


def metrics(port) -> dict:
    status, _, text = raw(port, "GET", "/metrics")
    assert status == 200
    return {k: float(v) for k, v in re.findall(r"^lutengine:(\w+) (\S+)$", text, re.M)}


def wait_for(cond, what):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < DEADLINE_S, f"timed out waiting for {what}"
        time.sleep(0.01)


def alone(model, prompt, n, **sampling):
    """The reference text: the in-process decoder from an empty cache (a reused prefix was computed
    in another batch of prompt rows, which can tip a sampled token)."""
    model.reset()
    return model.generate(prompt, n, ignore_eos=True, **sampling)


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the weather in the north"}]


def test_python_api_returns_openai_dicts(model):
    want = alone(model, "the weather", 12, temperature=0)
    model.reset()
    r = model.create_completion("the weather", max_tokens=12, temperature=0, ignore_eos=True)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and isinstance(r["created"], int)
    assert r["choices"] == [{"index": 0, "text": want, "logprobs": None, "finish_reason": "length"}]
    n = len(model.tokenize("the weather"))
    assert r["usage"] == {"prompt_tokens": n, "completion_tokens": 12, "total_tokens": n + 12}

    chunks = list(model.create_chat_completion(CHAT, max_tokens=12, temperature=0, stream=True, ignore_eos=True))
    whole = model.create_chat_completion(CHAT, max_tokens=12, temperature=0, ignore_eos=True)
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["prompt_tokens"] == len(model.chat_ids(CHAT))

    stop = want[3:5]
    r = model.create_completion("the weather", max_tokens=12, temperature=0, stop=stop, ignore_eos=True)
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == want[:want.index(stop)]
    with pytest.raises(ContextError, match="exceeds the context"):
        model.create_completion("the weather", max_tokens=CTX)


def test_chat_completions_and_models_over_http(model):
    model.reset()
    want = model.create_chat_completion(CHAT, max_tokens=16, temperature=0, ignore_eos=True)
    with live(model) as (port, _):
        c = client(port)
        assert [m.id for m in c.models.list()] == ["tiny"]
        r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == want["choices"][0]["message"]["content"]
        assert r.choices[0].finish_reason == "length" and r.usage.model_dump() == {**want["usage"],
            "completion_tokens_details": None, "prompt_tokens_details": None}
        stream = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            want["choices"][0]["message"]["content"]
        assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 16

        text = alone(model, "the weather", 10, temperature=0)
        r = c.completions.create(model="tiny", prompt="the weather", max_tokens=10, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.choices[0].text == text and r.usage.completion_tokens == 10
        pieces = [ch.choices[0].text for ch in c.completions.create(
            model="tiny", prompt="the weather", max_tokens=10, temperature=0, stream=True,
            extra_body={"ignore_eos": True})]
        assert "".join(pieces) == text
        status, _, body = raw(port, "GET", "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"


def test_eight_concurrent_clients_each_get_their_text_alone(model):
    prompts = [f"the {w} of the north" for w in ("weather", "heat", "rain", "snow", "wind", "sea", "hills", "roads")]
    greedy = dict(temperature=0)
    seeded = [dict(temperature=1.0, top_p=1.0, seed=i, top_k=0, min_p=0) for i in range(8)]
    by_itself = [alone(model, p, 48, **greedy) for p in prompts]
    by_itself_seeded = [alone(model, p, 48, **s) for p, s in zip(prompts, seeded)]
    assert len(set(by_itself_seeded)) == 8  # rows that got swapped or mixed would show

    with live(model, parallel=4, queue=4) as (port, scheduler):
        c = client(port)
        got = {}

        def ask(i):  # each of 8 clients: a greedy request, then a seeded one
            for key, sampling in (("g", greedy), ("s", seeded[i])):
                extra = {k: sampling[k] for k in ("top_k", "min_p") if k in sampling}
                r = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=48,
                                         extra_body={"ignore_eos": True, **extra},
                                         **{k: v for k, v in sampling.items() if k not in extra})
                got[key, i] = r.choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S)
        assert [got.get(("g", i)) for i in range(8)] == by_itself
        assert [got.get(("s", i)) for i in range(8)] == by_itself_seeded
        m = metrics(port)
        assert m["tokens_predicted_total"] == 16 * 48 and m["requests_processing"] == 0
        assert m["decode_rows_per_step"] > 1.5  # the sequences advanced together, not one by one


def test_disconnect_frees_the_slot_and_a_full_queue_is_429(model):
    with live(model, parallel=1, queue=1) as (port, _):
        c = client(port)
        long = c.completions.create(model="tiny", prompt="the", max_tokens=CTX - 8, stream=True,
                                    extra_body={"ignore_eos": True})
        chunks = iter(long)
        next(chunks)  # the only slot is busy for thousands of tokens
        queued = {}
        waiter = threading.Thread(target=lambda: queued.update(r=c.completions.create(
            model="tiny", prompt="the weather", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})))
        waiter.start()
        wait_for(lambda: metrics(port)["requests_deferred"] == 1, "the second request to queue")
        status, headers, body = raw(port, "POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}),
                                    {"content-type": "application/json"})
        assert status == 429 and headers.get("retry-after") == "1"
        assert json.loads(body)["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="tiny", prompt="x", max_tokens=2)

        long.response.close()  # the client goes away mid-stream
        waiter.join(DEADLINE_S)
        assert queued["r"].choices[0].text == alone(model, "the weather", 6, temperature=0)
        m = metrics(port)
        assert m["requests_cancelled_total"] == 1 and m["requests_rejected_total"] == 2
        assert m["tokens_predicted_total"] < CTX // 2  # the long request stopped early
        assert m["requests_processing"] == 0 and m["requests_deferred"] == 0

        # a client that goes away before a non-streamed answer frees the slot as well
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "the", "max_tokens": CTX - 8,
                                                            "ignore_eos": True}))
        wait_for(lambda: metrics(port)["requests_processing"] == 1, "the request to start")
        conn.close()
        wait_for(lambda: metrics(port)["requests_cancelled_total"] == 2, "the request to be cancelled")
        m = metrics(port)
        assert m["requests_processing"] == 0 and m["tokens_predicted_total"] < CTX


def test_bad_requests_get_openai_errors_and_the_server_goes_on(model):
    with live(model) as (port, _):
        c = client(port)
        status, _, body = raw(port, "POST", "/v1/chat/completions", b'{"messages": [', {})
        assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
        status, _, body = raw(port, "POST", "/v1/completions", b'[1, 2]', {})
        assert status == 400
        cases = [({"extra_body": {"frobnicate": 1}}, "frobnicate"), ({"temperature": "hot"}, "temperature"),
                 ({"max_tokens": 2.5}, "max_tokens"), ({"stop": 7}, "stop"), ({"n": 2}, "n"),
                 ({"top_p": 0.0}, "top_p")]
        for kwargs, param in cases:
            with pytest.raises(openai.UnprocessableEntityError) as e:
                c.completions.create(model="tiny", prompt="the", **kwargs)
            assert e.value.body["param"] == param and set(e.value.body) == {"message", "type", "param", "code"}
        with pytest.raises(openai.UnprocessableEntityError) as e:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": 5}])
        assert e.value.body["param"] == "messages"
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="the weather", max_tokens=CTX)
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the " * CTX}])
        status, _, body = raw(port, "GET", "/v1/nothing")
        assert status == 404 and "error" in json.loads(body)
        r = c.completions.create(model="tiny", prompt="the", max_tokens=3, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3


def test_random_request_bodies_never_get_a_server_error(model):
    import random

    rng = random.Random(3)
    values = [None, True, 0, -1, 2 ** 70, 0.5, float("inf"), "", "x", [], ["a", 1], {}, {"role": "user"},
              [{"role": "user", "content": "hi"}], [{"role": 1, "content": "x"}], {"type": "json_object"},
              {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": 1}}}}]
    fields = ["messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "n",
              "response_format", "top_k", "min_p", "repeat_penalty", "stream_options", "bogus"]
    with live(model) as (port, _):
        for i in range(80):
            if rng.random() < 0.7:  # a good request with one field changed, so each check gets reached
                body = {"messages": [{"role": "user", "content": "hi"}], "prompt": "the", "max_tokens": 2,
                        rng.choice(fields): rng.choice(values)}
            else:
                body = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, 5))}
            if body.get("max_tokens") is None:  # null means up to the context: thousands of tokens
                body["max_tokens"] = 2
            path = "/v1/chat/completions" if "messages" in body and rng.random() < 0.5 else "/v1/completions"
            body.pop("prompt" if path == "/v1/chat/completions" else "messages", None)
            status, _, text = raw(port, "POST", path, json.dumps(body))
            assert status in (200, 400, 413, 422), (status, body, text)
            if status != 200:
                err = json.loads(text)["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"], (body, err)
        r = client(port).completions.create(model="tiny", prompt="the", max_tokens=2, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 2


def test_api_key_is_required_when_set(model):
    with live(model, api_key="s3cret") as (port, _):
        for key in ("none", "s3cret-not"):
            with pytest.raises(openai.AuthenticationError):
                client(port, key).models.list()
        status, _, body = raw(port, "GET", "/v1/models")
        assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
        assert raw(port, "GET", "/health")[0] == 200
        assert [m.id for m in client(port, "s3cret").models.list()] == ["tiny"]


def test_serve_command_starts_on_loopback_with_a_key(gguf):
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "-m", str(gguf), "--port", "0",
                             "--parallel", "2", "--ctx", "256", "--api-key", "k"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        t0 = time.monotonic()
        while port is None and time.monotonic() - t0 < DEADLINE_S:
            line = proc.stderr.readline()
            assert line, "serve exited before listening"
            if m := re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/v1 \(2 slots, context 256", line):
                port = int(m.group(1))
        assert port is not None
        r = client(port, "k").chat.completions.create(model="x", messages=CHAT, max_tokens=4,
                                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4
    finally:
        proc.terminate()
        proc.wait(DEADLINE_S)


def test_serve_refuses_slots_that_will_not_fit(gguf):
    proc = subprocess.run([sys.executable, "-m", "engine", "serve", "-m", str(gguf), "--parallel", "64"], cwd=ROOT,
                          capture_output=True, text=True, timeout=DEADLINE_S,
                          env={**os.environ, "LUTENGINE_MEMORY_LIMIT_MB": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--parallel 64" in lines[0] and "will not fit" in lines[0]


def test_serve_without_the_extra_says_how_to_install():
    code = ("import sys; sys.modules['starlette'] = None; from engine.cli import main; "
            "sys.exit(main(['serve']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=DEADLINE_S)
    assert proc.returncode == 2 and "pip install 'lutengine[serve]'" in proc.stderr


def _random_json(rng, depth=0) -> str:
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice(["1", "-0.5e+3", '"a\\"b\\u00e9"', "true", "null", "false", "0", '"x y"', "12.25E-1", "[]"])
    if r < 0.65:
        keys = rng.sample("abcd", rng.randint(0, 3))
        return "{" + ",".join(f' "{k}" :{_random_json(rng, depth + 1)}' for k in keys) + "}"
    return "[" + ", ".join(_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"


def test_json_automaton_agrees_with_json_loads():
    import random

    from engine.jsonmode import JsonObject, walk

    rng = random.Random(0)
    alphabet = b'{}[]:,"\\ \n-0123456789.eE+tfnrulsa\x01'
    for _ in range(600):
        doc = '{"k": ' + _random_json(rng) + "}"
        end = walk(JsonObject, JsonObject.initial, doc.encode())
        assert end is not None and JsonObject.done(end), doc
        broken = bytearray(doc.encode())
        broken[rng.randrange(len(broken))] = rng.choice(alphabet)
        try:
            valid = isinstance(json.loads(broken.decode()), dict)
        except ValueError:
            valid = False
        end = walk(JsonObject, JsonObject.initial, bytes(broken))
        assert (end is not None and JsonObject.done(end)) == valid, broken


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "score": {"type": "number"},
    "ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["red", "green", 7]}},
    "pet": {"type": "object", "properties": {"kind": {"const": "cat"}, "none": {"type": "null"}}}},
    "required": ["name", "age"], "additionalProperties": False}


def conforms(v, schema) -> bool:
    """The test's own check of SCHEMA's keywords (every property present, as the grammar writes them)."""
    if "enum" in schema or "const" in schema:
        return any(v == e and type(v) is type(e) for e in schema.get("enum", [schema.get("const")]))
    t = schema["type"]
    if t == "object":
        return isinstance(v, dict) and list(v) == list(schema["properties"]) and \
            all(conforms(v[k], sub) for k, sub in schema["properties"].items())
    if t == "array":
        return isinstance(v, list) and all(conforms(x, schema["items"]) for x in v)
    types = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "null": (type(None),)}
    return isinstance(v, types[t]) and (t in ("boolean", "null") or not isinstance(v, bool))


def _sample(rng, schema):
    if "enum" in schema or "const" in schema:
        return rng.choice(schema.get("enum", [schema.get("const")]))
    t = schema["type"]
    if t == "object":
        return {k: _sample(rng, sub) for k, sub in schema["properties"].items()}
    if t == "array":
        return [_sample(rng, schema["items"]) for _ in range(rng.randint(0, 3))]
    return {"string": lambda: rng.choice(["", "a b", 'q"\\\u00e9']), "integer": lambda: rng.randint(-50, 50),
            "number": lambda: rng.choice([0.5, -3, 1e-7, 12]), "boolean": lambda: rng.random() < 0.5,
            "null": lambda: None}[t]()


def test_json_schema_grammar_accepts_only_conforming_documents():
    import random

    from engine.jsonmode import JsonSchema, walk

    g = JsonSchema(SCHEMA)
    rng = random.Random(1)
    alphabet = b'{}[]:,"\\ -0123456789.eEtruefalsnbdgc7'
    for _ in range(400):
        doc = json.dumps(_sample(rng, SCHEMA), indent=rng.choice([None, 1]))
        end = walk(g, g.initial, doc.encode())
        assert end is not None and g.done(end), doc
        broken = bytearray(doc.encode())
        for _ in range(rng.randint(1, 2)):
            broken[rng.randrange(len(broken))] = rng.choice(alphabet)
        end = walk(g, g.initial, bytes(broken))
        if end is not None and g.done(end):
            assert conforms(json.loads(broken.decode()), SCHEMA), broken
    for bad, word in [({"type": "string"}, "root"), ({"type": "object", "properties": {"a": {"type": "string",
                      "pattern": "x"}}}, "pattern"), ({"type": "object", "properties": {"a": {"anyOf": []}}}, "anyOf")]:
        with pytest.raises(ValueError, match=word):
            JsonSchema(bad)


def test_json_masks_match_token_by_token_checks(model):
    from engine.api import json_vocabulary
    from engine.jsonmode import JsonObject, JsonSchema, walk

    v = json_vocabulary(model)
    cases = [(JsonObject, t) for t in ["", "{", '{"a', '{"a\\', '{"a": -', '{"a": 1', '{"a": [tr',
                                       '{"a": [1, {"b": 2.5e', '{"a": "x"}']]
    g = JsonSchema(SCHEMA)
    cases += [(g, t) for t in ["", '{"na', '{"name": "x', '{"name": "x", "age": 1', '{"name": "", "age": 3, "score": -',
                               '{"name": "", "age": 3, "score": 1, "ok": f', '{"name": "", "age": 3, "score": 1, '
                               '"ok": true, "tags": [7, "re']]
    for grammar, text in cases:
        state = walk(grammar, grammar.initial, text.encode())
        assert state is not None, text
        want = [i for i in range(v.vocab) if v.pieces[i] and walk(grammar, state, v.pieces[i]) is not None]
        if text.endswith("}"):
            want = v.eos
        assert sorted(map(int, v.mask(grammar, state).nonzero()[0])) == sorted(want), text


def test_json_object_mode_over_http_and_in_process(model):
    fmt = {"type": "json_object"}
    with live(model) as (port, _):
        c = client(port)
        closed = 0
        for seed in range(6):
            r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=200, temperature=1.0, seed=seed,
                                          response_format=fmt)
            model.reset()
            want = model.create_chat_completion(CHAT, max_tokens=200, temperature=1.0, seed=seed, response_format=fmt)
            text = r.choices[0].message.content
            assert text == want["choices"][0]["message"]["content"]
            if r.choices[0].finish_reason == "stop":
                assert isinstance(json.loads(text), dict)
                closed += 1
        assert closed >= 2
        schema = {"type": "json_schema", "json_schema": {"name": "t", "strict": True, "schema": {
            "type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"},
                                             "tags": {"type": "array", "items": {"enum": ["red", "green"]}}}}}}
        closed = 0
        for seed in range(4):
            r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=100, temperature=1.0, seed=seed,
                                          response_format=schema)
            if r.choices[0].finish_reason == "stop":
                assert conforms(json.loads(r.choices[0].message.content), schema["json_schema"]["schema"])
                closed += 1
        assert closed >= 2
        for bad in ({"type": "yaml"}, {"type": "json_schema", "json_schema": {"schema": {"type": "string"}}}):
            with pytest.raises(openai.UnprocessableEntityError) as e:
                c.chat.completions.create(model="tiny", messages=CHAT, response_format=bad)
            assert e.value.body["param"] == "response_format"


@pytest.mark.slow
def test_catalog_model_served_greedy_and_as_json():
    from models import catalog

    m = load(catalog.DEFAULT, max_context=1024)
    questions = ["What is the capital of Japan?", "Name a color of the sky."]
    alone_texts = []
    for q in questions:
        m.reset()
        alone_texts.append(m.create_chat_completion([{"role": "user", "content": q}], max_tokens=24,
                                                    temperature=0)["choices"][0]["message"]["content"])
    assert "Tokyo" in alone_texts[0]
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    with live(m, parallel=2, queue=2) as (port, _):
        c = client(port)
        got = [None, None]

        def ask(i):
            got[i] = c.chat.completions.create(model="x", messages=[{"role": "user", "content": questions[i]}],
                                               max_tokens=24, temperature=0).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == alone_texts
        r = c.chat.completions.create(model="x", max_tokens=64, temperature=0, messages=[
            {"role": "user", "content": "Give the capital of Japan and its country as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        assert conforms(json.loads(r.choices[0].message.content), schema)
