"""A deterministic, structure-aware mutator: seed files -> a stream of inputs from one seeded RNG.

Each seed is understood once in its own format: a GGUF file as its key/value list
and tensor table (re-encoded after every edit, with a map of where each count,
length, type code and offset lies), a safetensors file as its JSON header and data
(JSON strings that hold JSON, such as the quantized file's metadata and its
tokenizer, are edited as JSON too), an HF folder as its files. Half of the edits
are made on that structure, so inputs get past the first checks; the rest are
byte edits, most of them writing boundary integers over the fields that readers
trust (counts, lengths, offsets). The same seed list and RNG seed give the same
inputs, which is what lets the test suite run a short campaign reproducibly.
"""
from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass, field

MAX_LEN = 1 << 20  # inputs stay under the 1 MB the hang rule applies to

# ---- GGUF -------------------------------------------------------------------------------------

STRING, ARRAY = 8, 9
_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class GGUFDoc:
    """A GGUF file as editable parts. A value is a scalar, str (or bytes: not always UTF-8),
    or for ARRAY a (item type, [items]) pair."""
    version: int
    kv: list  # [key, type, value]
    tensors: list  # [name, ne, ggml type, offset]
    data: bytes
    align: int = 32
    fields: list = field(default_factory=list)  # (offset, width) of each integer field, set by encode


def decode_gguf(data: bytes) -> GGUFDoc:
    """Parse a well-formed GGUF seed (our corpus; not a hardened parser: the loaders are what we test)."""
    pos = 4
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, pos)
    pos += 20

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, data, pos)[0]
        pos += struct.calcsize("<" + fmt)
        return v

    def value(t):
        nonlocal pos
        if t == STRING:
            n = take("Q")
            pos += n
            return data[pos - n:pos].decode("utf-8", "surrogateescape")
        if t == ARRAY:
            it, n = take("I"), take("Q")
            return (it, [value(it) for _ in range(n)])
        return take(_FORMATS[t])

    kv = []
    for _ in range(n_kv):
        key = value(STRING)
        t = take("I")
        kv.append([key, t, value(t)])
    tensors = []
    for _ in range(n_tensors):
        name, nd = value(STRING), take("I")
        ne = [take("Q") for _ in range(nd)]
        tensors.append([name, ne, take("I"), take("Q")])
    align = next((v for k, _, v in kv if k == "general.alignment"), 32)
    align = align if isinstance(align, int) and 0 < align < 1 << 16 else 32
    start = -(-pos // align) * align
    return GGUFDoc(version, kv, tensors, data[start:], align)


def encode_gguf(doc: GGUFDoc) -> bytes:
    out, fields = bytearray(b"GGUF"), []

    def put(fmt, v, is_field=True):
        if is_field:
            fields.append((len(out), struct.calcsize("<" + fmt)))
        try:
            out.extend(struct.pack("<" + fmt, v))
        except (struct.error, TypeError, OverflowError):  # an edit gave a value its type cannot hold
            out.extend(bytes(struct.calcsize("<" + fmt)))

    def string(s):
        b = s if isinstance(s, bytes) else str(s).encode("utf-8", "surrogateescape")
        put("Q", len(b))
        out.extend(b)

    def value(t, v):
        if t == STRING:
            string(v)
        elif t == ARRAY:
            it, items = v if isinstance(v, tuple) else (0, [])
            put("I", it)
            put("Q", len(items))
            for item in items:
                value(it, item)
        else:
            put(_FORMATS.get(t, "B"), v, is_field=t in (4, 5, 10, 11))

    put("I", doc.version)
    put("Q", len(doc.tensors))
    put("Q", len(doc.kv))
    for key, t, v in doc.kv:
        string(key)
        put("I", t)
        value(t, v)
    for name, ne, qtype, offset in doc.tensors:
        string(name)
        put("I", len(ne))
        for n in ne:
            put("Q", n)
        put("I", qtype)
        put("Q", offset)
    align = doc.align if isinstance(doc.align, int) and 0 < doc.align < 1 << 16 else 32
    out.extend(bytes(-len(out) % align))
    out.extend(doc.data)
    doc.fields = fields
    return bytes(out)


# ---- values -----------------------------------------------------------------------------------

BOUNDARY_INTS = (0, 1, 2, 3, 7, 8, 16, 31, 32, 33, 63, 64, 255, 256, 4096, 65535, 65536, 2**31 - 1, 2**31,
                 2**32 - 1, 2**32, 2**40, 2**53 + 1, 2**60, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -1, -2**31, -2**63)
WIDTH_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}


def boundary_int(rng: random.Random, near=None) -> int:
    if isinstance(near, int) and not isinstance(near, bool) and rng.random() < 0.4:
        return rng.choice((near + 1, near - 1, near * 2, near // 2, -near, near + rng.randint(-64, 64)))
    return rng.choice(BOUNDARY_INTS)


def json_value(rng: random.Random, near=None):
    """A value JSON readers mishandle: boundary numbers, wrong types, deep nesting."""
    r = rng.random()
    if r < 0.35:
        return boundary_int(rng, near)
    if r < 0.45:
        return rng.choice((0.5, -1.5, 1e308, 1e-320, float("inf"), float("-inf"), float("nan")))
    if r < 0.6:
        return rng.choice(("", "x", "F16", "U8", "I8", "F32", "BF16", "llama", "qwen2", "trellis", "gpt2",
                           "<|im_end|>", "\udcff", "a" * 300, " ", "{}", "[]", "0"))
    if r < 0.7:
        return rng.choice((None, True, False))
    if r < 0.8:
        return rng.choice(([], {}, [0], [near], {"x": near}, [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    if r < 0.85:
        depth = rng.choice((100, 2000, 100000))
        return json.loads("[" * depth + "]" * depth) if depth < 500 else DeepJSON(depth)
    return near


class DeepJSON:
    """Nesting too deep for json.dumps to build; spliced into the text as it is written."""

    def __init__(self, depth):
        self.depth = depth


def dump_json(obj) -> str:
    deep = []

    def default(o):
        if isinstance(o, DeepJSON):
            deep.append(o.depth)
            return f"@@deep{len(deep) - 1}@@"
        raise TypeError(type(o).__name__)

    text = json.dumps(obj, default=default, ensure_ascii=False)
    for i, depth in enumerate(deep):
        text = text.replace(f'"@@deep{i}@@"', "[" * depth + "]" * depth, 1)
    return text


def _nodes(obj):
    """Every (container, key) of a JSON tree."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append((obj, k))
        if isinstance(v, (dict, list)):
            out.extend(_nodes(v))
    return out


def mutate_json(obj, rng: random.Random, depth: int = 0):
    """Edit a parsed JSON document in place (and return it, the root may change)."""
    nodes = _nodes(obj)
    if not nodes:
        return json_value(rng, obj)
    parent, key = rng.choice(nodes)
    value = parent[key]
    if isinstance(value, str) and value[:1] in "{[" and depth < 2 and rng.random() < 0.7:
        try:
            inner = json.loads(value)
        except ValueError:
            inner = None
        if isinstance(inner, (dict, list)):
            parent[key] = dump_json(mutate_json(inner, rng, depth + 1))
            return obj
    r = rng.random()
    if r < 0.6:
        parent[key] = json_value(rng, value)
    elif r < 0.75 and isinstance(parent, dict):
        del parent[key]
    elif r < 0.85 and isinstance(parent, list):
        parent.insert(rng.randrange(len(parent) + 1), json_value(rng, value))
    elif r < 0.92 and isinstance(parent, dict):
        other = rng.choice(list(parent))
        parent[key], parent[other] = parent[other], parent[key]
    elif isinstance(value, list) and value:
        del value[rng.randrange(len(value)):]
    else:
        parent[key] = [value] if rng.random() < 0.5 else {"x": value}
    return obj


# ---- safetensors ------------------------------------------------------------------------------

def split_safetensors(data: bytes):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header, body: bytes, align: int = 64) -> bytes:
    text = dump_json(header).encode("utf-8", "surrogateescape")
    text += b" " * (-(8 + len(text)) % align)
    return len(text).to_bytes(8, "little") + text + body


# ---- the mutator ------------------------------------------------------------------------------

CONTAINER_MARK = b"\n@@lutfuzz-file "
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "model.safetensors.index.json", "chat_template.jinja",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def pack_folder(files: dict[str, bytes]) -> bytes:
    """An HF folder as one fuzz input: each file behind a marker line naming it."""
    return b"".join(CONTAINER_MARK + name.encode() + b"\n" + body for name, body in files.items())


def unpack_folder(data: bytes) -> dict[str, bytes]:
    """The files of pack_folder's output; unknown names and text before the first marker are dropped."""
    files = {}
    for part in data.split(CONTAINER_MARK)[1:]:
        name, _, body = part.partition(b"\n")
        name = name.decode("ascii", "replace")
        if name in HF_FILES:
            files[name] = body
    return files


# what decoding an input that an earlier edit broke may raise
UNPARSED = (ValueError, KeyError, IndexError, TypeError, struct.error, RecursionError, OverflowError,
            ZeroDivisionError, MemoryError)


class Mutator:
    """mutator() -> the next input; kind is the seeds' format: "gguf", "safetensors" or "folder"."""

    def __init__(self, kind: str, seeds: list[bytes], seed: int = 0):
        if not seeds:
            raise ValueError("a mutator needs at least one seed input")
        self.kind, self.seeds, self.rng = kind, seeds, random.Random(seed)
        self._docs: dict[int, object] = {}

    def __call__(self) -> bytes:
        return self.mutate(self.rng.choice(self.seeds))

    def mutate(self, data: bytes, rng: random.Random | None = None) -> bytes:
        rng = rng or self.rng
        for _ in range(1 + min(int(rng.expovariate(0.8)), 6)):
            if rng.random() < 0.55:
                data = self._structured(data, rng)
            else:
                data = self._bytes(data, rng, self._fields(data))
        return data[:MAX_LEN]

    # structure-aware edits; an input the parser cannot read gets a byte edit instead
    def _structured(self, data: bytes, rng) -> bytes:
        try:
            if self.kind == "gguf":
                return self._gguf(data, rng)
            if self.kind == "safetensors":
                return self._safetensors(data, rng)
            return self._folder(data, rng)
        except UNPARSED:
            return self._bytes(data, rng, [])

    def _doc(self, data: bytes) -> GGUFDoc:
        key = hash(data)
        if key not in self._docs:
            if len(self._docs) > 64:
                self._docs.clear()
            self._docs[key] = decode_gguf(data)
        d = self._docs[key]
        return GGUFDoc(d.version, [list(e) for e in d.kv], [[n, list(ne), t, o] for n, ne, t, o in d.tensors],
                       d.data, d.align)

    def _fields(self, data: bytes) -> list:
        if self.kind != "gguf":
            return []
        try:
            doc = self._doc(data)
        except UNPARSED:
            return []
        encode_gguf(doc)
        return doc.fields

    def _gguf(self, data: bytes, rng) -> bytes:
        doc = self._doc(data)
        r = rng.random()
        if not doc.tensors and 0.45 <= r < 0.75:  # a tokenizer seed: its edits go to the metadata instead
            r = rng.random() * 0.45
        if r < 0.3 and doc.kv:
            entry = rng.choice(doc.kv)
            key, t, v = entry
            if t == ARRAY and v[1] and rng.random() < 0.6:
                it, items = v
                items = list(items)
                i = rng.randrange(len(items))
                op = rng.random()
                if op < 0.4:
                    items[i] = self._gguf_value(it, items[i], rng)
                elif op < 0.6:
                    del items[i:i + 1 if rng.random() < 0.7 else len(items)]
                elif op < 0.8:
                    items.insert(i, rng.choice(items))
                else:
                    j = rng.randrange(len(items))
                    items[i], items[j] = items[j], items[i]
                entry[2] = (it, items)
            elif rng.random() < 0.3:  # another type under the same key
                entry[1] = rng.choice((*_FORMATS, STRING, ARRAY, rng.randint(13, 40)))
                entry[2] = self._gguf_value(entry[1], v, rng)
            else:
                entry[2] = self._gguf_value(t, v, rng)
        elif r < 0.4 and doc.kv:
            i = rng.randrange(len(doc.kv))
            if rng.random() < 0.5:
                del doc.kv[i]
            else:
                doc.kv.insert(rng.randrange(len(doc.kv)), list(doc.kv[i]))
        elif r < 0.45:
            other = self._doc(rng.choice(self.seeds))  # keys of another seed, e.g. an architecture's
            if other.kv:
                doc.kv.append(list(rng.choice(other.kv)))
        elif r < 0.75 and doc.tensors:
            t = rng.choice(doc.tensors)
            op = rng.random()
            if op < 0.35 and t[1]:
                i = rng.randrange(len(t[1]))
                t[1][i] = boundary_int(rng, t[1][i]) % 2**64
            elif op < 0.45:
                t[1] = t[1][:-1] if t[1] and rng.random() < 0.5 else t[1] + [rng.choice((1, 2, 32))]
            elif op < 0.65:
                t[2] = rng.randint(0, 40)
            elif op < 0.85:
                t[3] = boundary_int(rng, t[3]) % 2**64
            elif op < 0.93:
                t[0] = rng.choice(doc.tensors)[0]
            else:
                doc.tensors.remove(t)
        elif r < 0.8:
            doc.version = rng.choice((1, 2, 3, 4, 2**32 - 1))
        elif r < 0.9:
            align = rng.choice((0, 1, 3, 8, 64, 4096, 2**31, -1, 2.0, "32"))
            doc.kv = [e for e in doc.kv if e[0] != "general.alignment"]
            doc.kv.append(["general.alignment", 4 if isinstance(align, int) else 6 if isinstance(align, float) else 8,
                           align])
            if isinstance(align, int) and 0 < align < 1 << 16:
                doc.align = align
        else:
            cut = rng.randrange(len(doc.data) + 1)
            doc.data = doc.data[:cut]
        return encode_gguf(doc)

    @staticmethod
    def _gguf_value(t, v, rng):
        if t == STRING:
            return rng.choice(("", " ", "a b", "gpt2", "llama", "qwen2", "smollm", "<|im_end|>", "Ġ t", "x" * 1000,
                               b"\xff\xfe", b"a\x00b", v if isinstance(v, str) else "", (v or "")[::-1]
                               if isinstance(v, str) else "z"))
        if t == ARRAY:
            it = v[0] if isinstance(v, tuple) else rng.choice((4, STRING, ARRAY))
            return (it, [] if rng.random() < 0.5 else [Mutator._gguf_value(it, None, rng)
                                                        for _ in range(rng.randint(1, 4))])
        if t in (6, 12):
            return rng.choice((0.0, -1.0, 1e-30, 3.4e38, float("inf"), float("nan"), 1e300))
        if t == 7:
            return rng.random() < 0.5
        return boundary_int(rng, v if isinstance(v, int) else None)

    def _safetensors(self, data: bytes, rng) -> bytes:
        header, body = split_safetensors(data)
        if rng.random() < 0.85:
            header = mutate_json(header, rng)
        else:
            cut = rng.randrange(len(body) + 1)
            body = body[:cut] if rng.random() < 0.5 else body + bytes(rng.randint(1, 256))
        return join_safetensors(header, body)

    def _folder(self, data: bytes, rng) -> bytes:
        files = unpack_folder(data)
        r = rng.random()
        if not files or r < 0.08:
            files[rng.choice(HF_FILES)] = rng.choice(list(files.values()) or [b"{}"])
        elif r < 0.15:
            del files[rng.choice(list(files))]
        else:
            name = rng.choice(list(files))
            body = files[name]
            if name.endswith(".safetensors"):
                body = self._safetensors(body, rng)
            elif name.endswith(".json") and rng.random() < 0.85:
                body = dump_json(mutate_json(json.loads(body), rng)).encode("utf-8", "surrogateescape")
            else:
                body = self._bytes(body, rng, [])
            files[name] = body
        return pack_folder(files)

    # byte edits; fields: (offset, width) of integers worth overwriting
    def _bytes(self, data: bytes, rng, fields: list) -> bytes:
        b = bytearray(data)
        r = rng.random()
        if fields and r < 0.5:
            at, width = rng.choice(fields)
            old = int.from_bytes(b[at:at + width], "little")
            b[at:at + width] = (boundary_int(rng, old) % 2 ** (8 * width)).to_bytes(width, "little")
        elif not b or r < 0.6:
            at = rng.randrange(len(b) + 1)
            b[at:at] = rng.randbytes(rng.randint(1, 16))
        elif r < 0.7:
            at, width = rng.randrange(len(b)), rng.choice((1, 2, 4, 8))
            b[at:at + width] = (boundary_int(rng) % 2 ** (8 * width)).to_bytes(width, "little")
        elif r < 0.78:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif r < 0.84:
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        elif r < 0.9:
            at = rng.randrange(len(b))
            del b[at:at + rng.randint(1, 64)]
        elif r < 0.95:
            del b[rng.randrange(len(b) + 1):]
        else:  # splice: this input's head with another seed's tail
            other = rng.choice(self.seeds)
            b = b[:rng.randrange(len(b) + 1)] + other[rng.randrange(len(other) + 1):]
        return bytes(b)
