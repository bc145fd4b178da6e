"""edgetune-run's file formats and options (host build, hand-written model), the stream builder, and
``simulate`` / ``edgetune simulate`` end to end on a small bundle in QEMU."""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgetune.deploy import read_results, read_state, save_initial_state, write_stream, write_target_project
from edgetune.deploy.commands import add_commands
from edgetune.deploy.streams import EARLY_EXIT, FEEDBACK, REJECTED, RESET, SAVED, UPDATED, StateEntry
from edgetune.errors import CheckpointError, ConfigError, DataError
from edgetune.simulate import simulate, stream_samples
from edgetune.targets import HERE, RUNTIME_CFLAGS, RUNTIME_DIR, runtime_sources

C_DIR = Path(__file__).parent / "c"
BAD_LABEL = 256  # ET_APP_F_BAD_LABEL
KEYS = {"target", "method", "n", "online_accuracy", "source_accuracy", "flash_bytes", "sram_bytes",
        "instructions_per_sample", "inference_instructions_per_sample", "adaptation_instructions_per_sample",
        "instructions_per_mac"}

FAKE_LAYOUT = (StateEntry("w", "param", (4, 8)), StateEntry("b", "param", (4,)), StateEntry("vw", "optim", (4, 8)),
               StateEntry("vb", "optim", (4,)), StateEntry("mean", "stat", (8,)))


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """edgetune-run built natively (gcc, the runtime's strict flags) around the hand-written model."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("fake-run")
    app = HERE / "app"
    cmd = ["gcc", *RUNTIME_CFLAGS, "-O2", f"-I{RUNTIME_DIR}", f"-I{app}", f"-I{C_DIR}", *map(str, runtime_sources()),
           str(app / "et_app.c"), str(app / "et_app_linux.c"), str(C_DIR / "fake_model.c"), str(C_DIR / "fake_port.c"),
           "-lm", "-o", str(out / "edgetune-run")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out / "edgetune-run"


def samples(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.25, 0.25, (n, 16)).astype(np.float32)
    for i in range(n):
        x[i, i % 4::4] += 1.0  # four classes in turn
    return x


def run(program: Path, cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = subprocess.run([str(program), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return proc, json.loads(last) if proc.returncode == 0 else None


def test_run_writes_records_state_and_summary(fake_run, tmp_path):
    x = samples(120)
    x[7, 3] = np.nan  # rejected, never learned from
    feedback = [-1] * 120
    feedback[10] = 2
    write_stream(tmp_path / "s.bin", x, resets=[i == 60 for i in range(120)], feedback=feedback, classes=4)
    proc, summary = run(fake_run, tmp_path, "s.bin", "--results=r.bin", "--state=st.bin", "--summary=sum.json",
                        "--checkpoint=ck.bin", "--save-every=25")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary == json.loads((tmp_path / "sum.json").read_text())
    assert summary["samples"] == 120 + 1 and summary["accepted"] == 119 and summary["rejected"] == 1
    assert summary["labelled"] == 1 and summary["resets"] == 1 and summary["updates"] == 119 + 1
    records = read_results(tmp_path / "r.bin")
    flags = records["flags"]
    assert len(records) == 120 and records["prediction"][7] == -1 and flags[7] & REJECTED
    assert flags[10] & FEEDBACK and flags[60] & RESET and not flags[59] & RESET
    assert (flags[np.arange(120) != 7] & UPDATED).all()
    assert sum(bool(f & SAVED) for f in flags) >= 4  # every 25 accepted samples
    assert set(np.unique(records["prediction"][records["prediction"] >= 0])) <= {0, 1, 2, 3}
    assert (records["step"] >= records["frozen"] + records["method"]).all()
    state = read_state(tmp_path / "st.bin", FAKE_LAYOUT)
    assert state["w"].shape == (4, 8) and np.isfinite(state["w"]).all() and state["mean"].any()
    assert bool(EARLY_EXIT)  # the flag exists for methods with exits (the fake model sets it when confident)


def test_no_adapt_and_max(fake_run, tmp_path):
    write_stream(tmp_path / "s.bin", samples(50))
    proc, summary = run(fake_run, tmp_path, "--stream=s.bin", "--no-adapt", "--max=20", "--state=st.bin")
    assert proc.returncode == 0 and summary["samples"] == 20 and summary["updates"] == 0 and summary["adapt"] == 0
    proc, again = run(fake_run, tmp_path, "s.bin", "--no-adapt", "--max=20", "--state=st2.bin")
    assert (tmp_path / "st.bin").read_bytes() == (tmp_path / "st2.bin").read_bytes()  # deterministic


def test_resume_continues_from_the_checkpoint(fake_run, tmp_path):
    write_stream(tmp_path / "a.bin", samples(80)[:40])
    write_stream(tmp_path / "b.bin", samples(80)[40:])
    write_stream(tmp_path / "all.bin", samples(80))
    _, first = run(fake_run, tmp_path, "a.bin", "--checkpoint=ck.bin")
    _, second = run(fake_run, tmp_path, "b.bin", "--checkpoint=ck.bin", "--resume", "--state=resumed.bin")
    _, whole = run(fake_run, tmp_path, "all.bin", "--state=whole.bin")
    assert first["save_seq"] == 1 and second["boot_seq"] == 1 and second["save_seq"] >= 2  # + guard snapshots
    resumed = read_state(tmp_path / "resumed.bin", FAKE_LAYOUT)
    straight = read_state(tmp_path / "whole.bin", FAKE_LAYOUT)
    for name in resumed:  # a reboot in the middle of a stream changes nothing but the weight snapshot's age
        assert np.allclose(resumed[name], straight[name], atol=1e-3), name


@pytest.mark.parametrize("args,message", [
    ((), "no stream given"), (("s.bin", "--what"), "bad argument '--what'"), (("s.bin", "--max=x"), "bad argument"),
    (("s.bin", "--resume"), "--resume needs --checkpoint")])
def test_bad_arguments_exit_2_with_the_reason(fake_run, tmp_path, args, message):
    proc, _ = run(fake_run, tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_stream_for_another_model_is_refused(fake_run, tmp_path):
    write_stream(tmp_path / "s.bin", np.zeros((3, 10), np.float32))
    proc, _ = run(fake_run, tmp_path, "s.bin")
    assert proc.returncode == 1 and "floats per sample differ" in proc.stdout
    (tmp_path / "junk.bin").write_bytes(b"not a stream at all, long enough to hold a header")
    proc, _ = run(fake_run, tmp_path, "junk.bin")
    assert proc.returncode == 1 and "not an edgetune stream" in proc.stdout


def test_stream_file_errors(tmp_path):
    with pytest.raises(DataError, match="no samples"):
        write_stream(tmp_path / "s.bin", np.zeros((0, 4), np.float32))
    with pytest.raises(DataError, match="one of each per sample"):
        write_stream(tmp_path / "s.bin", np.zeros((3, 4), np.float32), resets=[True])
    (tmp_path / "r.bin").write_bytes(b"ETRS" + (1).to_bytes(4, "little") + (5).to_bytes(4, "little")
                                     + (28).to_bytes(4, "little") + bytes(28))
    with pytest.raises(CheckpointError, match="1 of 5 records"):
        read_results(tmp_path / "r.bin")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_results(tmp_path / "missing.bin")


def test_stream_samples_follow_the_protocol(digits):
    x, labels, resets, feedback = stream_samples("digits", ("gaussian_noise", "fog"), 3, "episodic", 10)
    assert x.shape == (10, 1, 32, 32) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert resets == [True] + [False] * 4 + [True] + [False] * 4 and feedback == [-1] * 10
    _, _, resets, _ = stream_samples("digits", ("gaussian_noise", "fog"), 3, "continual", 10)
    assert resets == [True] + [False] * 9
    _, labels, _, feedback = stream_samples("digits", ("gaussian_noise",), 3, "episodic", 50, labelled_fraction=0.5)
    revealed = [f for f in feedback if f >= 0]
    assert 10 < len(revealed) < 40 and all(f == int(y) for f, y in zip(feedback, labels) if f >= 0)
    with pytest.raises(ConfigError, match="--n must be at least 1"):
        stream_samples("digits", ("fog",), 3, "episodic", 0)


# --- simulate() on a real bundle -------------------------------------------------------------------------
QEMU_TOOLS = ("arm-none-eabi-gcc", "qemu-system-arm", "aarch64-linux-gnu-gcc", "qemu-aarch64-static", "make")


@pytest.fixture(scope="module")
def bundle(tiny_cnn, digits, tmp_path_factory) -> Path:
    from edgetune.adapt import fit, prepare
    from edgetune.export import export

    adaptable = prepare(copy.deepcopy(tiny_cnn[0]), "feature-align", model_name="tiny-cnn")
    fit(adaptable, digits, progress=False)
    out = tmp_path_factory.mktemp("sim-bundle")
    export(adaptable, digits, out, progress=False)
    save_initial_state(out, adaptable.method)
    return out


@pytest.mark.toolchain
@pytest.mark.skipif(any(shutil.which(t) is None for t in QEMU_TOOLS), reason=f"needs {', '.join(QEMU_TOOLS)}")
def test_simulate_reports_accuracy_memory_and_instructions(bundle, tmp_path):
    write_target_project(bundle, "cortex-m4")
    report = simulate(bundle, n=40, workdir=tmp_path)  # builds the project first
    d = report.to_json()
    assert KEYS <= set(d) and d["target"] == "cortex-m4" and d["method"] == "feature-align" and d["n"] == 40
    assert 0.0 <= d["source_accuracy"] <= 1.0 and 0.0 <= d["online_accuracy"] <= 1.0
    assert d["sram_bytes"] == d["static_ram_bytes"] + d["stack_bytes"] and d["sram_bytes"] < 256 * 1024
    assert 1_000_000 < d["inference_instructions_per_sample"] <= d["instructions_per_sample"]
    assert d["adaptation_instructions_per_sample"] == pytest.approx(
        d["instructions_per_sample"] - d["inference_instructions_per_sample"])
    assert 0.5 < d["instructions_per_mac"] < 20 and d["macs"] > 1_000_000
    assert d["early_exit_rate"] == 0.0 and d["rejected"] == 0
    assert "online accuracy" in report.table() and "per MAC" in report.table()
    with pytest.raises(ConfigError, match="pick one with --target"):
        write_target_project(bundle, "rpi4")
        simulate(bundle, n=4)


@pytest.mark.toolchain
@pytest.mark.skipif(any(shutil.which(t) is None for t in QEMU_TOOLS), reason=f"needs {', '.join(QEMU_TOOLS)}")
def test_simulate_cli_on_a_linux_target_counts_instructions(bundle, tmp_path, capsys):
    write_target_project(bundle, "rpi4")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", str(bundle), "--target", "rpi4", "--n", "8", "--json", "--workdir",
                              str(tmp_path)])
    args.func(args)
    d = json.loads(capsys.readouterr().out)
    assert KEYS <= set(d) and d["target"] == "rpi4" and d["n"] == 8 and d["sram_bytes"] is None
    assert d["inference_instructions_per_sample"] > 1_000_000 and d["instructions_per_mac"] > 0.5
    args = parser.parse_args(["build", str(bundle), "--target", "rpi4"])
    args.func(args)
    assert "built" in capsys.readouterr().out


@pytest.mark.toolchain
@pytest.mark.skipif(any(shutil.which(t) is None for t in QEMU_TOOLS), reason=f"needs {', '.join(QEMU_TOOLS)}")
def test_cli_export_for_a_microcontroller_writes_and_builds_the_firmware(tiny_cnn, tmp_path, capsys):
    from edgetune.cli import main

    out = tmp_path / "bundle"
    assert main(["export", "tiny-cnn", "--method", "feature-align", "--checkpoint", str(tiny_cnn[1]),
                 "--target", "cortex-m4", "-o", str(out), "--build"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "built fw.elf" in printed
    project = out / "cortex-m4"
    assert (project / "build" / "fw.elf").is_file() and (project / "link.ld").is_file()
    assert (project / "portable" / "model" / "et_model_gen.c").is_file()
    assert (out / "initial_state.npz").is_file()  # the statistics the firmware starts from
    assert main(["simulate", str(out), "--n", "6", "--json", "--workdir", str(tmp_path / "sim")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["target"] == "cortex-m4" and d["n"] == 6 and d["flash_bytes"] > 0
    assert main(["simulate", str(out), "--n", "0"]) == 1  # a one-line error, not a traceback
    assert "--n must be at least 1" in capsys.readouterr().err


def _slots(path: Path, payload: int) -> list[dict]:
    """The two A/B slots of a checkpoint file: offset, magic, sequence number and CRC validity."""
    raw = path.read_bytes()
    size = 24 + ((payload + 7) & ~7)
    out = []
    for k in range(2):
        at = k * size
        head = raw[at:at + 24]
        if len(head) < 24:
            out.append({"at": at, "valid": False})
            continue
        magic, _version, seq, length, _layout, crc = np.frombuffer(head, "<u4")
        body = raw[at + 24:at + 24 + length]
        valid = magic == 0x4B435445 and zlib.crc32(head[4:20] + body) == crc
        out.append({"at": at, "valid": bool(valid), "seq": int(seq)})
    return out


def _poison(path: Path, slot: dict, offset: int) -> None:
    """Write NaN into a slot's payload at ``offset`` and re-seal its CRC: CRC-valid, non-finite state."""
    raw = bytearray(path.read_bytes())
    at = slot["at"]
    raw[at + 24 + offset:at + 28 + offset] = np.float32(np.nan).tobytes()
    length = int(np.frombuffer(bytes(raw[at + 12:at + 16]), "<u4")[0])
    raw[at + 20:at + 24] = np.uint32(zlib.crc32(bytes(raw[at + 4:at + 20]) + bytes(raw[at + 24:at + 24 + length]))
                                     ).tobytes()
    path.write_bytes(bytes(raw))


WEIGHT_OFFSET = 40 + 4 * 4  # the runtime's meta (40 bytes) and guard histogram (4 classes) come first


def test_resume_on_a_missing_file_is_a_first_start(fake_run, tmp_path):
    write_stream(tmp_path / "s.bin", samples(30))
    proc, summary = run(fake_run, tmp_path, "s.bin", "--checkpoint=ck.bin", "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["resumed"] is False and "first start" in summary["resume_reason"] and summary["boot_seq"] == 0
    _, again = run(fake_run, tmp_path, "s.bin", "--checkpoint=ck.bin", "--resume")
    assert again["resumed"] is True and again["resume_reason"] == "" and again["boot_seq"] == summary["save_seq"]


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, bytes(range(256)) * 8], ids=["empty", "zeros", "garbage"])
def test_resume_refuses_an_unusable_checkpoint_and_writes_nothing(fake_run, tmp_path, content):
    write_stream(tmp_path / "s.bin", samples(30))
    (tmp_path / "ck.bin").write_bytes(content)
    proc, _ = run(fake_run, tmp_path, "s.bin", "--checkpoint=ck.bin", "--resume", "--results=r.bin")
    assert proc.returncode == 3
    assert len(proc.stderr.strip().splitlines()) == 1 and "--fresh-ok" in proc.stderr and "no valid slot" in proc.stderr
    assert (tmp_path / "ck.bin").read_bytes() == content and not (tmp_path / "r.bin").exists()
    proc, summary = run(fake_run, tmp_path, "s.bin", "--checkpoint=ck.bin", "--resume", "--fresh-ok")
    assert proc.returncode == 0 and "warning" in proc.stderr
    assert summary["resumed"] is False and "no valid slot" in summary["resume_reason"] and summary["saves"] >= 1


def test_a_crc_valid_slot_with_non_finite_state_falls_back_to_the_other_slot(fake_run, tmp_path):
    write_stream(tmp_path / "s.bin", samples(40))
    _, one = run(fake_run, tmp_path, "s.bin", "--checkpoint=ck.bin", "--save-every=10")
    slots = _slots(tmp_path / "ck.bin", one["payload_bytes"])
    assert all(s["valid"] for s in slots), slots  # our reading of the format matches the runtime's CRC
    newest = max(slots, key=lambda s: s["seq"])
    older = min(slots, key=lambda s: s["seq"])
    _poison(tmp_path / "ck.bin", newest, WEIGHT_OFFSET)
    assert all(s["valid"] for s in _slots(tmp_path / "ck.bin", one["payload_bytes"]))
    proc, resumed = run(fake_run, tmp_path, "s.bin", "--checkpoint=ck.bin", "--resume", "--state=st.bin")
    assert proc.returncode == 0 and resumed["resumed"] is True and resumed["boot_seq"] == older["seq"]
    assert np.isfinite(read_state(tmp_path / "st.bin", FAKE_LAYOUT)["w"]).all()
    # both slots poisoned: nothing usable is left, and the run says so instead of starting fresh
    for s in _slots(tmp_path / "ck.bin", one["payload_bytes"]):
        _poison(tmp_path / "ck.bin", s, WEIGHT_OFFSET)
    proc, _ = run(fake_run, tmp_path, "s.bin", "--checkpoint=ck.bin", "--resume")
    assert proc.returncode == 3 and "non-finite state" in proc.stderr


def test_an_out_of_range_feedback_label_is_counted_and_the_stream_goes_on(fake_run, tmp_path):
    feedback = [-1] * 30
    feedback[5], feedback[9] = 99, 1
    write_stream(tmp_path / "s.bin", samples(30), feedback=feedback, classes=4)
    proc, summary = run(fake_run, tmp_path, "s.bin", "--results=r.bin", "--checkpoint=ck.bin")
    assert proc.returncode == 0, proc.stdout
    flags = read_results(tmp_path / "r.bin")["flags"]
    assert summary["bad_labels"] == 1 and summary["labelled"] == 1 and summary["saves"] >= 1
    assert flags[5] & BAD_LABEL and not flags[5] & FEEDBACK and flags[9] & FEEDBACK


def test_a_cut_in_the_first_save_after_a_fallback_keeps_the_slot_it_resumed_from(fake_run, tmp_path):
    write_stream(tmp_path / "s.bin", samples(40))
    _, one = run(fake_run, tmp_path, "s.bin", "--checkpoint=ck.bin", "--save-every=10")
    slots = _slots(tmp_path / "ck.bin", one["payload_bytes"])
    older = min(slots, key=lambda s: s["seq"])
    _poison(tmp_path / "ck.bin", max(slots, key=lambda s: s["seq"]), WEIGHT_OFFSET)
    cut = subprocess.run([str(fake_run), "s.bin", "--checkpoint=ck.bin", "--resume", "--cut-after-bytes=100"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert cut.returncode != 0  # killed in the middle of its first save
    proc, resumed = run(fake_run, tmp_path, "s.bin", "--checkpoint=ck.bin", "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert resumed["resumed"] is True and resumed["boot_seq"] == older["seq"]
