"""Continuous batching for `lutengine serve`: N slots, each with its own KV cache, advanced together.

Each slot runs engine.generate's Session (the same decode loop, sampler and stop
strings as `generate` and the Python API) on a SlotModel in its own worker
thread. A SlotModel's forward of a prompt runs the slot's Transformer in chunks;
its forward of one token hands the token to the Batcher and waits: the Batcher's
thread gathers the tokens of every slot that is decoding and advances them all
in one BatchedStep, one GEMM per linear layer with a row per sequence (from 4 rows
the integer GEMM, which decodes each weight tile once for all rows; its sums are
the tables' integers, so a row's output does not depend on the others or on
their number) and attention per row over that slot's cache. A request joins or
leaves between steps. For a quantized model a row computes exactly what the
single-token decoder (engine/model.py _Decoder) computes: the same C calls in the
same order, so a greedy request gives the same tokens alone as beside others.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

import lutkernels as lk
from lutkernels import ops
from lutkernels._lut import ffi

from .generate import Session, Stats
from .model import Packed, Transformer, _Decoder, fuses, softcap
from .sampling import SamplingParams

PREFILL_CHUNK = 128  # prompt tokens per forward: a long prompt yields the kernels to the others' steps between chunks
GATHER_S = 0.005  # how long a step waits for the slots still sampling their previous token


class Cancelled(Exception):
    """The request's client went away; its slot is freed at the next token."""


class QueueFull(Exception):
    pass


def fork(m: Transformer) -> Transformer:
    """A Transformer on the same weights and kernels' descriptors with its own KV cache and buffers."""
    s = copy.copy(m)
    s.kv = m.kv.fresh()
    s.filled = 0
    s._decoder = _Decoder(s)
    return s


def _bind_gemms(lins, x: np.ndarray, ys) -> Callable[[int], None]:
    """mm(n): ys[i][:n] = x[:n] @ W_i.T for layers sharing the input: one lut_gemm_multi call where
    they fuse (q/k/v, gate/up: the activations quantized once, one pool run), else one each."""
    if fuses(lins):
        return ops.bind_gemm_multi([f.layer for f in lins], x, ys, lins[0].exact)
    calls = [_bind_gemm(f, x, y) for f, y in zip(lins, ys)]

    def mm(n: int) -> None:
        for c in calls:
            c(n)

    return mm


def _bind_gemm(lin, x: np.ndarray, y: np.ndarray) -> Callable[[int], None]:
    """mm(n): y[:n] = x[:n] @ W.T. Checked once here, its pointers cast once: lk.gemm's checks on
    every call cost a third of a step of a small model (seven GEMMs a layer)."""
    if not isinstance(lin, Packed):
        wt = lin.wt
        return lambda n: np.matmul(x[:n], wt, out=y[:n])
    L = lin.layer
    lk.gemm(L, x, out=y, exact=lin.exact)  # the shapes and dtypes checked (and the kernels warmed)
    xp, yp = ffi.cast("const float *", ffi.from_buffer(x)), ffi.cast("float *", ffi.from_buffer(y))
    exact = int(bool(lin.exact))

    def mm(n: int, keep=(x, y)) -> None:
        rc = L.call(xp, n, yp, ffi.NULL, exact)
        if rc:
            raise lk.KernelError(f"{L.C_NAME} failed with code {rc}")

    return mm


class BatchedStep:
    """One decode step of up to len(slots) sequences, a row each (see the module docstring)."""

    def __init__(self, model: Transformer, slots: Sequence[Transformer]):
        c, f32, n = model.config, np.float32, len(slots)
        self.m, self.slots = model, list(slots)
        self.embed_scale = f32(math.sqrt(c.hidden)) if c.gemma else None  # as _Decoder
        self.x = np.zeros((n, c.hidden), f32)
        self.h, self.delta = np.zeros((n, c.hidden), f32), np.zeros((n, c.hidden), f32)
        self.q, self.att = np.zeros((n, c.n_heads * c.head_dim), f32), np.zeros((n, c.n_heads * c.head_dim), f32)
        self.k, self.v = np.zeros((n, c.n_kv_heads * c.head_dim), f32), np.zeros((n, c.n_kv_heads * c.head_dim), f32)
        self.gate, self.up = np.zeros((n, c.ffn), f32), np.zeros((n, c.ffn), f32)
        self.logits = np.zeros((n, c.vocab), f32)
        self.scores = np.zeros(c.n_heads * model.max_context, f32)  # rows attend one after another
        eps = c.norm_eps
        # per row: per block the calls after each GEMM stage (before q/k/v; after them: gemma3's q/k
        # norms; after o: its attention output norm, then the MLP norm; after up: the gating; after
        # down: its MLP output norm), then the final norm
        self.rows = []
        for r in range(n):
            x, h, d, q, k = self.x[r], self.h[r], self.delta[r], self.q[r], self.k[r]
            blocks = []
            for i, b in enumerate(model.blocks):
                rotate = () if model.mlp_rotation is None else \
                    (ops.bind_rotate(self.gate[r:r + 1], *model.mlp_rotation),)
                qk = () if b.q_norm is None else (ops.bind_head_rmsnorm(q, c.n_heads, b.q_norm, eps),
                                                  ops.bind_head_rmsnorm(k, c.n_kv_heads, b.k_norm, eps))
                attn_out, mlp_out = ((() if w is None else (ops.bind_add_rmsnorm(d, None, w, eps, d),))
                                     for w in (b.attn_out_norm, b.mlp_out_norm))
                gating = (ops.bind_gelu_tanh_mul if c.gemma else ops.bind_silu_mul)(self.gate[r], self.up[r])
                blocks.append(((ops.bind_add_rmsnorm(x, d if i else None, b.attn_norm, eps, h),), qk,
                               (*attn_out, ops.bind_add_rmsnorm(x, d, b.mlp_norm, eps, h)), (gating, *rotate),
                               mlp_out))
            final = ops.bind_add_rmsnorm(x, d if model.blocks else None, model.norm, eps, h)
            self.rows.append((blocks, final))
        self.mm = [(_bind_gemms((blk.q, blk.k, blk.v), self.h, (self.q, self.k, self.v)),
                    _bind_gemm(blk.o, self.att, self.delta),
                    _bind_gemms((blk.gate, blk.up), self.h, (self.gate, self.up)),
                    _bind_gemm(blk.down, self.gate, self.delta)) for blk in model.blocks]
        self.head = _bind_gemm(model.head, self.h, self.logits)
        self._attention: dict[tuple[int, int], list[Callable[[int], None]]] = {}

    def attention(self, r: int, s: int) -> list[Callable[[int], None]]:
        """Row r's attention over slot s's cache, per layer (bound on first use: rows change slots)."""
        key = (r, s)
        if key not in self._attention:
            c, slot = self.m.config, self.slots[s]
            self._attention[key] = [
                slot.kv.bind(i, self.q[r], self.k[r], self.v[r],
                             (b.q_bias, b.k_bias, b.v_bias) if c.qkv_bias else None, *self.m.rope[i],
                             c.n_heads, self.scores, self.att[r], c.query_scale, b.window)
                for i, b in enumerate(self.m.blocks)]
        return self._attention[key]

    def __call__(self, work: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """work: (slot, token, position) per row; returns logits [len(work), vocab] (a buffer the next call reuses)."""
        n = len(work)
        attn = [self.attention(r, s) for r, (s, _, _) in enumerate(work)]
        for r, (_, token, _) in enumerate(work):
            np.copyto(self.x[r], self.m.embed[token])
        if self.embed_scale is not None:
            self.x[:n] *= self.embed_scale

        def stage(i: int, j: int) -> None:
            for blocks, _ in self.rows[:n]:
                for f in blocks[i][j]:
                    f()

        for i, (qkv, o, gate_up, down) in enumerate(self.mm):
            stage(i, 0)
            qkv(n)
            stage(i, 1)
            for r, (_, _, pos) in enumerate(work):
                attn[r][i](pos)
            o(n)
            stage(i, 2)
            gate_up(n)
            stage(i, 3)
            down(n)
            stage(i, 4)
        for _, final in self.rows[:n]:
            final()
        self.head(n)
        if self.m.config.final_softcap is not None:
            softcap(self.logits[:n], self.m.config.final_softcap)
        return self.logits[:n]


@dataclass
class _Row:
    slot: int
    token: int
    pos: int
    done: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None
    error: BaseException | None = None


class Batcher:
    """The decode thread: each step takes the waiting token of every decoding slot (waiting at most
    GATHER_S for one still sampling) and runs them as one BatchedStep."""

    def __init__(self, step: BatchedStep):
        self.step = step
        self.cond = threading.Condition()
        self.pending: list[_Row] = []
        self.decoding: set[int] = set()  # slots between tokens of a reply
        self.steps = self.rows = 0
        self.busy_s = 0.0
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="lutengine-decode", daemon=True)
        self.thread.start()

    def decode(self, slot: int, token: int, pos: int) -> np.ndarray:
        row = _Row(slot, token, pos)
        with self.cond:
            if self.closed:
                raise RuntimeError("the server is shutting down")
            self.decoding.add(slot)
            self.pending.append(row)
            self.cond.notify_all()
        row.done.wait()
        if row.error is not None:
            raise row.error
        return row.logits

    def leave(self, slot: int) -> None:
        with self.cond:
            self.decoding.discard(slot)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=5)

    def _gather(self) -> list[_Row] | None:
        with self.cond:
            while not self.pending and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
            deadline = time.monotonic() + GATHER_S
            while len(self.pending) < len(self.decoding) and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            rows, self.pending = self.pending, []
            return rows

    def _run(self) -> None:
        while (rows := self._gather()) is not None:
            t0 = time.perf_counter()
            try:
                logits = self.step([(r.slot, r.token, r.pos) for r in rows])
                for r, row_logits in zip(rows, logits):
                    r.logits = row_logits.copy()  # the slot samples from it while the next step runs
            except Exception as e:  # a failed step fails its requests, not the server
                for r in rows:
                    r.error = e
            self.busy_s += time.perf_counter() - t0
            self.steps += 1
            self.rows += len(rows)
            for r in rows:
                r.done.set()
        with self.cond:
            for r in self.pending:
                r.error = RuntimeError("the server is shutting down")
                r.done.set()


class SlotModel:
    """What a slot's Session sees as its model: prompts run on the slot's Transformer in chunks,
    single tokens go through the Batcher. Raises Cancelled once its request is cancelled."""

    def __init__(self, transformer: Transformer, index: int, batcher: Batcher):
        self.t, self.index, self.batcher = transformer, index, batcher
        self.request: Request | None = None

    @property
    def max_context(self) -> int:
        return self.t.max_context

    def forward(self, tokens: Sequence[int], pos: int) -> np.ndarray:
        if self.request is not None and self.request.cancelled:
            raise Cancelled()
        n = len(tokens)
        if n == 1:
            self.t._check_span(pos, 1)
            logits = self.batcher.decode(self.index, self.t._token(tokens[0]), pos)
            self.t.filled = pos + 1
            return logits
        starts = list(range(0, n, PREFILL_CHUNK))
        if len(starts) > 1 and n - starts[-1] == 1:  # no one-token chunk: those take the decoder's path
            starts.pop()
        for a, e in zip(starts, starts[1:] + [n]):
            if self.request is not None and self.request.cancelled:
                raise Cancelled()
            logits = self.t.forward(tokens[a:e], pos + a)
        return logits


class Request:
    """One generation: its prompt ids and settings in, text pieces out through emit(piece), then
    emit(None) once the Stats are final. error holds what failed it, if anything."""

    def __init__(self, ids: Sequence[int], params: SamplingParams, max_tokens: int, stop: Sequence[str],
                 emit: Callable[[str | None], None], ignore_eos: bool = False, wrap: Callable | None = None):
        """wrap: what the slot's model is seen through (engine/jsonmode.py's JsonConstraint), if anything."""
        self.ids, self.params, self.max_tokens, self.stop = list(ids), params, max_tokens, list(stop)
        self.emit, self.ignore_eos, self.wrap = emit, ignore_eos, wrap
        self.stats = Stats()
        self.cancelled = False
        self.error: BaseException | None = None
        self.t_submit = time.monotonic()
        self.t_first: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """`parallel` slots over one model, a bounded queue of waiting requests, counters for /metrics."""

    def __init__(self, model, parallel: int = 4, queue: int = 16):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        if queue < 0:
            raise ValueError(f"queue must be >= 0, got {queue}")
        self.model, self.parallel, self.queue_size = model, parallel, queue
        slots = [fork(model.transformer) for _ in range(parallel)]
        self.batcher = Batcher(BatchedStep(model.transformer, slots))
        self.cond = threading.Condition()
        self.waiting: list[Request] = []
        self.active = 0
        self.closed = False
        self.counts = {"requests": 0, "rejected": 0, "cancelled": 0, "failed": 0, "prompt_tokens": 0,
                       "generated_tokens": 0, "first_tokens": 0}
        self.prompt_s = self.gen_s = self.ttft_s = 0.0  # ttft: from submission (queueing included)
        self.started = time.monotonic()
        self.workers = [threading.Thread(target=self._work, args=(SlotModel(s, i, self.batcher),),
                                         name=f"lutengine-slot-{i}", daemon=True) for i, s in enumerate(slots)]
        for w in self.workers:
            w.start()

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when `queue` requests already wait for a slot."""
        with self.cond:
            if self.closed:
                raise RuntimeError("the server is shutting down")
            if self.active + len(self.waiting) >= self.parallel + self.queue_size:
                self.counts["rejected"] += 1
                raise QueueFull(f"{len(self.waiting)} requests are waiting for {self.parallel} slots")
            self.waiting.append(request)
            self.counts["requests"] += 1
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for r in self.waiting:
                r.error = RuntimeError("the server is shutting down")
                r.emit(None)
            self.waiting.clear()
            self.cond.notify_all()
        self.batcher.close()

    def snapshot(self) -> dict:
        with self.cond:
            return {**self.counts, "queue": len(self.waiting), "active": self.active, "slots": self.parallel,
                    "prompt_s": self.prompt_s, "gen_s": self.gen_s, "ttft_s": self.ttft_s,
                    "steps": self.batcher.steps,
                    "step_rows": self.batcher.rows, "decode_busy_s": self.batcher.busy_s,
                    "uptime_s": time.monotonic() - self.started}

    def _take(self) -> Request | None:
        with self.cond:
            while not self.waiting and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
            self.active += 1
            return self.waiting.pop(0)

    def _work(self, slot: SlotModel) -> None:
        while (req := self._take()) is not None:
            # A fresh session (an empty cache) per request: the reused prefix of a previous reply would hold
            # keys computed on the decode path instead of the prompt path, and could tip a token.
            session = Session(slot if req.wrap is None else req.wrap(slot), self.model.tokenizer)
            slot.request = req
            try:
                if not req.cancelled:
                    for piece in session.stream(req.ids, req.params, req.max_tokens, req.stop, req.stats,
                                                req.ignore_eos):
                        if req.t_first is None:
                            req.t_first = time.monotonic()
                        if req.cancelled:
                            raise Cancelled()
                        req.emit(piece)
            except Cancelled:
                pass
            except Exception as e:
                req.error = e
            finally:
                slot.request = None
                self.batcher.leave(slot.index)
                with self.cond:
                    self.active -= 1
                    self.counts["cancelled"] += req.cancelled
                    self.counts["failed"] += req.error is not None
                    self.counts["prompt_tokens"] += req.stats.prompt_tokens
                    self.counts["generated_tokens"] += req.stats.gen_tokens
                    self.prompt_s += req.stats.prompt_s
                    self.gen_s += req.stats.gen_s
                    if req.t_first is not None:
                        self.counts["first_tokens"] += 1
                        self.ttft_s += req.t_first - req.t_submit
                req.emit(None)
