"""response_format {"type": "json_object"}: sampling constrained to JSON text, token by token.

A byte-level pushdown automaton follows the JSON grammar (RFC 8259, the top
level an object). Before each draw, every token whose bytes would leave the
grammar gets -inf, so the sampler chain (greedy, top-k, top-p, seeds) only ever
chooses among tokens that keep the text a prefix of some JSON object; once the
object closes only end-of-sequence is left. Bytes of 0x80 and up count as string
characters (the tokenizer's UTF-8 decoding makes them text).

Masks are computed over the vocabulary sorted by bytes, skipping every token
that shares a prefix already refused, and cached per automaton state: in a
string, tokens without a quote, backslash or control byte keep the state as
it is, so only the others are walked.
"""
from __future__ import annotations

import bisect
import threading

import numpy as np

# Lexical modes. The state is (mode, stack, aux): stack the open containers ("o" object, "a" array)
# as a string; aux the mode's own detail (literal bytes left, whitespace run).
(START, VALUE, VALUE_OR_END, KEY, KEY_OR_END, COLON, AFTER, STRING, KEY_STRING, ESCAPE, KEY_ESCAPE, UNICODE,
 KEY_UNICODE, MINUS, ZERO, INT, DOT, FRAC, EXP, EXP_SIGN, EXP_INT, LITERAL, DONE) = range(23)
WS = frozenset(b" \t\n\r")
MAX_WS = 4  # whitespace bytes in a row: a model that loops on newlines still has to write JSON
HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
ACCEPT_NUMBER = frozenset((ZERO, INT, FRAC, EXP_INT))
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
QUOTE, BACKSLASH = ord('"'), ord("\\")
ESCAPES = frozenset(b'"\\/bfnrtu')

INITIAL = (START, "", 0)


def _after_value(stack: str):
    return (AFTER, stack, 0) if stack else (DONE, "", 0)


def _value(b: int, stack: str):
    """The state after b begins a value, or None."""
    if b == ord("{"):
        return KEY_OR_END, stack + "o", 0
    if b == ord("["):
        return VALUE_OR_END, stack + "a", 0
    if b == QUOTE:
        return STRING, stack, 0
    if b == ord("-"):
        return MINUS, stack, 0
    if b == ord("0"):
        return ZERO, stack, 0
    if b in DIGITS:
        return INT, stack, 0
    if b in LITERALS:
        return LITERAL, stack, LITERALS[b]
    return None


def _ws(state, b: int):
    mode, stack, run = state
    return (mode, stack, run + 1) if b in WS and run < MAX_WS else None


def advance(state, b: int):
    """The automaton's state after byte b, or None where b cannot follow."""
    mode, stack, aux = state
    if mode == STRING or mode == KEY_STRING:
        if b == QUOTE:
            return (COLON, stack, 0) if mode == KEY_STRING else _after_value(stack)
        if b == BACKSLASH:
            return (ESCAPE if mode == STRING else KEY_ESCAPE), stack, 0
        return None if b < 0x20 else state
    if mode == ESCAPE or mode == KEY_ESCAPE:
        back = STRING if mode == ESCAPE else KEY_STRING
        if b == ord("u"):
            return (UNICODE if mode == ESCAPE else KEY_UNICODE), stack, 4
        return (back, stack, 0) if b in ESCAPES else None
    if mode == UNICODE or mode == KEY_UNICODE:
        if b not in HEX:
            return None
        if aux > 1:
            return mode, stack, aux - 1
        return (STRING if mode == UNICODE else KEY_STRING), stack, 0
    if mode == LITERAL:
        if b != aux[0]:
            return None
        return (LITERAL, stack, aux[1:]) if len(aux) > 1 else _after_value(stack)
    if mode >= MINUS:  # numbers
        if mode == DONE:
            return None
        nxt = _number(mode, b)
        if nxt is not None:
            return nxt, stack, 0
        if mode not in ACCEPT_NUMBER:
            return None
        return advance(_after_value(stack), b)  # the byte that ends a number belongs to what follows
    if mode == START:
        return (KEY_OR_END, "o", 0) if b == ord("{") else _ws(state, b)
    if mode == VALUE or mode == VALUE_OR_END:
        if mode == VALUE_OR_END and b == ord("]"):
            return _after_value(stack[:-1])
        return _value(b, stack) or _ws(state, b)
    if mode == KEY or mode == KEY_OR_END:
        if b == QUOTE:
            return KEY_STRING, stack, 0
        if mode == KEY_OR_END and b == ord("}"):
            return _after_value(stack[:-1])
        return _ws(state, b)
    if mode == COLON:
        return (VALUE, stack, 0) if b == ord(":") else _ws(state, b)
    # AFTER a value inside a container
    top = stack[-1]
    if b == ord(","):
        return (KEY, stack, 0) if top == "o" else (VALUE, stack, 0)
    if b == (ord("}") if top == "o" else ord("]")):
        return _after_value(stack[:-1])
    return _ws(state, b)


def _number(mode: int, b: int):
    d = b in DIGITS
    if mode == MINUS:
        return ZERO if b == ord("0") else INT if d else None
    if mode in (ZERO, INT):
        if d and mode == INT:
            return INT
        return DOT if b == ord(".") else EXP if b in b"eE" else None
    if mode in (DOT, FRAC):
        return FRAC if d else EXP if mode == FRAC and b in b"eE" else None
    if mode == EXP:
        return EXP_SIGN if b in b"+-" else EXP_INT if d else None
    if mode in (EXP_SIGN, EXP_INT):
        return EXP_INT if d else None
    return None


class Vocabulary:
    """A tokenizer's tokens as bytes, sorted, with the masks found so far (shared by requests)."""
    CACHE = 256  # masks kept (a bool per token each)

    def __init__(self, tokenizer, vocab: int):
        specials = set(tokenizer._tok.get_added_tokens_decoder())
        pieces = [b"" if i in specials else tokenizer.token_bytes(i) for i in range(vocab)]
        ids = [i for i in range(vocab) if pieces[i]]
        ids.sort(key=pieces.__getitem__)
        self.vocab = vocab
        self.ids = np.array(ids, np.int64)
        self.sorted = [pieces[i] for i in ids]
        self.eos = [i for i in tokenizer.info.eos_ids if i < vocab]
        special = np.array([any(c < 0x20 or c in (QUOTE, BACKSLASH) for c in p) for p in pieces]) 
        self.plain = np.array([bool(p) for p in pieces]) & ~special  # tokens a string takes whole
        self.special_ids = [i for i in ids if special[i]]
        self.pieces = pieces
        self._masks: dict = {}
        self._lock = threading.Lock()

    def mask(self, state) -> np.ndarray:
        with self._lock:
            m = self._masks.get(state)
        if m is None:
            m = self._compute(state)
            with self._lock:
                if len(self._masks) >= self.CACHE:
                    self._masks.clear()
                self._masks[state] = m
        return m

    def _compute(self, state) -> np.ndarray:
        m = np.zeros(self.vocab, bool)
        if state[0] == DONE:
            m[self.eos] = True
            return m
        if state[0] in (STRING, KEY_STRING):
            m |= self.plain
            for i in self.special_ids:
                if walk(state, self.pieces[i]) is not None:
                    m[i] = True
            return m
        m[self.ids[self._walk_sorted(state)]] = True
        return m

    def _walk_sorted(self, state) -> list[int]:
        """Positions in the sorted vocabulary of the tokens state can take."""
        out, toks, n = [], self.sorted, len(self.sorted)
        states, prev = [state], b""  # states[k]: after the first k bytes of prev
        i = 0
        while i < n:
            p = toks[i]
            k, lim = 0, min(len(p), len(states) - 1)
            while k < lim and p[k] == prev[k]:
                k += 1
            del states[k + 1:]
            st = states[k]
            for j in range(k, len(p)):
                st = advance(st, p[j])
                if st is None:
                    # every token that starts with p[:j+1] is refused too
                    i = bisect.bisect_left(toks, _successor(p[:j + 1]), i + 1) if _successor(p[:j + 1]) else n
                    prev = p[:j]
                    break
                states.append(st)
            else:
                out.append(i)
                prev = p
                i += 1
        return out


def _successor(prefix: bytes) -> bytes | None:
    """The least byte string above every string starting with prefix (None: there is none)."""
    p = prefix.rstrip(b"\xff")
    return p[:-1] + bytes([p[-1] + 1]) if p else None


def walk(state, data: bytes):
    for b in data:
        state = advance(state, b)
        if state is None:
            return None
    return state


class JsonConstraint:
    """Wraps a model (a Transformer or a server slot): the logits it returns have every token that
    would break the JSON object at -inf. It follows the text through the tokens fed back to it."""

    def __init__(self, model, vocabulary: Vocabulary):
        self.model, self.v = model, vocabulary
        self.state = INITIAL
        self.prompt_done = False

    @property
    def max_context(self) -> int:
        return self.model.max_context

    def forward(self, tokens, pos: int) -> np.ndarray:
        logits = self.model.forward(tokens, pos)
        if self.prompt_done:  # a fed-back token is the one sampled from our last logits
            for t in tokens:
                self.state = walk(self.state, self.v.pieces[t]) if t not in self.v.eos else self.state
                if self.state is None:
                    raise RuntimeError("a token outside the JSON grammar was sampled")
        self.prompt_done = True
        return np.where(self.v.mask(self.state), logits, np.float32(-np.inf))
