"""The fuzzers (issue 31): a short seeded campaign per reader, the inputs they found, lying sizes.

The long runs are `python -m tests.fuzz.run --target T --inputs 100000`; here each
target runs 2,000 deterministic inputs in a subprocess (under the runner's
address-space limit, so a stray allocation cannot take the test process with it).
"""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.config import ModelError

from . import run
from .mutate import ARRAY, STRING, Mutator, decode_gguf, encode_gguf, join_safetensors, split_safetensors
from .targets import TARGETS, Target, outcome

ROOT = Path(__file__).resolve().parents[2]
SHORT_RUN = 2000

# Inputs the fuzzers found, kept in the corpus (so every campaign replays them first): the
# one-line error each must now give. Before the fixes each raised what its comment says.
FOUND = {
    "qfile/regress-deep-json-header.lut.safetensors":  # RecursionError
        r"header is not valid JSON \(maximum recursion depth",
    "qfile/regress-infinite-dim.lut.safetensors":  # OverflowError: int(inf)
        r"tensor lm_head\.weight\.scales: malformed header entry",
    "qfile/regress-float-dim-1e308.lut.safetensors":  # OverflowError: a 1e308 dimension in np.prod
        r"tensor lm_head\.weight\.planes: malformed header entry",
    "hf/regress-deep-json-config.hf":  # RecursionError in read_json
        r"config\.json: not valid JSON \(maximum recursion depth",
    "hf/regress-deep-json-safetensors.hf":  # RecursionError
        r"model\.safetensors: safetensors header is not valid JSON \(maximum recursion depth",
    "hf/regress-special-token-int.hf":  # TypeError from tokenizers' token_to_id
        r"tokenizer_config\.json: special token '3' is not a string",
    "hf/regress-nan-size.hf":  # ValueError: int(nan)
        r"config\.json: intermediate_size is 'nan', expected a positive integer",
    "hf/regress-weight-map-dict.hf":  # TypeError: unhashable dict
        r"model\.safetensors\.index\.json: weight_map names something other than files beside it",
    "hf/regress-weight-map-float.hf":  # TypeError: sorting str and float
        r"model\.safetensors\.index\.json: weight_map names something other than files beside it",
    "gguf/regress-newline-tensor-name.gguf":  # a ModelError of 2 lines: the name quoted raw
        r"tensor name 'blk\.19\.ffn_down%\{\\n\}\\x7f\|!' holds control characters",
    "hf/regress-tokenizer-load-panics.hf":  # PanicException (a BaseException) from tokenizers' from_file
        r"tokenizer\.json: cannot load tokenizer \(range end index 18446744073709551615 out of range",
    "hf/regress-shard-name-too-long.hf":  # OSError ENAMETOOLONG from Path.is_file
        r"model\.safetensors\.index\.json: shard 'a{80}': File name too long",
    "hf/regress-tokenizer-panics.hf":  # PanicException from tokenizers' TemplateProcessing on first encode
        r"tokenizer\.json: the tokenizer loads but cannot encode text \(no entry found for key\)",
}


def test_runner_names_every_target():
    assert run.NAMES == tuple(TARGETS)


@pytest.mark.parametrize("target", run.NAMES)
def test_short_campaign(target, tmp_path):
    """Every seed, then mutations of them: each input loads or gives a one-line ModelError."""
    cmd = [sys.executable, "-m", "tests.fuzz.run", "--target", target, "--inputs", str(SHORT_RUN), "--seed", "0",
           "--crashes", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert summary["inputs"] == SHORT_RUN
    assert summary["failures"] == 0 and proc.returncode == 0, "\n".join(fails[:20])


@pytest.mark.parametrize("case", sorted(FOUND))
def test_found_inputs_are_refused_by_name(case):
    target = TARGETS[case.split("/")[0]]
    data = (run.CORPUS / case).read_bytes()
    assert outcome(target, data) is None
    with pytest.raises(ModelError, match=FOUND[case]):
        target.run(data)


def test_every_kept_input_has_its_test():
    kept = {f"{p.parent.name}/{p.name}" for p in run.CORPUS.glob("*/regress-*")}
    assert kept == set(FOUND)


@pytest.mark.parametrize("target", run.NAMES)
def test_seeds_load(target):
    """The seeds are real files that load (a corpus of refusals would not get past the first checks);
    the catalog headers keep only a few KB of tensor data, so they stop at the first tensor."""
    for path in sorted((run.CORPUS / target).glob("seed-*")):
        if "catalog" in path.name and target == "gguf":
            with pytest.raises(ModelError, match="data ends at byte .* beyond the end of the file"):
                TARGETS[target].run(path.read_bytes())
        else:
            TARGETS[target].run(path.read_bytes())


# --- the lying-size rule: refused before anything is allocated -----------------------------------

def test_lying_sizes_are_refused_under_a_low_address_space_limit():
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz.lying", "--memory-mb", "300"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert results.pop("control: 1 GiB allocation")[0] == "MemoryError"  # the limit bites
    expect = {
        "gguf tensor of 2^40 elements": r"tensor token_embd\.weight data ends at byte 4398046516704, beyond the end",
        "gguf 2^60 metadata entries": r"1152921504606846976 metadata entries claimed",
        "gguf 2^60 tensors": r"1152921504606846976 tensors claimed",
        "gguf key of 2^62 bytes": r"4611686018427387904 bytes needed at byte 32",
        "gguf array of 2^62 strings": r"4611686018427387904 array items claimed",
        "gguf array of 2^62 int32": r"4611686018427387904 array items claimed",
        "gguf arrays nested 20000 deep": r"arrays nested deeper than 4",
        "qfile header of 2^62 bytes": r"header length 4611686018427387904 does not fit",
        "qfile tensor of 2^40 elements": r"disagree with U8 \[1048576, 1048576\]",
        "hf safetensors header of 2^62 bytes": r"header length 4611686018427387904 goes beyond the end",
        "hf tensor of 2^40 elements": r"data offsets \[0, 4398046511104\] are out of order or beyond",
    }
    assert results.keys() == expect.keys()
    for case, (kind, msg) in results.items():
        assert kind == "ModelError" and re.search(expect[case], msg) and "\n" not in msg, (case, kind, msg)


# --- inputs made by hand for what reading the loaders showed --------------------------------------

def _gguf_edit(seed: str, **kv) -> bytes:
    """A corpus GGUF with metadata values replaced: key=(GGUF value type, value)."""
    doc = decode_gguf((run.CORPUS / seed).read_bytes())
    for key, (vtype, value) in kv.items():
        key = key.replace("__", ".")
        doc.kv = [e for e in doc.kv if e[0] != key] + [[key, vtype, value]]
    return encode_gguf(doc)


MODEL, TOKENIZER = "gguf/seed-tiny-llama-q8_0.gguf", "gguf_tokenizer/seed-tiny-llama-q8_0-tokenizer.gguf"
UINT32, INT32, FLOAT32 = 4, 5, 6
BY_HAND = {  # case: (target, input, error); each raised something else before (comment)
    "zero heads": ("gguf", _gguf_edit(MODEL, llama__attention__head_count=(UINT32, 0)),  # ZeroDivisionError
                   r"llama\.attention\.head_count is '0', expected a positive integer"),
    "NaN layer count": ("gguf", _gguf_edit(MODEL, llama__block_count=(FLOAT32, float("nan"))),  # ValueError
                        r"llama\.block_count is 'nan', expected a positive integer"),
    "2^31 layers": ("gguf", _gguf_edit(MODEL, llama__block_count=(UINT32, 2**31)),  # ran 2^31 x 11 shapes
                    r"2147483648 layers need at least 19327352832 tensors, the file has 11"),
    "odd head size": ("gguf", _gguf_edit(MODEL, llama__attention__key_length=(UINT32, 15),  # numpy reshape
                                         llama__embedding_length=(UINT32, 30)),
                      r"need a whole number of heads per group and an even head size"),
    "integer tokens": ("gguf_tokenizer", _gguf_edit(TOKENIZER, tokenizer__ggml__tokens=(ARRAY, (INT32, [1, 2]))),
                       r"tokenizer\.ggml\.tokens is not a list of str"),  # TypeError from tokenizers
    "list pre-tokenizer": ("gguf_tokenizer", _gguf_edit(TOKENIZER, tokenizer__ggml__pre=(ARRAY, (STRING, ["a"]))),
                           r"unsupported pre-tokenizer"),  # TypeError: unhashable list
    "short token types": ("gguf_tokenizer", _gguf_edit(TOKENIZER, tokenizer__ggml__token_type=(ARRAY, (INT32, [1]))),
                          r"1 token types for 267 tokens"),  # IndexError
    "list chat template": ("gguf_tokenizer", _gguf_edit(TOKENIZER, tokenizer__chat_template=(ARRAY, (STRING, []))),
                           r"tokenizer\.chat_template is not a string"),  # a list handed to jinja later
}


def _qfile_edit(edit) -> bytes:
    header, body = split_safetensors((run.CORPUS / "qfile/seed-llama-rtn3.lut.safetensors").read_bytes())
    meta = json.loads(header["__metadata__"]["lutengine"])
    edit(meta)
    header["__metadata__"]["lutengine"] = json.dumps(meta)
    return join_safetensors(header, body)


BY_HAND.update({
    "qfile eos id not a list": ("qfile", _qfile_edit(lambda m: m.update(eos_ids=7)),  # TypeError
                                r"eos_ids '7' are not ids of the tokenizer's 267 tokens"),
    "qfile list architecture": ("qfile", _qfile_edit(lambda m: m["config"].update(arch=["llama"])),  # TypeError
                                r"unsupported architecture \['llama'\]"),
    "qfile string layer count": ("qfile", _qfile_edit(lambda m: m["config"].update(n_layers="1")),  # TypeError
                                 r"n_layers is '1', expected a positive integer"),
    "qfile float M": ("qfile", _qfile_edit(lambda m: m["tensors"]["lm_head.weight"].update(M=267.0)),  # ran as M
                      r"tensor lm_head\.weight: bad packed-layer metadata \(M must be an integer, got '267\.0'\)"),
})


@pytest.mark.parametrize("case", sorted(BY_HAND))
def test_hand_made_inputs_are_refused_by_name(case):
    target, data, error = BY_HAND[case]
    assert outcome(TARGETS[target], data) is None
    with pytest.raises(ModelError, match=error):
        TARGETS[target].run(data)


def test_a_bos_id_of_the_wrong_type_is_ignored():
    """llama.cpp ignores an id it cannot use; int() of it raised ValueError."""
    from models.gguf_loader import read_gguf
    from models.gguf_tokenizer import tokenizer_from_gguf

    path = Path(TARGETS["gguf_tokenizer"].where())
    path.write_bytes(_gguf_edit(TOKENIZER, tokenizer__ggml__bos_token_id=(STRING, "abc")))
    info = tokenizer_from_gguf(read_gguf(path)[0], path)
    assert info.bos_id is None and not info.add_bos and info.eos_ids == (266, 264)


# --- the harness itself ------------------------------------------------------------------------

def _fake(fn) -> Target:
    return Target("fake", "gguf", fn, lambda: Path("/x/named.gguf"))


def test_outcome_tells_refusals_from_failures():
    def raises(e):
        def fn(data):
            raise e
        return fn

    assert outcome(_fake(lambda d: None), b"") is None
    assert outcome(_fake(raises(ModelError("/x/named.gguf: bad"))), b"") is None
    assert "KeyError" in outcome(_fake(raises(KeyError("k"))), b"")
    assert "MemoryError" in outcome(_fake(raises(MemoryError())), b"")
    assert "RecursionError" in outcome(_fake(raises(RecursionError())), b"")
    assert str(ModelError("/x/named.gguf: a\nb")) == "/x/named.gguf: a\\nb"  # the class keeps one line
    two = ModelError("")
    two.args = ("/x/named.gguf: a\nb",)  # in case a message gets past it
    assert "2 lines" in outcome(_fake(raises(two)), b"")
    assert "not naming /x/named.gguf" in outcome(_fake(raises(ModelError("bad"))), b"")


def test_hangs_are_failures(monkeypatch):
    """A Python loop is interrupted at the limit; a call that returns late is timed."""
    import signal

    monkeypatch.setattr(run, "HANG_S", 0.2)
    old = signal.signal(signal.SIGALRM, run._alarm)
    try:
        def spin(data):
            while True:
                pass

        start = time.perf_counter()
        assert run.check(_fake(spin), b"").startswith("hang")
        assert time.perf_counter() - start < 2
        assert run.check(_fake(lambda d: time.sleep(0.3)), b"", alarm=False).startswith("hang")
        assert run.check(_fake(lambda d: None), b"") is None
    finally:
        signal.signal(signal.SIGALRM, old)


def test_mutator_is_deterministic_and_structure_aware():
    seeds = [p.read_bytes() for p in sorted((run.CORPUS / "gguf").glob("seed-tiny-*"))]
    a, b, c = Mutator("gguf", seeds, 3), Mutator("gguf", seeds, 3), Mutator("gguf", seeds, 4)
    first = [a() for _ in range(200)]
    assert first == [b() for _ in range(200)]
    assert first != [c() for _ in range(200)]
    assert all(len(x) <= 1 << 20 for x in first)
    # most inputs still parse as GGUF: the edits are made on the structure, not only on bytes
    parsed = sum(1 for x in first if _parses(x))
    assert parsed > 100, parsed


def _parses(data: bytes) -> bool:
    try:
        decode_gguf(data)
        return True
    except Exception:
        return False
