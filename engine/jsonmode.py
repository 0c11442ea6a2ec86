"""response_format json_object and json_schema: sampling constrained to JSON text, token by token.

A byte-level pushdown automaton follows the grammar: for json_object JSON
itself (RFC 8259, the top level an object); for json_schema the schema's shape
(JsonSchema: objects with their properties in order, arrays, strings, numbers,
integers, booleans, null, enums and consts). Before each draw, every token
whose bytes would leave the grammar gets -inf, so the sampler chain (greedy,
top-k, top-p, seeds) only chooses among tokens that keep the text a prefix of
some accepted document; once it is complete only end-of-sequence is left.
Bytes of 0x80 and up count as string characters (the tokenizer's UTF-8 decoding
makes them text).

Masks are computed over the vocabulary sorted by bytes, skipping every token
that shares a prefix already refused, and cached per grammar and state: inside
a free string, tokens without a quote, backslash or control byte keep the
state as it is, so only the others are walked.
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


class JsonObject:
    """The json_object grammar: any JSON object (the functions above)."""
    key = ("json_object",)
    initial = INITIAL

    @staticmethod
    def advance(state, b: int):
        return advance(state, b)

    @staticmethod
    def done(state) -> bool:
        return state[0] == DONE

    @staticmethod
    def free_string(state) -> bool:
        return state[0] in (STRING, KEY_STRING)


# JsonSchema's frames, a stack of them the state: (kind, node, phase, aux, whitespace run).
SEQ, STR, NUM, LIT, ARR = range(5)
_STAY, _PUSH, _PUSH_FEED, _POP, _POP_FEED = range(5)
_SCHEMA_WORDS = {"type", "properties", "required", "items", "enum", "const", "additionalProperties", "title",
                 "description", "$schema", "default", "examples", "strict"}


class JsonSchema:
    """The json_schema grammar of a schema's subset that is a shape: "object" (every property, in the
    schema's order: a strict-mode OpenAI schema requires them all), "array" of "items", "string",
    "number", "integer", "boolean", "null", "enum", "const". Keywords that constrain beyond the
    shape (pattern, minimum, anyOf, ...) are refused by name rather than ignored."""

    def __init__(self, schema):
        import json

        self.key = ("json_schema", json.dumps(schema, sort_keys=True))
        self.nodes: list[tuple] = []
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise ValueError("the schema's root must be an object schema (as OpenAI's structured outputs require)")
        root = self._compile(schema, "schema")
        self.initial = (self._start(root),)

    def _compile(self, s, path: str) -> int:
        import json

        if not isinstance(s, dict):
            raise ValueError(f"{path}: a schema must be an object")
        other = sorted(set(s) - _SCHEMA_WORDS)
        if other:
            raise ValueError(f"{path}: keyword {other[0]!r} is not supported")
        if s.get("additionalProperties", False) not in (False, True, {}):
            raise ValueError(f"{path}: additionalProperties must be true or false")
        if "enum" in s or "const" in s:
            values = s["enum"] if "enum" in s else [s["const"]]
            if not isinstance(values, list) or not values:
                raise ValueError(f"{path}: enum must be a non-empty array")
            return self._node(LIT, tuple(json.dumps(v, ensure_ascii=False).encode() for v in values))
        kind = s.get("type")
        if kind == "object":
            props = s.get("properties", {})
            if not isinstance(props, dict):
                raise ValueError(f"{path}.properties must be an object")
            required = s.get("required", [])
            if not isinstance(required, list) or not set(required) <= set(props):
                raise ValueError(f"{path}.required must list properties of {path}")
            items: list = [b"{"]
            for i, (name, sub) in enumerate(props.items()):
                items += [b"," if i else b"", json.dumps(name, ensure_ascii=False).encode(), b":",
                          self._compile(sub, f"{path}.properties.{name}")]
            items.append(b"}")
            return self._node(SEQ, tuple(x for x in items if x != b""))
        if kind == "array":
            if "items" not in s:
                raise ValueError(f"{path}: an array needs items")
            return self._node(ARR, self._compile(s["items"], f"{path}.items"))
        if kind == "string":
            return self._node(STR, None)
        if kind in ("number", "integer"):
            return self._node(NUM, kind == "integer")
        if kind == "boolean":
            return self._node(LIT, (b"true", b"false"))
        if kind == "null":
            return self._node(LIT, (b"null",))
        raise ValueError(f"{path}: type {kind!r} is not supported (object, array, string, number, integer, "
                         f"boolean, null; or enum/const)")

    def _node(self, kind: int, data) -> int:
        self.nodes.append((kind, data))
        return len(self.nodes) - 1

    def _start(self, node: int) -> tuple:
        kind, data = self.nodes[node]
        return (kind, node, 0, tuple(range(len(data))) if kind == LIT else 0, 0)

    def done(self, state) -> bool:
        return state == ()

    def free_string(self, state) -> bool:
        return bool(state) and state[-1][0] == STR and state[-1][2] == 1

    def advance(self, state, b: int):
        if not state:
            return None
        r = self._frame(state[-1], b)
        if r is None:
            return None
        op = r[0]
        if op == _STAY:
            return state[:-1] + (r[1],)
        if op == _PUSH:
            return state[:-1] + (r[1], r[2])
        if op == _PUSH_FEED:
            return self.advance(state[:-1] + (r[1], r[2]), b)
        rest = self._finished(state[:-1])
        return rest if op == _POP else self.advance(rest, b)

    def _finished(self, state):
        """The stack once its top frame's child value is complete."""
        if not state:
            return ()
        kind, node, phase, aux, _ = state[-1]
        nxt = (kind, node, phase + 1, 0, 0) if kind == SEQ else (kind, node, 2, 0, 0)
        return state[:-1] + (nxt,)

    def _frame(self, f, b: int):
        kind, node, phase, aux, ws = f
        data = self.nodes[node][1]
        can_ws = b in WS and ws < MAX_WS
        if kind == SEQ:
            lit = data[phase]
            if aux == 0 and can_ws:
                return _STAY, (kind, node, phase, 0, ws + 1)
            if b != lit[aux]:
                return None
            if aux + 1 < len(lit):
                return _STAY, (kind, node, phase, aux + 1, 0)
            if phase + 1 == len(data):
                return (_POP,)
            if isinstance(data[phase + 1], int):
                return _PUSH, (kind, node, phase + 1, 0, 0), self._start(data[phase + 1])
            return _STAY, (kind, node, phase + 1, 0, 0)
        if kind == STR:
            if phase == 0:
                return (_STAY, (kind, node, 0, 0, ws + 1)) if can_ws else \
                    (_STAY, (kind, node, 1, 0, 0)) if b == QUOTE else None
            if phase == 1:
                if b == QUOTE:
                    return (_POP,)
                if b == BACKSLASH:
                    return _STAY, (kind, node, 2, 0, 0)
                return None if b < 0x20 else (_STAY, f)
            if phase == 2:
                return (_STAY, (kind, node, 3, 4, 0)) if b == ord("u") else \
                    (_STAY, (kind, node, 1, 0, 0)) if b in ESCAPES else None
            if b not in HEX:
                return None
            return _STAY, ((kind, node, 3, aux - 1, 0) if aux > 1 else (kind, node, 1, 0, 0))
        if kind == NUM:
            if phase == 0:
                if can_ws:
                    return _STAY, (kind, node, 0, 0, ws + 1)
                sub = MINUS if b == ord("-") else ZERO if b == ord("0") else INT if b in DIGITS else None
                return None if sub is None else (_STAY, (kind, node, sub, 0, 0))
            sub = _number(phase, b)
            if sub is not None and not (data and sub in (DOT, EXP)):  # an integer has no fraction nor exponent
                return _STAY, (kind, node, sub, 0, 0)
            return (_POP_FEED,) if phase in ACCEPT_NUMBER else None
        if kind == LIT:
            if phase == 0 and can_ws:
                return _STAY, (kind, node, 0, aux, ws + 1)
            alive = tuple(i for i in aux if phase < len(data[i]) and data[i][phase] == b)
            if alive:
                if all(len(data[i]) == phase + 1 for i in alive):
                    return (_POP,)
                return _STAY, (kind, node, phase + 1, alive, 0)
            return (_POP_FEED,) if phase and any(len(data[i]) == phase for i in aux) else None
        # ARR: 0 before "[", 1 after "[", 2 after a value, 3 after ","
        if can_ws:
            return _STAY, (kind, node, phase, 0, ws + 1)
        if phase == 0:
            return (_STAY, (kind, node, 1, 0, 0)) if b == ord("[") else None
        if b == ord("]") and phase in (1, 2):
            return (_POP,)
        if phase == 2:
            return (_STAY, (kind, node, 3, 0, 0)) if b == ord(",") else None
        return _PUSH_FEED, (kind, node, 4, 0, 0), self._start(data)


def grammar_for(fmt: dict):
    """The grammar of an OpenAI response_format that asks for JSON (ValueError if it cannot be followed)."""
    if fmt.get("type") == "json_object":
        return JsonObject
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise ValueError("json_schema must be an object with a schema")
    return JsonSchema(spec["schema"])


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
        self.plain = np.array([bool(p) for p in pieces]) & ~special  # tokens a free string takes whole
        self.special_ids = [i for i in ids if special[i]]
        self.pieces = pieces
        self._masks: dict = {}
        self._lock = threading.Lock()

    def mask(self, grammar, state) -> np.ndarray:
        key = (grammar.key, state)
        with self._lock:
            m = self._masks.get(key)
        if m is None:
            m = self._compute(grammar, state)
            with self._lock:
                if len(self._masks) >= self.CACHE:
                    self._masks.clear()
                self._masks[key] = m
        return m

    def _compute(self, grammar, state) -> np.ndarray:
        m = np.zeros(self.vocab, bool)
        if grammar.done(state):
            m[self.eos] = True
            return m
        if grammar.free_string(state):
            m |= self.plain
            for i in self.special_ids:
                if walk(grammar, state, self.pieces[i]) is not None:
                    m[i] = True
            return m
        m[self.ids[self._walk_sorted(grammar, state)]] = True
        return m

    def _walk_sorted(self, grammar, state) -> list[int]:
        """Positions in the sorted vocabulary of the tokens state can take."""
        out, toks, n, step = [], self.sorted, len(self.sorted), grammar.advance
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
                st = step(st, p[j])
                if st is None:
                    # every token that starts with p[:j+1] is refused too
                    nxt = _successor(p[:j + 1])
                    i = bisect.bisect_left(toks, nxt, i + 1) if nxt else n
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


def walk(grammar, state, data: bytes):
    for b in data:
        state = grammar.advance(state, b)
        if state is None:
            return None
    return state


class JsonConstraint:
    """Wraps a model (a Transformer or a server slot): the logits it returns have every token that
    would leave the grammar at -inf. It follows the text through the tokens fed back to it."""

    def __init__(self, model, vocabulary: Vocabulary, grammar=JsonObject):
        self.model, self.v, self.grammar = model, vocabulary, grammar
        self.state = grammar.initial
        self.prompt_done = False

    @property
    def max_context(self) -> int:
        return self.model.max_context

    def forward(self, tokens, pos: int) -> np.ndarray:
        logits = self.model.forward(tokens, pos)
        if self.prompt_done:  # a fed-back token is the one sampled from our last logits
            for t in tokens:
                if t not in self.v.eos:
                    self.state = walk(self.grammar, self.state, self.v.pieces[t])
                if self.state is None:
                    raise RuntimeError("a token outside the JSON grammar was sampled")
        self.prompt_done = True
        return np.where(self.v.mask(self.grammar, self.state), logits, np.float32(-np.inf))
