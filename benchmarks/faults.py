"""Fault injection for ``edgetune-run`` (issue 13): power cuts and kills during checkpointing,
checkpoint-file corruptions, fuzzed sample streams under AddressSanitizer + UBSan, and a long
continual soak of a real bundle.

    python3 benchmarks/faults.py            # the full benchmark (writes results/faults/faults.{json,md})
    python3 benchmarks/faults.py --quick    # a few hundred cases in seconds (tests/test_faults_quick.py)

Every case has an oracle written here, independently of the C code: the checkpoint slots are read
with ``zlib.crc32`` (the format of targets/runtime/et_ckpt.h) and checked for finite state and sane
counters the way the runtime's boot is specified to; the state a restart must load is the state
an uninterrupted run of the same program committed at that save (a run cut at exactly the end of
that save). Outcomes:

* kills (``--cut-after-bytes=N``: SIGKILL in the middle of a write; random SIGKILL from outside):
  the restart with ``--resume`` loads exactly the newest committed state (``boot_seq`` and the
  ``--state`` file), never a torn one, never an older one;
* corruptions: the restart resumes from the slot the oracle picks, or exits 3 with the reason on
  one stderr line and writes nothing; never a crash, never a silent fresh start;
* fuzzed streams (sanitizer build): exit 0, or exit 1 with one ``edgetune-run: error:`` line;
  0 sanitizer reports;
* soak: RSS flat within 5 %, no NaN loss, late accuracy >= early accuracy - 1 point, counters exact.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
C_DIR = ROOT / "tests" / "c"
OUT_DIR = ROOT / "results" / "faults"
SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else None  # fsync-heavy runs: RAM-backed when there is one

FAKE_IN, FAKE_CLASSES = 16, 4
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g")

# checkpoint format (targets/runtime/et_ckpt.h, et_runtime.h)
CK_MAGIC, CK_VERSION, CK_HEADER = 0x4B435445, 1, 24
META = struct.Struct("<10I")  # et_runtime_meta: step, guard_seen, then the 8 counters
META_NAMES = ("step", "guard_seen", "samples", "rejected", "updates", "restores", "snapshots", "early_exits",
              "labelled", "saves")
WRITE_OVERHEAD = 4 + 20 + 4  # per save besides the payload: magic cleared, header, magic set
STREAM_HEAD = struct.Struct("<4sIIIIIII")


# --- building ------------------------------------------------------------------------------------------
def source_tree(work: Path, rev: str | None) -> Path:
    """Where the C sources are read from: this checkout, or ``git archive rev`` of it (a stable
    snapshot while the working tree is being edited)."""
    if rev is None:
        return ROOT
    out = work / f"src-{rev.replace('/', '_')}"
    if not out.is_dir():
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "targets/runtime", "targets/app", "tests/c"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def build_fake(out: Path, src: Path = ROOT, cc: str = "gcc", extra: tuple[str, ...] = (),
               name: str = "edgetune-run") -> Path:
    """edgetune-run around the hand-written model (tests/c/fake_model.c), built with ``cc`` and the
    runtime's strict flags."""
    from edgetune.targets import RUNTIME_CFLAGS

    runtime, app, c_dir = src / "targets" / "runtime", src / "targets" / "app", src / "tests" / "c"
    out.mkdir(parents=True, exist_ok=True)
    program = out / name
    cmd = [cc, *RUNTIME_CFLAGS, "-O2", *extra, f"-I{runtime}", f"-I{app}", f"-I{c_dir}",
           *map(str, sorted(runtime.glob("*.c"))), str(app / "et_app.c"), str(app / "et_app_linux.c"),
           str(c_dir / "fake_model.c"), str(c_dir / "fake_port.c"), "-lm", "-o", str(program)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"faults: building {name} with {cc} failed:\n{proc.stderr}")
    return program


def build_soak_program(work: Path, method: str = "tinytta", model: str = "tiny-cnn",
                       epochs: int = 8) -> tuple[Path, dict]:
    """A real bundle (``model`` trained on digits, ``method`` fitted and exported), its rpi4 project's
    Makefile built natively (host gcc, the kernels from TVM's C source). Cached in ``work``."""
    program = work / "project" / "build" / "edgetune-run"
    meta_file = work / "soak-build.json"
    if program.is_file() and meta_file.is_file():
        return program, json.loads(meta_file.read_text())
    import copy

    from edgetune.adapt import fit, prepare
    from edgetune.checkpoint import load_checkpoint
    from edgetune.data import load_dataset
    from edgetune.deploy import save_initial_state, write_target_project
    from edgetune.export import export
    from edgetune.train import train_source

    t0 = time.time()
    digits = load_dataset("digits")
    ckpt = work / "source"
    if not (ckpt / "config.json").is_file():
        train_source(model, digits, ckpt, epochs=epochs, progress=False)
    backbone, _ = load_checkpoint(ckpt)
    adaptable = prepare(copy.deepcopy(backbone), method, model_name=model)
    fit(adaptable, digits, progress=False)
    bundle = work / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    export(adaptable, digits, bundle, progress=False)
    save_initial_state(bundle, adaptable.method)
    project = write_target_project(bundle, "rpi4", out_dir=work / "project")
    proc = subprocess.run(["make", "-C", str(project.directory), "CC=gcc", "AR=ar", "ARCH=", "KERNELS=c",
                           "build/edgetune-run"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"faults: building the soak program failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    meta = {"model": model, "method": method, "classes": project.classes, "input_shape": list(project.input_shape),
            "build_seconds": round(time.time() - t0, 1)}
    meta_file.write_text(json.dumps(meta))
    return program, meta


# --- files ---------------------------------------------------------------------------------------------
def stream_bytes(x: np.ndarray, feedback: list[int] | None = None, classes: int = FAKE_CLASSES) -> bytes:
    """A stream file's bytes (the format of edgetune.deploy.streams; zero samples allowed here)."""
    x = np.ascontiguousarray(x, dtype="<f4").reshape(len(x), int(np.prod(x.shape[1:])))
    n, k = x.shape
    rec = np.zeros(n, dtype=[("label", "<i4"), ("flags", "<u4"), ("x", "<f4", (k,))])
    rec["label"] = -1 if feedback is None else feedback
    if n:
        rec["flags"][0] = 1
    rec["x"] = x
    return STREAM_HEAD.pack(b"ETSM", 1, n, k, classes, 8 + 4 * k, 0, 0) + rec.tobytes()


def fake_samples(n: int, seed: int) -> np.ndarray:
    """Four classes in turn, as tests/test_simulate.py streams to the hand-written model."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.25, 0.25, (n, FAKE_IN)).astype(np.float32)
    for i in range(n):
        x[i, i % 4::4] += 1.0
    return x


def seal(raw: bytearray, at: int) -> None:
    """Recompute a slot's CRC (header bytes 4..20 + the payload its length word names)."""
    length = struct.unpack_from("<I", raw, at + 12)[0]
    body = bytes(raw[at + CK_HEADER:at + CK_HEADER + length])
    struct.pack_into("<I", raw, at + 20, zlib.crc32(bytes(raw[at + 4:at + 20]) + body))


@dataclass(frozen=True)
class Slot:
    at: int
    valid: bool  # committed: magic, version, length, layout and CRC
    seq: int = 0
    sane: bool = False  # finite state and consistent counters
    payload: bytes = b""


def read_slot(raw: bytes, k: int, payload: int, layout: int, classes: int) -> Slot:
    at = k * (CK_HEADER + ((payload + 7) & ~7))
    head = raw[at:at + CK_HEADER]
    if len(head) < CK_HEADER or len(raw) < at + CK_HEADER + payload:
        return Slot(at, False)
    magic, version, seq, length, lay, crc = struct.unpack("<6I", head)
    body = raw[at + CK_HEADER:at + CK_HEADER + payload]
    if magic != CK_MAGIC or version != CK_VERSION or length != payload or lay != layout:
        return Slot(at, False)
    if zlib.crc32(head[4:20] + body) != crc:
        return Slot(at, False)
    return Slot(at, True, seq, state_sane(body, classes), body)


def state_sane(body: bytes, classes: int) -> bool:
    """The boot's content check (et_runtime.h): counters consistent, histogram in [0, 1], all floats finite."""
    m = dict(zip(META_NAMES, META.unpack_from(body)))
    if m["guard_seen"] > 0x7FFFFFFF or m["step"] > m["samples"]:
        return False
    if any(m[k] > m["samples"] for k in ("rejected", "updates", "restores", "snapshots", "early_exits", "labelled")):
        return False
    hist = np.frombuffer(body, "<f4", classes, META.size)
    if not np.isfinite(hist).all() or (hist < 0).any() or (hist > 1.0001).any():
        return False
    rest = body[META.size + 4 * classes:]
    return bool(np.isfinite(np.frombuffer(rest[:len(rest) // 4 * 4], "<f4")).all())


def expected_boot(raw: bytes, payload: int, layout: int, classes: int = FAKE_CLASSES) -> tuple[str, Slot | None]:
    """What a resume must do with this file: ("resume", slot) | ("no valid slot", None) | ("non-finite", None)."""
    s = [read_slot(raw, k, payload, layout, classes) for k in (0, 1)]
    valid = [x for x in s if x.valid]
    if len(valid) == 2:  # serial-number order, as the runtime (survives the 32-bit wrap)
        d = (s[1].seq - s[0].seq) & 0xFFFFFFFF
        valid = [s[1], s[0]] if 0 < d < 0x80000000 else [s[0], s[1]]
    for x in valid:
        if x.sane:
            return "resume", x
    return ("non-finite", None) if valid else ("no valid slot", None)


REASONS = {"no valid slot": "no valid slot", "non-finite": "non-finite state or inconsistent counters"}


# --- running -------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """Cases and failures of one family; failures keep a few examples for the report."""
    cases: int = 0
    kinds: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    kind_failures: Counter = field(default_factory=Counter)  # "kind: failure"
    examples: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, outcome: str, failure: str | None = None, detail: str = "") -> None:
        with self.lock:
            self.cases += 1
            self.kinds[kind] += 1
            self.outcomes[outcome] += 1
            if failure is not None:
                self.failures[failure] += 1
                self.kind_failures[f"{kind}: {failure}"] += 1
                if len(self.examples) < 12:
                    self.examples.append({"kind": kind, "failure": failure, "detail": detail[:600]})

    def to_json(self) -> dict:
        return {"cases": self.cases, "kinds": dict(self.kinds), "outcomes": dict(self.outcomes),
                "failures": dict(self.failures),
                "kind_failures": dict(self.kind_failures), "examples": self.examples}


class Runner:
    """One build of edgetune-run (native or under an emulator) and the stream files it is fed."""

    def __init__(self, program: Path, work: Path, prefix: tuple[str, ...] = ()) -> None:
        self.program, self.work, self.prefix = program, work, prefix
        self.zero = work / "zero.bin"  # no samples: a resume loads, saves once and writes the loaded state
        self.zero.write_bytes(stream_bytes(np.zeros((0, FAKE_IN), np.float32)))

    def run(self, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, str(self.program), *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)

    def resume(self, cwd: Path) -> subprocess.CompletedProcess:
        return self.run(cwd, str(self.zero), "--checkpoint=ck.bin", "--resume", "--state=st.bin",
                        "--summary=sum.json", "--results=r.bin")


def summary_of(proc: subprocess.CompletedProcess) -> dict | None:
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except json.JSONDecodeError:
        return None


def check_resume(proc: subprocess.CompletedProcess, cwd: Path, want: Slot, classes: int = FAKE_CLASSES) -> str | None:
    """None when the restart loaded exactly ``want`` (sequence number, counters and state), else the failure."""
    if proc.returncode < 0 or proc.returncode not in (0, 3):
        return "crash"
    if proc.returncode == 3:
        return "committed state lost (refused)"
    s = summary_of(proc)
    if s is None:
        return "no summary"
    if not s.get("resumed"):
        return "silent fresh start"
    if s["boot_seq"] != want.seq:
        return "wrong slot loaded" if s["boot_seq"] > want.seq else "committed state lost (older loaded)"
    meta = dict(zip(META_NAMES, META.unpack_from(want.payload)))
    if any(s[k] != meta[k] for k in ("samples", "rejected", "updates", "labelled")):
        return "counters differ from the committed ones"
    state = (cwd / "st.bin").read_bytes() if (cwd / "st.bin").is_file() else b""
    if state != want.payload[META.size + 4 * classes:]:
        return "state differs from the committed one"
    return None


def check_refusal(proc: subprocess.CompletedProcess, cwd: Path, reason: str, before: bytes) -> str | None:
    if proc.returncode < 0 or proc.returncode not in (0, 3):
        return "crash"
    if proc.returncode == 0:
        s = summary_of(proc)
        return "silent fresh start" if s is not None and not s.get("resumed") else "resumed an unusable file"
    err = proc.stderr.strip().splitlines()
    if len(err) != 1 or REASONS[reason] not in err[0] or "--fresh-ok" not in err[0]:
        return "unreported or wrong reason"
    if (cwd / "ck.bin").read_bytes() != before or any((cwd / f).exists() for f in ("st.bin", "r.bin", "sum.json")):
        return "wrote something"
    return None


def fresh_dir(base: Path, name: str) -> Path:
    d = base / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


# --- kills and torn writes during checkpointing -----------------------------------------------------------
class KillSetup:
    """A committed checkpoint, a continuation run resuming from it, and the state each save of that
    run commits (found lazily: a run cut at exactly the end of save c holds save c as its newest slot)."""

    def __init__(self, r: Runner, base: Path, pristine: bytes | None = None, n: int = 120, every: int = 2) -> None:
        d = fresh_dir(base, "setup")
        (d / "a.bin").write_bytes(stream_bytes(fake_samples(40, 1)))
        (base / "b.bin").write_bytes(stream_bytes(fake_samples(n, 2)))
        proc = r.run(d, "a.bin", "--checkpoint=ck.bin", "--save-every=10")
        first = summary_of(proc)
        assert first is not None, proc.stdout + proc.stderr
        self.r, self.base = r, base
        self.payload = first["payload_bytes"]
        raw = (d / "ck.bin").read_bytes()
        self.layout = struct.unpack_from("<I", raw, 16)[0]
        self.pristine = raw if pristine is None else pristine
        self.args = (str(base / "b.bin"), "--checkpoint=ck.bin", "--resume", f"--save-every={every}")
        (d / "ck.bin").write_bytes(self.pristine)
        t0 = time.monotonic()
        whole = summary_of(r.run(d, *self.args))
        self.seconds = time.monotonic() - t0
        assert whole is not None and whole["resumed"], "the continuation must resume from the pristine file"
        boot = expected_boot(self.pristine, self.payload, self.layout)[1]
        assert boot is not None and boot.seq == whole["boot_seq"]
        self.saves = whole["saves"] - dict(zip(META_NAMES, META.unpack_from(boot.payload)))["saves"]
        last = expected_boot((d / "ck.bin").read_bytes(), self.payload, self.layout)[1]
        assert last is not None
        self.refs: dict[int, Slot] = {0: boot, self.saves: last}
        self.lock = threading.Lock()

    @property
    def save_bytes(self) -> int:
        return self.payload + WRITE_OVERHEAD

    def ref(self, c: int) -> Slot:
        """What is committed after ``c`` complete saves of the continuation (0: what its boot loads)."""
        with self.lock:
            if c in self.refs:
                return self.refs[c]
        cd = Path(tempfile.mkdtemp(dir=self.base))
        (cd / "ck.bin").write_bytes(self.pristine)
        proc = self.r.run(cd, *self.args, f"--cut-after-bytes={c * self.save_bytes}")
        assert proc.returncode == -signal.SIGKILL, (c, proc.returncode, proc.stdout)
        slot = expected_boot((cd / "ck.bin").read_bytes(), self.payload, self.layout)[1]
        shutil.rmtree(cd)
        assert slot is not None
        with self.lock:
            self.refs[c] = slot
        return slot


def cut_trial(r: Runner, s: KillSetup, d: Path, budget: int, tally: Tally, kind: str) -> None:
    """Kill at byte ``budget`` of the continuation's checkpoint writes, then restart with --resume."""
    (d / "ck.bin").write_bytes(s.pristine)
    proc = r.run(d, *s.args, f"--cut-after-bytes={budget}")
    if proc.returncode != -signal.SIGKILL or "CUT" not in proc.stdout:
        tally.add(kind, "not killed", "cut did not happen", f"rc {proc.returncode} {proc.stdout[-300:]}")
        return
    want = s.ref(budget // s.save_bytes)
    torn = budget % s.save_bytes
    oracle = expected_boot((d / "ck.bin").read_bytes(), s.payload, s.layout)[1]
    proc = r.resume(d)
    failure = check_resume(proc, d, want)
    if failure is None and (oracle is None or oracle.seq != want.seq):
        failure = "file disagrees with the slot format"
    tally.add(kind, "torn mid-save" if torn else "cut between saves", failure,
              f"budget {budget} (save {budget // s.save_bytes} + {torn} B): rc {proc.returncode} "
              f"{proc.stdout[-200:]} {proc.stderr[-300:]}")


def external_kill_trial(r: Runner, s: KillSetup, d: Path, rng: random.Random, tally: Tally, kind: str) -> None:
    """SIGKILL from outside at a random time of the continuation, then restart with --resume: the
    restart loads the newest slot on disk, and that slot is one an uninterrupted run committed."""
    (d / "ck.bin").write_bytes(s.pristine)
    p = subprocess.Popen([*r.prefix, str(r.program), *s.args], cwd=d, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.0, s.seconds * 0.9))  # mostly while it runs; a few land after it finished
    killed = p.poll() is None
    if killed:
        p.send_signal(signal.SIGKILL)
    p.wait()
    oracle = expected_boot((d / "ck.bin").read_bytes(), s.payload, s.layout)[1]
    c = None if oracle is None else (oracle.seq - s.ref(0).seq) & 0xFFFFFFFF
    want = s.ref(c) if c is not None and c <= s.saves else None
    if oracle is None or want is None or want.seq != oracle.seq or want.payload != oracle.payload:
        tally.add(kind, "killed" if killed else "finished", "committed state lost or torn state committed",
                  f"slot on disk: {oracle}")
        return
    proc = r.resume(d)
    tally.add(kind, "killed" if killed else "finished", check_resume(proc, d, want),
              f"rc {proc.returncode} {proc.stdout[-200:]} {proc.stderr[-300:]}")


def poison_newest(raw: bytes, payload: int, layout: int) -> bytes:
    """The newest slot's first weight set to NaN, CRC re-sealed (a diverged model's save)."""
    out = bytearray(raw)
    newest = expected_boot(raw, payload, layout)[1]
    assert newest is not None
    struct.pack_into("<f", out, newest.at + CK_HEADER + META.size + 4 * FAKE_CLASSES, float("nan"))
    seal(out, newest.at)
    return bytes(out)


def kill_bench(r: Runner, base: Path, n_cut: int, n_external: int, n_fallback: int, seed: int,
               workers: int = 2) -> dict:
    """Cuts at random bytes of a continuation's checkpoint writes, SIGKILLs at random times of a
    longer one (a save after every sample), and cuts in the first saves after a fallback resume."""
    rng = random.Random(seed)
    s = KillSetup(r, base / "cut")
    ext = KillSetup(r, base / "external", n=1500, every=1) if n_external else None
    # a resume that fell back from a non-finite newest slot to the older one, then a cut in its saves
    fb = KillSetup(r, base / "fallback", pristine=poison_newest(s.pristine, s.payload, s.layout)) \
        if n_fallback else None
    jobs = [("cut", rng.randrange(1, s.saves * s.save_bytes)) for _ in range(n_cut)]
    jobs += [("external", 0)] * n_external
    jobs += [("after fallback", rng.randrange(1, 3 * s.save_bytes)) for _ in range(n_fallback)]
    seeds = [rng.random() for _ in jobs]
    tally = Tally()

    def one(i: int) -> None:
        kind, budget = jobs[i]
        d = fresh_dir(base, f"t{i}")
        if kind == "cut":
            cut_trial(r, s, d, budget, tally, kind)
        elif kind == "external":
            assert ext is not None
            external_kill_trial(r, ext, d, random.Random(seeds[i]), tally, kind)
        else:
            assert fb is not None
            cut_trial(r, fb, d, budget, tally, kind)
        shutil.rmtree(d)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(jobs))))
    out = tally.to_json()
    out.update({"saves_per_cut_run": s.saves, "payload_bytes": s.payload, "cut_run_seconds": round(s.seconds, 3),
                "external_run_seconds": round(ext.seconds, 3) if ext else None})
    return out


# --- checkpoint-file corruptions ----------------------------------------------------------------------------
def foreign_file(rng: random.Random, payload: int) -> bytes:
    """Another model's checkpoint: two committed slots of another payload length and layout id."""
    other = rng.choice([p for p in (8 * rng.randrange(8, 200), payload + 8, payload - 8) if p != payload])
    size = CK_HEADER + ((other + 7) & ~7)
    raw = bytearray(2 * size)
    for k in (0, 1):
        struct.pack_into("<6I", raw, k * size, CK_MAGIC, CK_VERSION, k + 1, other, rng.getrandbits(32), 0)
        raw[k * size + CK_HEADER:k * size + CK_HEADER + other] = np.zeros(other // 4, "<f4").tobytes()
        seal(raw, k * size)
    return bytes(raw)


def corrupt(raw: bytes, kind: str, rng: random.Random, payload: int, classes: int = FAKE_CLASSES) -> bytes:
    """One damaged copy of a checkpoint file (``kind`` from CORRUPTIONS)."""
    out = bytearray(raw)
    size = CK_HEADER + ((payload + 7) & ~7)
    slots = [k * size for k in rng.choice(([0], [1], [0, 1]))]
    floats = (payload - META.size) // 4  # histogram + model state
    if kind == "bit flips":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
    elif kind == "header bit flip":
        at = rng.choice(slots)
        i = at + rng.randrange(CK_HEADER)
        out[i] ^= 1 << rng.randrange(8)
    elif kind == "truncation":
        out = out[:rng.randrange(len(out))]
    elif kind == "zeroed range":
        i = rng.randrange(len(out))
        n = len(out[i:i + rng.randint(1, 256)])
        out[i:i + n] = bytes(n)
    elif kind == "zeroed file":
        out = bytearray(len(out) if rng.random() < 0.5 else rng.randrange(0, 2 * len(out)))
    elif kind == "garbage":
        i = rng.randrange(len(out))
        n = rng.randint(1, 64)
        out[i:i + n] = bytes(rng.getrandbits(8) for _ in range(len(out[i:i + n])))
    elif kind == "foreign layout (re-sealed)":
        for at in slots:
            struct.pack_into("<I", out, at + 16, rng.getrandbits(32))
            seal(out, at)
    elif kind == "another model's file":
        out = bytearray(foreign_file(rng, payload))
    elif kind == "non-finite state (re-sealed)":
        for at in slots:
            i = rng.randrange(floats)
            struct.pack_into("<f", out, at + CK_HEADER + META.size + 4 * i,
                             rng.choice([float("nan"), float("inf"), float("-inf")]))
            seal(out, at)
    elif kind == "bad metadata (re-sealed)":
        for at in slots:
            body = at + CK_HEADER
            meta = list(META.unpack_from(out, body))
            what = rng.choice(("counter", "step", "guard_seen", "histogram"))
            if what == "counter":
                k = rng.choice((3, 4, 5, 6, 7, 8))
                meta[k] = meta[2] + rng.randint(1, 1 << 20)
            elif what == "step":
                meta[0] = meta[2] + rng.randint(1, 1000)
            elif what == "guard_seen":
                meta[1] = rng.randint(0x80000000, 0xFFFFFFFF)
            META.pack_into(out, body, *meta)
            if what == "histogram":
                struct.pack_into("<f", out, body + META.size + 4 * rng.randrange(classes),
                                 rng.choice([-0.5, 1.5, 1e30]))
            seal(out, at)
    elif kind == "sequence numbers (re-sealed)":
        base = rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF])
        for k, at in enumerate((0, size)):
            struct.pack_into("<I", out, at + 8, (base + rng.choice([0, k, -k, 2 * k])) & 0xFFFFFFFF)
            seal(out, at)
    else:
        raise ValueError(kind)
    return bytes(out)


CORRUPTIONS = ("bit flips", "header bit flip", "truncation", "zeroed range", "zeroed file", "garbage",
               "foreign layout (re-sealed)", "another model's file", "non-finite state (re-sealed)",
               "bad metadata (re-sealed)", "sequence numbers (re-sealed)")


def corruption_bench(r: Runner, base: Path, n: int, seed: int, workers: int = 2) -> dict:
    """``n`` damaged checkpoint files, each restarted with --resume: it resumes from the slot the
    oracle picks (same sequence number, counters and state) or exits 3 with the reason."""
    rng = random.Random(seed)
    bases = []
    for i, (count, every) in enumerate(((40, 10), (50, 10), (33, 7))):  # the newest slot is A or B
        d = fresh_dir(base, f"base{i}")
        (d / "a.bin").write_bytes(stream_bytes(fake_samples(count, 10 + i)))
        proc = r.run(d, "a.bin", "--checkpoint=ck.bin", f"--save-every={every}")
        s = summary_of(proc)
        assert s is not None, proc.stdout + proc.stderr
        raw = (d / "ck.bin").read_bytes()
        bases.append((raw, s["payload_bytes"], struct.unpack_from("<I", raw, 16)[0]))
    jobs = [(rng.choice(CORRUPTIONS), rng.randrange(len(bases)), rng.random()) for _ in range(n)]
    tally = Tally()

    def one(i: int) -> None:
        kind, b, s = jobs[i]
        raw, payload, layout = bases[b]
        damaged = corrupt(raw, kind, random.Random(s), payload)
        d = fresh_dir(base, f"c{i}")
        (d / "ck.bin").write_bytes(damaged)
        verdict, slot = expected_boot(damaged, payload, layout)
        proc = r.resume(d)
        if verdict == "resume":
            assert slot is not None
            failure = check_resume(proc, d, slot)
            outcome = "resumed (newest)" if slot.seq == expected_boot(raw, payload, layout)[1].seq else \
                "resumed (fallback slot)"
        else:
            failure = check_refusal(proc, d, verdict, damaged)
            outcome = f"refused: {verdict}"
        tally.add(kind, outcome, failure, f"rc {proc.returncode} {proc.stdout[-200:]} {proc.stderr[-300:]}")
        shutil.rmtree(d)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))
    return tally.to_json()


# --- fuzzed sample streams on a sanitizer build ---------------------------------------------------------
SPECIAL = np.array([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, -0.0, 1e20, -1e20], np.float32)
LABELS = (-1, -1, -1, 0, 1, 2, 3, 4, 99, -2, 0x7FFFFFFF, -0x80000000)


def fuzz_stream(rng: np.random.Generator, kind: str) -> bytes:
    """One hostile stream for the 16-input, 4-class model (``kind`` from FUZZ_KINDS)."""
    n = int(rng.integers(0, 12))
    x = rng.normal(0, 2, (n, FAKE_IN)).astype(np.float32)
    if kind in ("special values", "header fields", "truncated", "bit flips"):
        mask = rng.random(x.shape) < 0.15
        x[mask] = rng.choice(SPECIAL, int(mask.sum()))
    feedback = [int(rng.choice(LABELS)) for _ in range(n)]
    raw = bytearray(stream_bytes(x, feedback, int(rng.choice([0, 4]))))
    for i in range(n):  # random flags words (bit 0: reset)
        struct.pack_into("<I", raw, STREAM_HEAD.size + i * (8 + 4 * FAKE_IN) + 4, int(rng.integers(0, 1 << 32)))
    if kind == "header fields":
        for _ in range(int(rng.integers(1, 4))):
            word = int(rng.integers(0, 8))
            value = int(rng.choice([0, 1, 3, 4, 15, 16, 17, 72, 71, 73, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 20,
                                    int(rng.integers(0, 1 << 32))]))
            struct.pack_into("<I", raw, 4 * word, value)
    elif kind == "truncated":
        raw = raw[:int(rng.integers(0, len(raw) + 1))]
    elif kind == "count larger than the records":
        struct.pack_into("<I", raw, 8, n + int(rng.integers(1, 1 << 31)))
    elif kind == "wrong shape words":
        struct.pack_into("<II", raw, 24, int(rng.integers(0, 1 << 32)), int(rng.integers(0, 1 << 32)))
        if rng.random() < 0.5:
            struct.pack_into("<I", raw, 12, int(rng.choice([1, 15, 17, 32, 1024, 1 << 28])))
    elif kind == "random bytes":
        raw = bytearray(rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes())
        if rng.random() < 0.5 and len(raw) >= 4:
            raw[:4] = b"ETSM"
    elif kind == "bit flips":
        for _ in range(int(rng.integers(1, 8))):
            if raw:
                i = int(rng.integers(0, len(raw)))
                raw[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(raw)


FUZZ_KINDS = ("special values", "header fields", "truncated", "count larger than the records", "wrong shape words",
              "random bytes", "bit flips")
SANITIZER_MARKS = ("Sanitizer", "runtime error:", "SUMMARY:", "LeakSanitizer")


def fuzz_bench(program: Path, base: Path, n: int, seed: int, workers: int = 2) -> dict:
    """``n`` fuzzed streams through the AddressSanitizer + UBSan build (file or stdin, with or
    without checkpointing): exit 0 with a summary, or exit 1 with one error line; no sanitizer report."""
    env = {**os.environ, "ASAN_OPTIONS": "exitcode=86:detect_leaks=1:abort_on_error=0",
           "UBSAN_OPTIONS": "exitcode=87:print_stacktrace=1:halt_on_error=1"}
    tally = Tally()

    def one(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        kind = FUZZ_KINDS[i % len(FUZZ_KINDS)]
        data = fuzz_stream(rng, kind)
        d = fresh_dir(base, f"f{i}")
        args = ["--results=r.bin", "--state=st.bin"]
        if rng.random() < 0.3:
            args += ["--checkpoint=ck.bin", f"--save-every={int(rng.integers(1, 4))}"]
        if rng.random() < 0.2:
            args.append(f"--max={int(rng.integers(1, 6))}")
        stdin = rng.random() < 0.3
        if not stdin:
            (d / "s.bin").write_bytes(data)
        proc = subprocess.run([str(program), "-" if stdin else "s.bin", *args], cwd=d, input=data if stdin else None,
                              capture_output=True, env=env, timeout=60)
        out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        failure = None
        if any(m in err for m in SANITIZER_MARKS) or proc.returncode in (86, 87):
            failure = "sanitizer report"
        elif proc.returncode < 0 or proc.returncode not in (0, 1):
            failure = "crash"
        elif proc.returncode == 1 and not (out.strip().splitlines() or [""])[-1].startswith("edgetune-run: error:"):
            failure = "unclean error exit"
        elif proc.returncode == 0:
            try:
                s = json.loads(out.strip().splitlines()[-1])
                if s["accepted"] + s["rejected"] + s["labelled"] != s["samples"]:
                    failure = "inconsistent counters"
            except (json.JSONDecodeError, IndexError, KeyError):
                failure = "no summary"
        outcome = "ran" if proc.returncode == 0 else "refused (exit 1)"
        tally.add(kind, outcome, failure, f"case {i} rc {proc.returncode}: {out[-200:]} {err[-1500:]}")
        if failure is not None:
            (base / f"failing-{i}.bin").write_bytes(data)
        shutil.rmtree(d)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))
    return tally.to_json()


# --- soak: a real bundle, continual tinytta, a million samples ---------------------------------------------
def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def soak_bench(program: Path, meta: dict, work: Path, n: int, cycle: int = 1000, every: float = 0.5) -> dict:
    """``n`` samples of corrupted digits (a cycle of ``cycle``, continual: one reset at the start)
    fed through stdin to the real bundle's native edgetune-run, checkpointing every 10,000 samples;
    RSS sampled from /proc every ``every`` seconds."""
    from edgetune.deploy import read_results
    from edgetune.simulate import stream_samples

    # 1,000 of the 1,077 samples the digits test split gives these three corruptions (asking for more is refused)
    x, labels, _, _ = stream_samples("digits", ("gaussian_noise", "fog", "contrast"), 5, "continual", cycle)
    x = np.ascontiguousarray(x, "<f4").reshape(cycle, -1)
    rec = np.zeros(cycle, dtype=[("label", "<i4"), ("flags", "<u4"), ("x", "<f4", (x.shape[1],))])
    rec["label"], rec["x"] = -1, x
    body = rec.tobytes()
    first = rec.copy()
    first["flags"][0] = 1  # the one reset of a continual stream
    d = fresh_dir(work, "soak-run")
    head = STREAM_HEAD.pack(b"ETSM", 1, n, x.shape[1], meta["classes"], 8 + 4 * x.shape[1], 0, 0)
    p = subprocess.Popen([str(program), "-", "--results=r.bin", "--state=st.bin", "--checkpoint=ck.bin",
                          "--save-every=10000"], cwd=d, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    rss: list[tuple[float, int]] = []
    t0 = time.monotonic()

    def feed() -> None:
        assert p.stdin is not None
        try:
            p.stdin.write(head)
            left = n
            chunk = first.tobytes()
            while left > 0:
                k = min(left, cycle)
                p.stdin.write(chunk[:k * rec.itemsize])
                left -= k
                chunk = body
            p.stdin.close()
        except BrokenPipeError:
            pass

    def sample() -> None:
        while p.poll() is None:
            v = rss_kb(p.pid)
            if v is not None:
                rss.append((time.monotonic() - t0, v))
            time.sleep(every)

    threads = [threading.Thread(target=feed), threading.Thread(target=sample)]
    for t in threads:
        t.start()
    assert p.stdout is not None and p.stderr is not None
    out = p.stdout.read()  # one summary line at the end; stderr only ever holds a line or two
    err = p.stderr.read()
    p.wait()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"faults: the soak run failed (exit {p.returncode}): {out[-500:]!r} {err[-500:]!r}")
    summary = json.loads(out.decode().strip().splitlines()[-1])
    records = read_results(d / "r.bin")
    flags = records["flags"]
    pred = records["prediction"]
    truth = np.resize(labels, n)
    tenth = max(1, n // 10)
    early = float((pred[:tenth] == truth[:tenth]).mean())
    late = float((pred[-tenth:] == truth[-tenth:]).mean())
    state = np.frombuffer((d / "st.bin").read_bytes(), "<f4")
    steady = [v for t, v in rss if t >= 0.1 * seconds] or [v for _, v in rss]
    from edgetune.deploy.streams import REJECTED, UPDATED
    counters = {"samples": summary["samples"], "accepted": summary["accepted"], "rejected": summary["rejected"],
                "updates": summary["updates"], "streamed": n,
                "records_updated": int(((flags & UPDATED) != 0).sum()),
                "records_rejected": int(((flags & REJECTED) != 0).sum())}
    exact = (summary["samples"] == n and summary["accepted"] + summary["rejected"] == n and len(records) == n
             and summary["updates"] == counters["records_updated"]
             and summary["rejected"] == counters["records_rejected"])
    shutil.rmtree(d)
    return {
        "model": meta["model"], "method": meta["method"], "protocol": "continual", "samples": n,
        "seconds": round(seconds, 1), "samples_per_second": round(n / seconds, 1),
        "rss_kb_first": rss[0][1] if rss else None, "rss_kb_min": min(steady) if steady else None,
        "rss_kb_max": max(steady) if steady else None, "rss_points": len(rss),
        "rss_growth": (max(steady) - min(steady)) / min(steady) if steady else None,
        "nan_losses": int((~np.isfinite(records["loss"][(flags & REJECTED) == 0])).sum()),
        "state_finite": bool(np.isfinite(state).all()), "accuracy_first_10pct": early, "accuracy_last_10pct": late,
        "counters": counters, "counters_exact": bool(exact), "restores": summary["restores"],
        "saves": summary["saves"],
    }


# --- report -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    cut: int
    external: int
    fallback: int
    qemu_cut: int
    qemu_external: int
    qemu_fallback: int
    corruptions: int
    fuzz: int
    soak: int


FULL = Sizes(2000, 300, 200, 150, 30, 20, 5000, 10000, 1_000_000)
QUICK = Sizes(60, 10, 10, 6, 2, 2, 150, 100, 0)
LOSS_FAILURES = ("committed state lost", "torn state committed", "wrong slot loaded", "differs")


def goals(report: dict) -> dict:
    """The issue's goals over every family: lost committed states, crashes, sanitizer reports,
    unusable checkpoints not reported (or resumed / started fresh silently)."""
    def count(family: str, pred) -> int:
        fam = report.get(family) or {}
        return sum(v for k, v in fam.get("failures", {}).items() if pred(k))

    kills = [f for f in ("kills_native", "kills_qemu_aarch64") if report.get(f)]
    lost = sum(count(f, lambda k: any(w in k for w in LOSS_FAILURES)) for f in kills)
    crashes = sum(count(f, lambda k: k == "crash") for f in (*kills, "corruptions", "fuzz"))
    other_kill = sum(count(f, lambda k: not any(w in k for w in LOSS_FAILURES) and k != "crash") for f in kills)
    unreported = count("corruptions", lambda k: k != "crash")
    sanitizer = count("fuzz", lambda k: k == "sanitizer report")
    unclean = count("fuzz", lambda k: k not in ("sanitizer report", "crash"))
    g = {"committed_states_lost": lost, "other_kill_failures": other_kill, "crashes": crashes,
         "sanitizer_reports": sanitizer, "unclean_refusals": unclean, "corruptions_mishandled": unreported}
    soak = report.get("soak")
    if soak:
        g["soak_rss_flat"] = soak["rss_growth"] is not None and soak["rss_growth"] <= 0.05
        g["soak_no_nan"] = soak["nan_losses"] == 0 and soak["state_finite"]
        g["soak_accuracy_kept"] = soak["accuracy_last_10pct"] >= soak["accuracy_first_10pct"] - 0.01
        g["soak_counters_exact"] = soak["counters_exact"]
    g["met"] = all(v == 0 for k, v in g.items() if isinstance(v, int) and not isinstance(v, bool)) and all(
        v for v in g.values() if isinstance(v, bool))
    return g


def table(report: dict) -> str:
    rows = ["| family | cases | outcomes | failures |", "|---|---:|---|---|"]
    for fam in ("kills_native", "kills_qemu_aarch64", "corruptions", "fuzz"):
        f = report.get(fam)
        if not f:
            continue
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(f["outcomes"].items()))
        failures = ", ".join(f"{k} {v}" for k, v in sorted(f["failures"].items())) or "0"
        rows.append(f"| {fam} | {f['cases']} | {outcomes} | {failures} |")
        for kind, n in sorted(f["kinds"].items()):
            bad = ", ".join(f"{k.split(': ', 1)[1]} {v}" for k, v in sorted(f["kind_failures"].items())
                            if k.startswith(f"{kind}: "))
            rows.append(f"| &nbsp;&nbsp;{kind} | {n} | | {bad or 0} |")
    lines = ["\n".join(rows)]
    soak = report.get("soak")
    if soak:
        lines.append(
            f"\nsoak: {soak['samples']:,} samples, {soak['method']} on {soak['model']} ({soak['protocol']}), "
            f"{soak['samples_per_second']:,.0f} samples/s ({soak['seconds']:.0f} s); RSS {soak['rss_kb_min']}.."
            f"{soak['rss_kb_max']} kB after the first 10 % ({100 * soak['rss_growth']:.2f} % growth, "
            f"{soak['rss_points']} points); NaN losses {soak['nan_losses']}; accuracy first 10 % "
            f"{100 * soak['accuracy_first_10pct']:.2f} %, last 10 % {100 * soak['accuracy_last_10pct']:.2f} %; "
            f"counters exact: {soak['counters_exact']} ({soak['counters']})")
    g = report["goals"]
    lines.append("\ngoals: " + ", ".join(f"{k} {v}" for k, v in g.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few hundred cases in seconds, no soak")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--soak", type=int, default=None, help="soak samples (default 1,000,000; 0: no soak)")
    ap.add_argument("--fuzz", type=int, default=None, help="fuzzed streams (default 10,000)")
    ap.add_argument("--only", choices=("kills", "qemu", "corruptions", "fuzz", "soak"), action="append",
                    help="run only these families (repeatable)")
    ap.add_argument("--git-rev", default=None, help="build the C from this git revision instead of the checkout")
    ap.add_argument("--src", type=Path, default=None, help="build the C from this tree (targets/, tests/c/)")
    ap.add_argument("--soak-work", type=Path, default=Path.home() / ".cache" / "edgetune" / "faults-soak",
                    help="where the soak bundle and its program are built (kept: reused next time)")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="where faults.json / faults.md go ('' : nowhere)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="merge the families of earlier faults.json files (run in parts) into one report")
    args = ap.parse_args(argv)
    if args.combine:
        return write_report(combine([json.loads(p.read_text()) for p in args.combine]), args.out, args.quick)
    sizes = QUICK if args.quick else FULL
    soak_n = sizes.soak if args.soak is None else args.soak
    fuzz_n = sizes.fuzz if args.fuzz is None else args.fuzz
    only = set(args.only or ("kills", "qemu", "corruptions", "fuzz", "soak"))
    work = Path(tempfile.mkdtemp(prefix="edgetune-faults-", dir=SCRATCH))
    report: dict = {"mode": "quick" if args.quick else "full", "seed": args.seed}
    try:
        src = args.src if args.src is not None else source_tree(work, args.git_rev)
        report["source"] = "checkout" if args.src is None and args.git_rev is None else (args.git_rev or "tree")
        t0 = time.monotonic()
        if "kills" in only:
            native = Runner(build_fake(work / "native", src), work)
            report["kills_native"] = kill_bench(native, work / "kn", sizes.cut, sizes.external, sizes.fallback,
                                                args.seed, args.workers)
            print(f"kills (native): {report['kills_native']['cases']} in {time.monotonic() - t0:.0f} s", flush=True)
        if "qemu" in only and sizes.qemu_cut:
            if shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64-static"):
                t = time.monotonic()
                arm = build_fake(work / "aarch64", src, cc="aarch64-linux-gnu-gcc", extra=("-static",))
                qemu = Runner(arm, work, prefix=("qemu-aarch64-static",))
                report["kills_qemu_aarch64"] = kill_bench(qemu, work / "kq", sizes.qemu_cut, sizes.qemu_external,
                                                          sizes.qemu_fallback, args.seed + 1, args.workers)
                print(f"kills (qemu-aarch64): {report['kills_qemu_aarch64']['cases']} in "
                      f"{time.monotonic() - t:.0f} s", flush=True)
            else:
                report["kills_qemu_aarch64"] = None
                print("kills (qemu-aarch64): skipped, aarch64-linux-gnu-gcc or qemu-aarch64-static not installed")
        if "corruptions" in only:
            t = time.monotonic()
            native = Runner(build_fake(work / "native", src), work)
            report["corruptions"] = corruption_bench(native, work / "cc", sizes.corruptions, args.seed, args.workers)
            print(f"corruptions: {report['corruptions']['cases']} in {time.monotonic() - t:.0f} s", flush=True)
        if "fuzz" in only and fuzz_n:
            t = time.monotonic()
            asan = build_fake(work / "asan", src, extra=SANITIZE)
            report["fuzz"] = fuzz_bench(asan, work / "fz", fuzz_n, args.seed, args.workers)
            report["fuzz"]["build"] = "gcc " + " ".join(SANITIZE)
            print(f"fuzz (ASan+UBSan): {report['fuzz']['cases']} in {time.monotonic() - t:.0f} s", flush=True)
        if "soak" in only and soak_n:
            t = time.monotonic()
            args.soak_work.mkdir(parents=True, exist_ok=True)
            program, meta = build_soak_program(args.soak_work)
            report["soak"] = soak_bench(program, meta, work, soak_n)
            print(f"soak: {soak_n:,} samples in {time.monotonic() - t:.0f} s", flush=True)
        report["seconds"] = round(time.monotonic() - t0, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_report(report, args.out, args.quick)


FAMILIES = ("kills_native", "kills_qemu_aarch64", "corruptions", "fuzz", "soak")


def combine(parts: list[dict]) -> dict:
    """One report of families run separately (the later part wins a family both ran)."""
    out: dict = {"mode": parts[0]["mode"], "seed": parts[0]["seed"], "parts": len(parts),
                 "seconds": round(sum(p.get("seconds", 0.0) for p in parts), 1)}
    for p in parts:
        out.update({k: v for k, v in p.items() if k in FAMILIES and v})
        out.setdefault("source", p.get("source"))
    return out


def write_report(report: dict, out: Path, quick: bool) -> int:
    report["goals"] = goals(report)
    text = table(report)
    print(text)
    if str(out):
        out.mkdir(parents=True, exist_ok=True)
        (out / "faults.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "faults.md").write_text(f"# edgetune-run fault injection ({report['mode']})\n\n"
                                       f"`python3 benchmarks/faults.py{' --quick' if quick else ''}`\n\n{text}\n")
    return 0 if report["goals"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
