"""Files whose sizes lie, read under an address-space limit: python -m tests.fuzz.lying [--memory-mb 300].

Each case claims far more than any machine holds (2^40 tensor elements, 2^62
strings or bytes, a 2^62-byte header, 2^60 metadata entries) in a file of a few
KB; a reader must refuse it from the file's size, before it allocates anything.
The process first caps its address space at what it maps now plus --memory-mb, and
checks the cap bites (a 1 GiB allocation fails), then prints one JSON object:
{case: [exception type, message]}.
"""
from __future__ import annotations

import argparse
import json
import struct

from .mutate import (ARRAY, STRING, decode_gguf, encode_gguf, join_safetensors, pack_folder, split_safetensors,
                     unpack_folder)
from .run import CORPUS, limit_memory

HUGE_ELEMENTS = [2**20, 2**20]  # 2^40 float32: 4 TiB


def _gguf_header(n_tensors: int, n_kv: int, rest: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + rest


def _key(name: str, vtype: int) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", vtype)


def cases() -> dict[str, tuple[str, bytes]]:
    """{case: (target name, input)}; the inputs start from the corpus seeds."""
    gguf = (CORPUS / "gguf" / "seed-tiny-llama-q8_0.gguf").read_bytes()
    doc = decode_gguf(gguf)
    for t in doc.tensors:
        if t[0] == "token_embd.weight":
            t[1], t[2] = list(HUGE_ELEMENTS), 0  # F32
    huge_tensor = encode_gguf(doc)
    strings = _gguf_header(0, 1, _key("tokenizer.ggml.tokens", ARRAY) + struct.pack("<IQ", STRING, 2**62))
    numbers = _gguf_header(0, 1, _key("tokenizer.ggml.token_type", ARRAY) + struct.pack("<IQ", 5, 2**62))
    nested = _gguf_header(0, 1, _key("a", ARRAY) + struct.pack("<IQ", ARRAY, 1) * 20000)
    long_string = _gguf_header(0, 1, struct.pack("<Q", 2**62) + b"key" * 64)

    qfile = (CORPUS / "qfile" / "seed-llama-rtn3.lut.safetensors").read_bytes()
    header, body = split_safetensors(qfile)
    name = next(n for n in header if n.endswith(".planes"))
    header[name] = {"dtype": "U8", "shape": HUGE_ELEMENTS, "data_offsets": [0, 2**40]}
    q_huge = join_safetensors(header, body)
    q_long = (2**62).to_bytes(8, "little") + qfile[8:]

    folder = unpack_folder((CORPUS / "hf" / "seed-tiny-llama-float16.hf").read_bytes())
    st_header, st_body = split_safetensors(folder["model.safetensors"])
    st_header["model.embed_tokens.weight"] = {"dtype": "F32", "shape": HUGE_ELEMENTS, "data_offsets": [0, 2**42]}
    return {
        "gguf tensor of 2^40 elements": ("gguf", huge_tensor),
        "gguf 2^60 metadata entries": ("gguf", _gguf_header(0, 2**60)),
        "gguf 2^60 tensors": ("gguf", _gguf_header(2**60, 0)),
        "gguf key of 2^62 bytes": ("gguf", long_string),
        "gguf array of 2^62 strings": ("gguf_tokenizer", strings),
        "gguf array of 2^62 int32": ("gguf_tokenizer", numbers),
        "gguf arrays nested 20000 deep": ("gguf_tokenizer", nested),
        "qfile header of 2^62 bytes": ("qfile", q_long),
        "qfile tensor of 2^40 elements": ("qfile", q_huge),
        "hf safetensors header of 2^62 bytes": ("hf", pack_folder(
            {**folder, "model.safetensors": (2**62).to_bytes(8, "little") + folder["model.safetensors"][8:]})),
        "hf tensor of 2^40 elements": ("hf", pack_folder(
            {**folder, "model.safetensors": join_safetensors(st_header, st_body, 8)})),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.lying", description=__doc__.splitlines()[0])
    p.add_argument("--memory-mb", type=int, default=300)
    a = p.parse_args(argv)
    from .targets import TARGETS  # everything imported before the cap is taken

    inputs = cases()
    limit_memory(a.memory_mb)
    out = {}
    try:
        bytearray(1 << 30)
        out["control: 1 GiB allocation"] = ["none", "the address-space limit did not bite"]
    except MemoryError:
        out["control: 1 GiB allocation"] = ["MemoryError", ""]
    for case, (target, data) in inputs.items():
        try:
            TARGETS[target].run(data)
            out[case] = ["none", "loaded"]
        except BaseException as e:  # reported, not raised: the test reads them all
            out[case] = [type(e).__name__, str(e)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
