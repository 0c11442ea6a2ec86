"""llama.cpp as the peer in a speed comparison: a worker process that drives
llama-cpp-python, and the parent's handle on it (LlamaPeer).

llama-cpp-python usually lives in a venv of its own, so the worker is this file
run as a script by that venv's python: it imports only the standard library,
numpy, llama_cpp and engine/measure.py, never the engine package. It takes one
JSON command per line on stdin and answers one JSON line on stdout; everything
llama.cpp prints goes to stderr, which the parent sends to a log file. Parent and
worker then alternate run by run, so both engines see the same machine state.

Settings, per PROTOCOL.md: n_threads = n_threads_batch = T, n_batch = n_ubatch = 512,
and a context of the longest test.
"""
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

try:
    from .measure import Interference, peak_rss_bytes, reset_peak_rss, wait_quiet
except ImportError:  # the worker script, or loaded by path from a llama-only venv: no package around
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from measure import Interference, peak_rss_bytes, reset_peak_rss, wait_quiet

N_BATCH = 512
INSTALL_HINT = ("pip install llama-cpp-python (into this venv, or into another and pass its python with "
                "--llama-python PATH)")


@contextmanager
def capture_fd2(path):
    """Redirect the C-level stderr (fd 2) to a file for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def quantize(src, dst, log_path, nthread, ftype="Q4_0"):
    """Requantize src into dst with llama.cpp's quantizer; ftype is a LLAMA_FTYPE_MOSTLY_* suffix."""
    import llama_cpp

    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
    params.allow_requantize = True
    params.nthread = nthread
    t0 = time.time()
    tmp = dst + ".tmp"
    with capture_fd2(log_path):
        rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed rc={rc} (log {log_path})")
    os.replace(tmp, dst)
    return {"function": "llama_cpp.llama_model_quantize", "ftype": "LLAMA_FTYPE_MOSTLY_" + ftype,
            "allow_requantize": True, "nthread": nthread, "source": src, "seconds": round(time.time() - t0, 2),
            "log": log_path}


def model_info(path, n_ctx=N_BATCH):
    """Load once verbosely and keep llama.cpp's summary lines (tensor types, size, CPU repacking)."""
    from llama_cpp import Llama

    fd, log = tempfile.mkstemp(suffix=".log")
    os.close(fd)
    with capture_fd2(log):
        llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=N_BATCH, n_threads=1, verbose=True)
        del llm
    keep = []
    with open(log, errors="replace") as f:
        for line in f:
            if re.search(r"- type +\w+:|file type|file size|model params|CPU_REPACK|system_info", line):
                keep.append(line.rstrip())
    os.unlink(log)
    return {"path": path, "bytes": os.path.getsize(path), "llama_load_summary": keep}


class Runner:
    """One loaded GGUF: pp (a forward over a prompt) and tg (greedy decode steps), timed here."""

    def __init__(self, path, threads, n_ctx):
        import llama_cpp
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=N_BATCH, n_ubatch=N_BATCH, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self._ctx = self.llm._ctx.ctx
        self._get = llama_cpp.llama_get_logits_ith

    def _argmax_last(self):
        import numpy as np

        # llama_get_logits_ith synchronizes: the logits are ready when it returns
        return int(np.argmax(np.ctypeslib.as_array(self._get(self._ctx, -1), shape=(self.n_vocab,))))

    def pp(self, ids):
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        self._argmax_last()
        return time.perf_counter() - t0

    def tg(self, first, n):
        """Feed `first` (untimed), then n greedy steps; (seconds of the n steps, their tokens)."""
        self.llm.reset()
        self.llm.eval([first])
        tok = self._argmax_last()
        out = []
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([tok])
            tok = self._argmax_last()
            out.append(tok)
        return time.perf_counter() - t0, out


def timed(kind, n, ids, pp, tg):
    """One run of a test under Interference: {seconds, other_cores, steal_pct, tokens}. Both engines'
    runs go through here, so they are timed the same way."""
    toks = None
    with Interference() as it:
        if kind == "tg":
            dt, toks = tg(ids[0], n)
        else:
            dt = pp(ids[:n])
    return {"seconds": dt, "other_cores": it.other_cores, "steal_pct": it.steal_pct, "tokens": toks}


def worker():
    """The command loop (this file run as a script)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import llama_cpp

    runners = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd.get("op")
        try:
            if op == "hello":
                out = {"version": llama_cpp.__version__,
                       "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}
            elif op == "info":
                out = model_info(cmd["path"])
            elif op == "quantize":
                out = quantize(cmd["src"], cmd["dst"], cmd["dst"] + ".quantize.log", int(cmd["threads"]),
                               cmd.get("ftype", "Q4_0"))
            elif op == "load":
                runners.pop(cmd["key"], None)
                reset_peak_rss()
                runners[cmd["key"]] = Runner(cmd["path"], int(cmd["threads"]), int(cmd["n_ctx"]))
                out = {}
            elif op == "unload":
                runners.pop(cmd["key"], None)
                out = {}
            elif op == "peak_rss":
                out = {"bytes": peak_rss_bytes()}
            elif op == "wait_quiet":
                out = {"waited_s": wait_quiet(cmd["limit"], cmd["max_wait"])}
            elif op == "run":
                r = runners[cmd["key"]]
                out = timed(cmd["kind"], int(cmd["n"]), cmd["ids"], r.pp, r.tg)
            elif op == "quit":
                proto.write(json.dumps({"ok": True}) + "\n")
                break
            else:
                raise ValueError(f"unknown op {op!r}")
            out["ok"] = True
        except Exception as e:  # answered, so the parent can say what went wrong
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(out) + "\n")
    return 0


def has_llama_cpp(python):
    """Whether `python` can import llama_cpp (a short subprocess: importing it here would load its library)."""
    try:
        r = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


class PeerError(RuntimeError):
    """The llama.cpp worker failed; the message carries the end of its log."""


class LlamaPeer:
    """The parent's handle on the worker: call(op=..., ...) -> its answer."""

    def __init__(self, python):
        self.log = tempfile.NamedTemporaryFile(prefix="lutengine-llamacpp-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([python, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self.hello = self.call(op="hello")

    def call(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise PeerError(f"llama.cpp worker died (exit {self.proc.poll()}); its log ends: {self.tail()}")
        out = json.loads(line)
        if not out.get("ok"):
            raise PeerError(f"llama.cpp worker: {out.get('error')}; its log ends: {self.tail()}")
        return out

    def tail(self):
        try:
            with open(self.log.name, errors="replace") as f:
                return " ".join(f.read()[-600:].split())
        except OSError:
            return "?"

    def close(self):
        try:
            self.call(op="quit")
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        os.unlink(self.log.name)


if __name__ == "__main__":
    sys.exit(worker())
