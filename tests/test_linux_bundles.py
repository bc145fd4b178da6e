"""Deployed Linux bundles (rpi4, android-arm64) run their own CPU's schedules: the frozen graph is lowered
for the target's LLVM target (android-arm64: dot-product convs, LLVM emits ``sdot``), the driver comes
from that plan, and the kernels object, the C kernels of ``make KERNELS=c`` and the driver can only be
linked together when they come from the same lowering (the plan's id is part of the kernel symbols).
A method that learns (tinytta on tiny-cnn) gives every sample the host build's prediction under
qemu-aarch64, with the LLVM kernels and with the C kernels alike.
"""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgetune.adapt import fit, prepare
from edgetune.deploy import Built, TargetProject, build_project, save_initial_state, write_stream, write_target_project
from edgetune.deploy.host import HostModel
from edgetune.deploy.project import write_model_sources
from edgetune.errors import CompileError
from edgetune.export import export
from edgetune.simulate import run_program, stream_samples
from conftest import needs_tool

N = 40
TOL = 1e-4
LINUX = ("rpi4", "android-arm64")
PLAN_SYMBOL = re.compile(r"__tvm_ffi_f_([0-9a-f]{8})_\w+")

pytestmark = [pytest.mark.toolchain,
              needs_tool("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objdump", "aarch64-linux-gnu-nm",
                         "qemu-aarch64-static", "make", "gcc")]


@pytest.fixture(scope="module")
def bundle(tiny_cnn, digits, tmp_path_factory) -> Path:
    """tinytta on tiny-cnn, exported; lr 1e-2 so its parameters move far enough for a wrong step to show."""
    adaptable = prepare(copy.deepcopy(tiny_cnn[0]), "tinytta", {"lr": "0.01"}, model_name="tiny-cnn")
    fit(adaptable, digits, progress=False)
    out = tmp_path_factory.mktemp("tinytta")
    export(adaptable, digits, out, progress=False)
    save_initial_state(out, adaptable.method)
    return out


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    x, _, resets, feedback = stream_samples("digits", ("gaussian_noise",), 5, "episodic", N)
    return x, write_stream(tmp_path_factory.mktemp("stream") / "stream.bin", x, resets, feedback, 10)


@pytest.fixture(scope="module")
def projects(bundle) -> dict[str, TargetProject]:
    return {t: write_target_project(bundle, t) for t in LINUX}


@pytest.fixture(scope="module")
def host(bundle, stream) -> tuple[list[int], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The host build of the bundle's generated C (the C target's lowering) over the stream: predictions,
    final state, initial state."""
    model = HostModel(bundle)
    initial = {k: v.copy() for k, v in model.state().items()}
    predictions = [model.step(x).prediction for x in stream[0]]
    return predictions, model.state(), initial


def _tool(*cmd: str, cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout


def _plan_ids(text: str) -> set[str]:
    return set(PLAN_SYMBOL.findall(text))


def test_each_linux_target_has_its_own_plan_in_driver_object_and_c_kernels(projects):
    ids = {}
    for target, project in projects.items():
        model = project.directory / "model"
        driver = _plan_ids((model / "et_model_gen.c").read_text())
        assert len(driver) == 1, driver  # every frozen kernel the driver calls is of one plan
        ids[target] = driver.pop()
        symbols = _tool("aarch64-linux-gnu-nm", "--defined-only", str(model / "et_kernels_llvm.o"))
        obj = set(re.findall(r" T (__tvm_ffi_f_\w+)", symbols))
        defined = r"^(?:TVM_DLL )?int32_t (__tvm_ffi_f_\w+)\([^)]*\) \{"
        c = set(re.findall(defined, (model / "et_kernels.c").read_text(), re.M))
        assert obj and obj == c  # the LLVM object and KERNELS=c define the same frozen kernels
        assert _plan_ids(" ".join(obj)) == {ids[target]}
    assert ids["rpi4"] != ids["android-arm64"]


def test_only_android_kernels_use_the_dot_product(projects):
    for target, project in projects.items():
        listing = _tool("aarch64-linux-gnu-objdump", "-d", str(project.directory / "model" / "et_kernels_llvm.o"))
        assert bool(re.search(r"\bsdot\b", listing)) is (target == "android-arm64"), target


def _kernels_c_build(project: TargetProject, where: Path) -> subprocess.CompletedProcess:
    """``make KERNELS=c`` of a copy of the project, with the target's cross compiler."""
    if where.exists():
        shutil.rmtree(where)
    shutil.copytree(project.directory, where, ignore=shutil.ignore_patterns("build", "sim"))
    return subprocess.run(["make", "-j2", "KERNELS=c", "build/edgetune-run"], cwd=where,
                          capture_output=True, text=True)


@pytest.mark.parametrize("target", LINUX)
def test_device_predictions_equal_the_host_build_with_llvm_and_c_kernels(projects, host, stream, target, tmp_path):
    """Per sample, with adaptation: the program under qemu-aarch64 (the plan's LLVM kernels, then the same
    plan's C kernels built with ``make KERNELS=c``) predicts what the host build predicts, and the
    adapted state ends within 1e-4 of the host build's (the training step is the same C-target lowering)."""
    project = projects[target]
    c_build = _kernels_c_build(project, tmp_path / "kernels-c")
    assert c_build.returncode == 0, c_build.stderr[-500:]
    c_project = TargetProject.load(tmp_path / "kernels-c")
    runs = {"llvm": run_program(build_project(project), stream[1], tmp_path / "llvm"),
            "c": run_program(Built(c_project, c_project.directory / c_project.program, 0, 0, {}), stream[1],
                             tmp_path / "c")}
    predictions, state, initial = host
    for kind, run in runs.items():
        assert run.records["prediction"].tolist() == predictions, kind
        assert set(run.state) == set(state)
        for name, value in state.items():
            assert np.allclose(run.state[name], value, atol=TOL, rtol=0), (kind, name)
    assert any(not np.allclose(state[n], initial[n], atol=1e-3) for n in state)  # the step really adapted


def test_a_driver_never_links_with_kernels_of_another_plan(bundle, projects, tmp_path):
    """The host build's C kernels (C-target plan), or the other Linux target's kernels, in place of the
    project's: the link fails naming a kernel of the driver's plan, for make's default (LLVM object)
    and for ``KERNELS=c`` alike."""
    android, rpi4 = projects["android-arm64"], projects["rpi4"]
    plan = _plan_ids((android.directory / "model" / "et_model_gen.c").read_text()).pop()
    write_model_sources(bundle, tmp_path / "host-model")
    swapped = tmp_path / "c-plan"
    shutil.copytree(android.directory, swapped, ignore=shutil.ignore_patterns("build", "sim"))
    shutil.copyfile(tmp_path / "host-model" / "et_kernels.c", swapped / "model" / "et_kernels.c")
    proc = subprocess.run(["make", "-j2", "KERNELS=c", "build/edgetune-run"], cwd=swapped, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and f"undefined reference to `__tvm_ffi_f_{plan}_" in proc.stderr
    shutil.copyfile(rpi4.directory / "model" / "et_kernels_llvm.o", swapped / "model" / "et_kernels_llvm.o")
    proc = subprocess.run(["make", "-j2", "build/edgetune-run"], cwd=swapped, capture_output=True, text=True)
    assert proc.returncode != 0 and f"undefined reference to `__tvm_ffi_f_{plan}_" in proc.stderr


def test_kernels_object_only_for_the_lowering_it_was_planned_for(bundle, tmp_path):
    from edgetune.compilers.model import emit_kernels_object
    from edgetune.deploy.project import _generate
    from edgetune.targets import get_target

    _, c_plan = _generate(bundle)
    assert c_plan.tvm_target is None and c_plan.frozen_prefix == "f_"
    with pytest.raises(CompileError, match=r"^emit: the kernels were lowered for the C target, not .*cortex-a72"):
        emit_kernels_object(c_plan, get_target("rpi4").tvm_target, tmp_path / "k.o")
    _, android = _generate(bundle, tvm_target=get_target("android-arm64").tvm_target)
    with pytest.raises(CompileError, match=r"lowered for .*cortex-a55.*, not .*cortex-a72"):
        emit_kernels_object(android, get_target("rpi4").tvm_target, tmp_path / "k.o")
    assert not (tmp_path / "k.o").exists()
