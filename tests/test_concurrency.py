"""Eight Python threads at once on the C kernels (cffi lets go of the GIL in C, so the calls really
overlap) and on the Python API, on separate models and on one shared model: results equal the
sequential ones bit for bit."""
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

import lutkernels as lk
from conftest import random_layer
from engine import load
from lutkernels import trellis as fmt
from tiny_models import write_gguf

THREADS = 8


def together(work, n=THREADS, extra=()):
    """Runs work(i) for i < n in n threads released at once (plus the `extra` callables beside them,
    which run until the workers end and get an Event to watch); returns the workers' results and
    raises the first error any thread hit."""
    start, done = threading.Barrier(n + len(extra)), threading.Event()
    results, errors = [None] * n, []

    def worker(i):
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)

    def side(f):
        try:
            start.wait()
            f(done)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    sides = [threading.Thread(target=side, args=(f,), daemon=True) for f in extra]
    for t in threads + sides:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    for t in sides:
        t.join(60)
    assert not any(t.is_alive() for t in threads + sides), "a thread is stuck"
    if errors:
        raise errors[0]
    return results


def trellis_layer(rng, M, K, k):
    """Random stream bits: every path is a valid one (as tests/test_trellis.py)."""
    Mt, L = -(-M // 16), k + fmt.MEMORY
    bits = rng.integers(0, 2, (K, fmt.MEMORY + 16 * k * Mt))
    win = (bits[:, k * np.arange(M)[:, None] + np.arange(L)] << np.arange(L)).sum(-1).T
    return fmt.pack(win, (rng.random(M) * 0.01).astype(np.float32), k)


def layers(seed):
    """A LUT layer with offsets, one with 8-bit scales, a trellis layer: each kernel family."""
    rng = np.random.default_rng(seed)
    return [lk.layer(lk.pack(*random_layer(rng, 200, 512, 3, 128, True))),
            lk.layer(lk.pack(*random_layer(rng, 96, 256, 2, 64, True, scale8=True), scale8=True)),
            lk.layer(trellis_layer(rng, 80, 256, 3))]


def products(ls, xs):
    """Every layer times every x: gemv, gemm of 3 rows, and the exact tables of bit-plane layers."""
    out = []
    for L in ls:
        for x in xs:
            out.append(lk.gemv(L, x[0, :L.w.K]))
            out.append(lk.gemm(L, np.ascontiguousarray(x[:, :L.w.K])))
            if isinstance(L, lk.Layer):
                out.append(lk.gemv(L, x[0, :L.w.K], exact=True))
    return out


def inputs(seed):
    return [np.random.default_rng(seed).standard_normal((3, 512)).astype(np.float32) for _ in range(6)]


def assert_bit_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def resizing(done):
    """Beside the workers: changes the pool's size and reads the kernel state (results do not depend
    on the thread count: pool.c)."""
    n = 0
    while not done.is_set():
        lk.set_threads(1 + n % 4)
        assert 1 <= lk.get_threads() <= 4 and lk.get_isa() in lk.supported_isas()
        n += 1


@pytest.mark.parametrize("shared", [False, True], ids=["separate layers", "one shared layer"])
def test_kernels_from_eight_threads(shared, restore_kernel_state):
    lk.set_threads(3)
    own = [layers(0)] * THREADS if shared else [layers(i) for i in range(THREADS)]
    want = [products(own[i], inputs(100 + i)) for i in range(THREADS)]
    got = together(lambda i: [products(own[i], inputs(100 + i)) for _ in range(3)])
    for i in range(THREADS):
        for round_ in got[i]:
            assert_bit_equal(round_, want[i])
    got = together(lambda i: products(own[i], inputs(100 + i)), extra=[resizing])
    for i in range(THREADS):
        assert_bit_equal(got[i], want[i])


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(write_gguf(tmp_path_factory.mktemp("tiny") / "m.gguf", "llama", max_context=256))


PROMPTS = [f"the {w} of the north and the south" for w in ("weather", "theme", "heat", "rain", "tea", "art",
                                                            "earth", "other")]


def greedy(model, i):
    return model.generate(PROMPTS[i], 24, temperature=0, ignore_eos=True)


def chat(model, i):
    return model.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[i]}],
                      max_tokens=12, temperature=0)


def openai_chat(model, i):
    r = model.create_chat_completion([{"role": "user", "content": PROMPTS[i]}], max_tokens=12, temperature=0,
                                     ignore_eos=True)
    return r["choices"][0]["message"]["content"]


def sequential(path, f):
    """Each prompt on a fresh model, one after the other: the reference."""
    return [f(load(path), i) for i in range(THREADS)]


@pytest.mark.parametrize("f", [greedy, chat, openai_chat])
def test_generation_from_eight_threads(tiny_path, f, restore_kernel_state):
    lk.set_threads(2)
    want = sequential(tiny_path, f)
    assert len(set(want)) > 1  # the prompts lead to different continuations
    models = [load(tiny_path) for _ in range(THREADS)]
    assert together(lambda i: [f(models[i], i) for _ in range(2)]) == [[w, w] for w in want]
    shared = load(tiny_path)  # one KV cache: its lock makes the threads take turns
    assert together(lambda i: [f(shared, i) for _ in range(2)]) == [[w, w] for w in want]


def test_streams_on_a_shared_model_take_turns(tiny_path):
    """A thread holding a stream holds the model: another thread's call waits for it, and both get
    what they would alone."""
    shared = load(tiny_path)
    want = sequential(tiny_path, greedy)[:2]
    pieces = shared.stream(PROMPTS[0], 24, temperature=0, ignore_eos=True)
    first = next(pieces)
    other = threading.Thread(target=lambda: result.append(greedy(shared, 1)), daemon=True)
    result = []
    other.start()
    other.join(0.5)
    assert other.is_alive() and not result  # waiting for the stream
    assert first + "".join(pieces) == want[0]
    other.join(60)
    assert result == [want[1]]


def test_a_call_inside_the_same_threads_stream_is_refused(tiny_path):
    """The model's lock is not re-entrant: a second call while this thread's own stream is open
    would wait for itself forever. It is refused by name, and the stream goes on unharmed."""
    model = load(tiny_path)
    want = sequential(tiny_path, greedy)[0]

    def nested(i):
        pieces = model.stream(PROMPTS[0], 24, temperature=0, ignore_eos=True)
        first = next(pieces)
        for call in (greedy, chat, openai_chat):
            with pytest.raises(RuntimeError, match="this thread's own stream"):
                call(model, 1)
        return first + "".join(pieces), greedy(model, 0)  # usable again once the stream ended

    # in a thread of its own: without the refusal this would hang rather than fail
    assert together(nested, n=1) == [(want, want)]


def test_one_template_renders_in_eight_threads(tiny_path):
    """create_chat_completion renders outside the model's lock, on one template the model keeps."""
    shared = load(tiny_path)
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    want = [shared.chat_ids(m) for m in messages]
    assert together(lambda i: [shared.chat_ids(messages[i]) for _ in range(20)]) == [[w] * 20 for w in want]


ROOT = Path(__file__).resolve().parent.parent


def tsan_build(tmp_path, core: dict[str, Path]):
    """tests/tsan_kernels.c and the C core under ThreadSanitizer; None where this compiler has none."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    if subprocess.run([cc, "-fsanitize=thread", str(probe), "-o", str(tmp_path / "probe")],
                      capture_output=True).returncode:
        return None
    exe = tmp_path / "tsan_kernels"
    subprocess.run([cc, "-std=c11", "-O1", "-g", "-fsanitize=thread", "-pthread", "-DTABLE_CLONES=",
                    f"-I{ROOT / 'c'}", str(ROOT / "tests" / "tsan_kernels.c"), *map(str, core.values()),
                    "-o", str(exe), "-lm"], check=True, capture_output=True)
    return exe


def core_sources() -> dict[str, Path]:
    names = ["lut.c", "pool.c", "kernel_scalar.c", "trellis.c"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        names += ["kernel_avx2.c", "kernel_avx512.c"]
    elif platform.machine().lower() in ("aarch64", "arm64"):
        names += ["kernel_neon.c"]
    return {n: ROOT / "c" / n for n in names}


@pytest.mark.slow
def test_c_core_has_no_data_race(tmp_path):
    """Matmuls from several threads while another resizes the pool and switches the ISA, under
    ThreadSanitizer (it found lut_threads reading the pool's size while it was resized, and the
    ISA read outside the call lock by the trellis path choice)."""
    exe = tsan_build(tmp_path, core_sources())
    if exe is None:
        pytest.skip("no ThreadSanitizer with this compiler")
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert "ThreadSanitizer" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 0 and r.stdout.strip() == "done", (r.returncode, r.stderr[-2000:])
