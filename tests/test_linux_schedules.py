"""Linux-target schedules: the dot-product conv schedule (android-arm64: LLVM emits ``sdot``) is chosen
only where the CPU has the instruction, and its outputs equal onnxruntime's integer session bit for bit
when the program runs under qemu-aarch64 (the benchmark's way: ``benchmarks/bench_linux.py``)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm

from edgetune.compilers.schedule import ScheduleConfig, has_dot_product
from edgetune.targets import get_target
from conftest import needs_tool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.parametrize("name, dot", [("android-arm64", True), ("rpi4", False), ("rpi-zero-2w", False),
                                       ("host", False), ("cortex-m4", False)])
def test_dot_schedule_only_where_the_cpu_has_a_dot_product(name, dot):
    target = tvm.target.Target(dict(get_target(name).tvm_target))
    assert has_dot_product(target) is dot
    assert ScheduleConfig.for_target(target).dot is dot


def test_c_targets_keep_their_schedule_knobs():
    # the Cortex-M C source path must not move: same knobs as before the Linux schedules existed
    assert ScheduleConfig.for_target(tvm.target.Target({"kind": "c"})) == ScheduleConfig(lanes=4, oc_tile=2,
                                                                                          vectorize=False, dot=False)


def _objdump(path: Path) -> str:
    return subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(path)], capture_output=True, text=True,
                          check=True).stdout


@needs_tool("qemu-aarch64-static", "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objdump")
def test_aarch64_programs_are_bit_exact_and_only_android_uses_sdot(tmp_path):
    import bench_linux as bl
    from bench_kernels import frozen_model

    frozen, _ = frozen_model("tiny-cnn", tmp_path)
    x = bl.test_images("tiny-cnn", 3)
    ref = bl.session(frozen, True)
    expected = np.concatenate([np.concatenate([o.ravel() for o in ref.run(None, {"x": x[i:i + 1]})])
                               for i in range(len(x))])
    (tmp_path / "in.bin").write_bytes(np.ascontiguousarray(x).tobytes())
    for target, dot in (("android-arm64", True), ("rpi4", False)):
        program, graph = bl.frozen_program(frozen, target, tmp_path)
        dot_convs = [k.name for k in graph.plan.kernels if k.schedule.startswith("dot conv")]
        assert bool(dot_convs) is dot, graph.plan.kernels
        assert bool(re.search(r"\bsdot\b", _objdump(graph.artifacts["kernels_o"]))) is dot
        cmd = ["qemu-aarch64-static", "-L", str(bl.guest_root(target, tmp_path)), "-cpu", bl.QEMU_CPU[target][0],
               str(program), "in.bin", "out.bin", str(len(x))]
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=300)
        out = np.fromfile(tmp_path / "out.bin", np.float32)
        assert out.shape == expected.shape
        assert np.array_equal(out, expected), f"{target}: {int((out != expected).sum())} values differ"
