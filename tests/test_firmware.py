"""Deployed bundles on simulated devices: Cortex-M firmware in qemu-system-arm, edgetune-run for ARM
Linux / Android in qemu-aarch64-static, against the same generated C built for the host, which is
itself checked against the reference (the TVM host runtime's int8 taps + the method's torch step).

Acceptance (issues 4 and 5): for feature-align, tinytta, lst and vqt, 300 streaming samples with
adaptation give every sample the host build's prediction and final adapted state within 1e-4, on
a microcontroller and on rpi4 / android-arm64; the host build agrees with the reference the same
way. Every method runs on cortex-m4: vqt's training step keeps the queries' attention over every
position of every stage map (and its backward) in float32, 56 KB of arena on mcunet-s, and its
firmware takes ~157 KB of cortex-m4's 256 KB SRAM. The budget refusal is tested below on a target
genuinely too small for the bundle.
"""
from __future__ import annotations

import copy
import json
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune.adapt import Adaptable, fit, prepare
from edgetune.deploy import (TargetProject, build_project, read_state, save_initial_state, write_stream,
                             write_target_project)
from edgetune.deploy.host import HostModel
from edgetune.deploy.streams import REJECTED
from edgetune.errors import BudgetError
from edgetune.export import export, exportable_methods, load_manifest
from edgetune.simulate import run_program, stream_samples
from edgetune.targets import HERE, get_target
from conftest import known_settings
from test_board_qemu import read_slots  # the independent (zlib) reader of the slot format

N = 300
TOL = 1e-4
LABELLED = 0.3  # supervised feedback on 30% of the samples: lst and vqt learn only from revealed labels
MCU = {method: "cortex-m4" for method in exportable_methods()}  # every method that runs compiled, from the registry
LINUX = ("rpi4", "android-arm64")
TOOLS = ("arm-none-eabi-gcc", "qemu-system-arm", "aarch64-linux-gnu-gcc", "qemu-aarch64-static", "make")

pytestmark = [
    pytest.mark.toolchain, pytest.mark.slow,
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason=f"needs {', '.join(TOOLS)} (apt install gcc-arm-none-eabi libnewlib-arm-none-eabi "
                              "qemu-system-arm qemu-user-static gcc-aarch64-linux-gnu make)"),
]


@dataclass
class Deployed:
    method: str
    adaptable: Adaptable
    bundle: Path
    projects: dict[str, TargetProject]
    host_predictions: list[int]
    host_state: dict[str, np.ndarray]
    host_counters: dict[str, int]


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """(samples, feedback labels (-1: none), stream file): the unsupervised protocol plus revealed labels."""
    x, _, resets, feedback = stream_samples("digits", ("gaussian_noise",), 5, "episodic", N, labelled_fraction=LABELLED)
    path = write_stream(tmp_path_factory.mktemp("stream") / "stream.bin", x, resets, feedback, 10)
    return x, feedback, path


def host_run(bundle: Path, x: np.ndarray, feedback: list[int]) -> tuple[list[int], dict[str, np.ndarray], dict]:
    """The bundle's generated C built for the host (the oracle of the devices) over the stream."""
    model = HostModel(bundle)
    predictions = []
    for i in range(len(x)):
        predictions.append(model.step(x[i]).prediction)
        if feedback[i] >= 0:  # revealed after the prediction was scored
            model.feedback(x[i], feedback[i])
    return predictions, model.state(), model.counters()


@pytest.fixture(scope="module", params=list(MCU))
def deployed(request, mcunet, digits, stream, tmp_path_factory) -> Deployed:
    """A fitted method on mcunet-s, exported, its projects written for its MCU and the Linux targets,
    and the host build of the generated C streamed over the samples. lr 1e-3 (10x tinytta's and
    vqt's default) so the parameters move far enough for a wrong update to show; at 1e-2 vqt's
    training becomes chaotic and float32 rounding alone (torch vs C summation order) grows past
    1e-4 within 300 samples."""
    method = request.param
    settings = {"fit_epochs": "3", "lr": "0.001", "fit_view_images": "200"}  # tinytta: a small fit of its grid head
    adaptable = prepare(copy.deepcopy(mcunet[0]), method, known_settings(method, settings), model_name="mcunet-s")
    fit(adaptable, digits, progress=False)
    bundle = tmp_path_factory.mktemp(f"bundle-{method}")
    export(adaptable, digits, bundle, progress=False)
    save_initial_state(bundle, adaptable.method)
    projects = {t: write_target_project(bundle, t) for t in (MCU[method], *LINUX)}
    predictions, state, counters = host_run(bundle, stream[0], stream[1])
    return Deployed(method, adaptable, bundle, projects, predictions, state, counters)


def _torch_names(manifest, method) -> dict[str, str]:
    """Bundle name of every state buffer -> its torch name (parameters and buffers)."""
    from edgetune.export.manifest import onnx_name

    names = {p.name: p.torch_name for p in manifest.trainable.parameters}
    names.update({f"state_{onnx_name(n)}": n for n, _ in method.named_buffers()})
    return names


def test_host_build_matches_the_reference(deployed, stream, tmp_path):
    """The generated C on the host vs the reference: the TVM host runtime's int8 taps (an LLVM build
    of the same frozen plan) and the method's torch step. Same prediction for every sample, final
    weights and statistics within 1e-4, the same collapse-guard restores, and the weights really moved."""
    from edgetune.compilers import FrozenRunner, compile_frozen

    manifest = load_manifest(deployed.bundle)
    runner = FrozenRunner(compile_frozen(deployed.bundle / manifest.frozen.file, "host", tmp_path / "frozen"))
    adaptable = copy.deepcopy(deployed.adaptable)
    adaptable.tap_runner = lambda x: [torch.from_numpy(t) for t in runner(x.numpy())]
    adaptable.reset()
    x, feedback = torch.from_numpy(stream[0]), stream[1]
    predictions = []
    method = adaptable.method
    scheduled = method.momentum_now
    for i in range(N):
        predictions.append(int(adaptable.step(x[i:i + 1]).argmax()))
        if feedback[i] >= 0:
            # the runtime's feedback contract (et_runtime_feedback): the statistics are left as they are,
            # so the supervised step aligns with momentum 0 (Method.step would mix the sample in again)
            method.momentum_now = lambda: 0.0
            adaptable.step(x[i:i + 1], torch.nn.functional.one_hot(torch.tensor([feedback[i]]), 10).float())
            method.momentum_now = scheduled
    assert predictions == deployed.host_predictions
    before = deployed.adaptable.method  # the fixture's copy never stepped
    names = _torch_names(manifest, method)
    now = {**dict(method.named_parameters()), **dict(method.named_buffers())}
    start = {**dict(before.named_parameters()), **dict(before.named_buffers())}
    moved = 0.0
    for name, value in deployed.host_state.items():
        if name.startswith("sgd_momentum_"):
            continue  # torch keeps SGD momentum inside its optimizer; the weights it drives are checked
        ref = now[names[name]].detach().numpy().reshape(value.shape)
        assert np.abs(value - ref).max() <= TOL, name
        if name in {p.name for p in manifest.trainable.trainable_parameters()}:
            moved = max(moved, float(np.abs(value - start[names[name]].detach().numpy().reshape(value.shape)).max()))
    assert method.restores == deployed.host_counters["restores"]
    if deployed.projects[MCU[deployed.method]].learns:
        assert moved > 10 * TOL, "the stream must actually train the parameters"


@pytest.mark.parametrize("where", ["mcu", *LINUX])
def test_device_run_matches_the_host_build(deployed, stream, where, tmp_path):
    """300 streaming samples with adaptation in the simulator: every prediction and the final
    adapted state (within 1e-4) as the host build of the same C."""
    target = MCU[deployed.method] if where == "mcu" else where
    built = build_project(deployed.projects[target])
    t = get_target(target)
    if t.kind == "mcu":
        assert built.flash_bytes <= t.flash_bytes and built.static_ram_bytes <= t.ram_bytes
    run = run_program(built, stream[2], tmp_path, adapt=True)
    assert not (run.records["flags"] & REJECTED).any()
    assert run.records["prediction"].tolist() == deployed.host_predictions
    for name, value in deployed.host_state.items():
        assert np.abs(run.state[name] - value).max() <= TOL, f"{target}: {name}"
    labelled = sum(f >= 0 for f in stream[1])
    assert run.summary["accepted"] == N and run.summary["labelled"] == labelled
    assert run.summary["updates"] == (N + labelled if deployed.projects[target].learns else 0)
    if t.kind == "mcu":
        assert 0 < run.summary["stack_used_bytes"] < run.summary["stack_bytes"]
        ticks = run.summary["ticks"]
        if load_manifest(deployed.bundle).runtime.exits is None:
            assert ticks["frozen"] > ticks["method"] > 0
        else:  # with early exits the plan runs in stage segments: only the first is timed apart from the step
            assert ticks["frozen"] > 0 and ticks["method"] > 0


# --- small bundle: static linking, power cuts, budget refusal --------------------------------------------------
@pytest.fixture(scope="module")
def small(tiny_cnn, digits, tmp_path_factory) -> tuple[Path, Adaptable]:
    adaptable = prepare(copy.deepcopy(tiny_cnn[0]), "feature-align", model_name="tiny-cnn")
    fit(adaptable, digits, progress=False)
    bundle = tmp_path_factory.mktemp("small")
    export(adaptable, digits, bundle, progress=False)
    save_initial_state(bundle, adaptable.method)
    return bundle, adaptable


def test_android_binary_is_fully_static_and_runs_without_a_sysroot(small, tmp_path):
    built = build_project(write_target_project(small[0], "android-arm64"))
    described = subprocess.run(["file", str(built.program)], capture_output=True, text=True).stdout \
        if shutil.which("file") else ""
    readelf = subprocess.run(["aarch64-linux-gnu-readelf", "-l", str(built.program)], capture_output=True,
                             text=True).stdout
    assert "INTERP" not in readelf  # no dynamic loader requested
    if described:
        assert "statically linked" in described
    x = np.zeros((3, 1, 32, 32), np.float32)
    write_stream(tmp_path / "s.bin", x)
    proc = subprocess.run(["qemu-aarch64-static", str(built.program), "s.bin"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[-1])["samples"] == 3


def test_a_stream_of_another_sample_shape_is_refused_naming_both_shapes(small, tmp_path):
    """The stream header carries the sample shape (words 6-7) and the generated model declares its
    input's, so edgetune-run (the real bundle built for rpi4, run in qemu-aarch64) refuses samples of the same float
    count but another shape, naming both; a stream without a recorded shape is checked by count."""
    built = build_project(write_target_project(small[0], "rpi4"))
    t = get_target("rpi4")
    header = (built.project.directory / "model" / "et_model_gen.h").read_text()
    assert "#define EDGETUNE_MODEL_INPUT_RANK 3u" in header and "{1u, 32u, 32u}" in header

    def run(x: np.ndarray) -> subprocess.CompletedProcess:
        write_stream(tmp_path / "s.bin", x)
        return subprocess.run(t.simulator_command(built.program.resolve(), ["s.bin"]), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    assert run(np.zeros((3, 1, 32, 32), np.float32)).returncode == 0  # the model's own shape
    assert run(np.zeros((3, 1024), np.float32)).returncode == 0  # shape not recorded: the count matches
    for x, shape in ((np.zeros((3, 32, 32, 1), np.float32), "32x32x1"), (np.zeros((3, 2, 512), np.float32), "2x512")):
        proc = run(x)
        assert proc.returncode == 1, proc.stdout
        assert (f"stream: sample shape {shape} differs from the model's input 1x32x32; write the stream with samples "
                "shaped like the model's input") in proc.stdout
    proc = run(np.zeros((3, 1, 16, 16), np.float32))  # another shape and count: the shape is named first
    assert proc.returncode == 1 and "sample shape 1x16x16 differs from the model's input 1x32x32" in proc.stdout
    proc = run(np.zeros((3, 256), np.float32))
    assert proc.returncode == 1 and "floats per sample differ (256 in the stream, 1024 in the model's input)" \
        in proc.stdout and "rebuild" not in proc.stdout


@pytest.mark.parametrize("target", ["cortex-m4", "android-arm64"])
def test_killed_in_a_checkpoint_write_the_next_start_resumes_from_the_previous_slot(small, stream, target,
                                                                                    tmp_path):
    """Kill the program (QEMU killed / SIGKILL) in the middle of a checkpoint write: the torn slot
    is invalid, the other one intact, and a restart resumes exactly as from the file before the
    interrupted write (nothing lost, nothing corrupted)."""
    built = build_project(write_target_project(small[0], target))
    first, later = write_stream(tmp_path / "a.bin", stream[0][:40]), write_stream(tmp_path / "b.bin", stream[0][40:80])
    ck = ["--checkpoint=ck.bin", "--save-every=20"]
    run_program(built, first, tmp_path, extra=tuple(ck))
    assert read_slots(tmp_path / "ck.bin") == {0: 1, 1: 2}
    pristine = (tmp_path / "ck.bin").read_bytes()
    payload = struct.unpack_from("<I", pristine, 12)[0]
    t = get_target(target)
    cmd = t.simulator_command(built.program.resolve(), ["--stream=b.bin", *ck, "--resume",
                                                        f"--cut-after-bytes={4 + payload // 2}"])
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    seen, deadline = [], time.monotonic() + 120
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # Linux: SIGKILL ends it; Cortex-M: it spins after flushing the cut
            seen.append(line.strip())
            if line.startswith("CUT") or time.monotonic() > deadline:
                break
    finally:
        proc.kill()
        proc.wait()
    assert any(s.startswith("CUT") for s in seen), seen
    assert (tmp_path / "ck.bin").read_bytes() != pristine  # the write really started
    assert read_slots(tmp_path / "ck.bin") == {1: 2}  # the older slot (0) is torn, the newest intact
    runs = {}
    for name, content in (("after-kill", (tmp_path / "ck.bin").read_bytes()), ("before-write", pristine)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ck.bin").write_bytes(content)
        runs[name] = run_program(built, later, tmp_path / name, extra=(*ck, "--resume"))
    after, clean = runs["after-kill"], runs["before-write"]
    assert after.summary["boot_seq"] == clean.summary["boot_seq"] == 2
    assert after.records["prediction"].tolist() == clean.records["prediction"].tolist()
    for name in after.state:
        assert np.array_equal(after.state[name], clean.state[name])


def _small_target(tmp_path: Path, ram: int, flash: int) -> Path:
    spec = json.loads((HERE / "cortex-m4.json").read_text())
    spec["name"] = "cortex-m4-tiny"
    spec["memory"] = {"ram_bytes": ram, "flash_bytes": flash}
    path = tmp_path / "cortex-m4-tiny.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("ram,flash,what", [(48 * 1024, 1 << 20, "SRAM"), (256 * 1024, 64 * 1024, "flash")])
def test_over_budget_is_refused_before_building_with_the_table(small, tmp_path, ram, flash, what):
    target = get_target(str(_small_target(tmp_path, ram, flash)))
    out = tmp_path / "project"
    with pytest.raises(BudgetError) as err:
        write_target_project(small[0], target, out_dir=out)
    message = str(err.value)
    first = message.splitlines()[0]
    assert first.startswith("budget: feature-align on tiny-cnn does not fit cortex-m4-tiny") and what in first
    assert "try " in first and "cortex-m7" in first  # a bigger target that would take it
    for row in ("activation arena", "frozen weights", "stack (reserved)", "total", "budget"):
        assert row in message
    assert not out.exists()  # refused before anything was written or built


def test_linker_script_of_a_project_has_the_budget(small):
    project = write_target_project(small[0], "cortex-m4")
    script = (project.directory / "link.ld").read_text()
    t = get_target("cortex-m4")
    assert f"LENGTH = {t.ram_bytes}" in script and f"LENGTH = {t.flash_bytes}" in script
    portable = project.directory / "portable"
    assert (portable / "model" / "et_model_gen.c").is_file() and (portable / "runtime" / "et_runtime.c").is_file()
    assert not (portable / "board").exists() and "STM32Cube" in (portable / "README.md").read_text()


def test_state_file_layout_is_the_registration_order(small, stream, tmp_path):
    built = build_project(write_target_project(small[0], "rpi4"))
    run = run_program(built, write_stream(tmp_path / "s.bin", stream[0][:5]), tmp_path)
    state = read_state(tmp_path / "adapt_state.bin", built.project.state_layout)
    assert list(state) == [e.name for e in built.project.state_layout]
    assert all(np.isfinite(v).all() for v in run.state.values())
