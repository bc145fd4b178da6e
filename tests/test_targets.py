"""Targets are data: the shipped descriptions, the loader's checks, and what is derived from them."""
from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from edgetune.errors import ConfigError
from edgetune.targets import BOARD_DIR, HERE, RUNTIME_DIR, get_target, list_targets, load_target

KB, MB = 1024, 1024 * 1024
EXPECTED = {  # name: (kind, RAM budget, flash budget, simulated machine or None)
    "host": ("host", None, None, None),
    "rpi4": ("linux", None, None, None),
    "rpi-zero-2w": ("linux", 512 * MB, None, None),
    "android-arm64": ("linux", None, None, None),
    "cortex-m4": ("mcu", 256 * KB, 1 * MB, "mps2-an386"),
    "cortex-m7": ("mcu", 512 * KB, 2 * MB, "mps2-an500"),
    "cortex-m55": ("mcu", 512 * KB, 2 * MB, "mps3-an547"),
}


def test_shipped_targets_have_the_designed_budgets_and_simulators():
    targets = {t.name: t for t in list_targets()}
    assert set(targets) == set(EXPECTED)
    for name, (kind, ram, flash, machine) in EXPECTED.items():
        t = targets[name]
        assert (t.kind, t.ram_bytes, t.flash_bytes) == (kind, ram, flash), name
        assert (t.board.machine if t.board else None) == machine
        if machine:
            cmd = t.simulator_command("fw.elf", ["run", "3"])
            assert cmd[:3] == ["qemu-system-arm", "-M", machine]
            assert {"-semihosting", "-nographic"} <= set(cmd) and cmd[cmd.index("-icount") + 1] == "shift=0"
            assert cmd[cmd.index("-kernel") + 1] == "fw.elf" and cmd[cmd.index("-append") + 1] == "run 3"
    assert [t.kind for t in list_targets()] == sorted((t.kind for t in list_targets()),
                                                      key=("host", "linux", "mcu").index)
    # Linux boards run under qemu-aarch64-static; the Android binary is static, so no sysroot
    assert targets["rpi4"].simulator_command("edgetune-run", ["-x"]) == [
        "qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu", "edgetune-run", "-x"]
    android = targets["android-arm64"]
    assert android.toolchain.static and "-static" in android.toolchain.link_flags
    assert android.simulator_command("a", ["b"]) == ["qemu-aarch64-static", "a", "b"]
    assert targets["host"].simulator_command("prog", ["x"]) == ["prog", "x"]


def test_cortex_m_flags_match_each_cpu():
    flags = {n: get_target(n).toolchain.compile_flags for n in ("cortex-m4", "cortex-m7", "cortex-m55")}
    assert {"-mcpu=cortex-m4", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"} <= set(flags["cortex-m4"])
    assert {"-mcpu=cortex-m7", "-mfloat-abi=hard", "-mfpu=fpv5-d16"} <= set(flags["cortex-m7"])
    assert {"-mcpu=cortex-m55", "-mfloat-abi=hard"} <= set(flags["cortex-m55"])
    for n in flags:
        t = get_target(n)
        assert "--specs=rdimon.specs" in t.toolchain.link_flags and "-lrdimon" in t.toolchain.libs
        assert t.tvm_target["kind"] == "c" and t.tvm_target["mcpu"] == n
        assert t.tvm_llvm_target["kind"] == "llvm" and t.tvm_llvm_target["mtriple"].startswith("thumbv")


def test_tvm_accepts_every_target_and_sees_the_cpu_features():
    tvm = pytest.importorskip("tvm")
    features = {}
    for t in list_targets():
        for spec in (t.tvm_target, t.tvm_llvm_target):
            tt = tvm.target.Target(spec)
            features[(t.name, spec["kind"])] = {k: bool(v) for k, v in tt.attrs.items() if k.startswith("feature.")}
    assert features[("android-arm64", "llvm")]["feature.has_dotprod"]
    assert not features[("rpi4", "llvm")]["feature.has_dotprod"]
    assert features[("rpi4", "llvm")]["feature.has_asimd"]
    assert features[("cortex-m4", "c")]["feature.has_dsp"] and not features[("cortex-m4", "c")]["feature.has_mve"]
    assert features[("cortex-m55", "llvm")]["feature.has_mve"]
    t = get_target("rpi4").tvm_target
    t["mcpu"] = "changed"
    assert get_target("rpi4").tvm_target["mcpu"] == "cortex-a72"  # a fresh dict each time: the target is frozen


@pytest.mark.parametrize("name,per_tick", [("cortex-m4", 40.0), ("cortex-m7", 40.0), ("cortex-m55", 31.25)])
def test_ticks_convert_to_instructions_with_the_simulated_clock(name, per_tick):
    assert get_target(name).ticks_to_instructions(1000) == pytest.approx(1000 * per_tick)


def test_ticks_need_a_microcontroller():
    with pytest.raises(ConfigError, match="target rpi4: no simulated SysTick clock"):
        get_target("rpi4").ticks_to_instructions(5)


def test_linker_script_carries_the_budget():
    for name in ("cortex-m4", "cortex-m7", "cortex-m55"):
        t = get_target(name)
        script = t.linker_script(stack_bytes=4096, heap_bytes=1024)
        assert "@" not in script.replace("@0x", "")  # every placeholder filled
        assert f"LENGTH = {t.ram_bytes}" in script and str(t.flash_bytes) in script
        assert "__stack_size = 4096;" in script and "__heap_size  = 1024;" in script
        assert "REGION_ALIAS(\"VECTOR_REGION\"" in script
    assert f"__stack_size = {get_target('cortex-m4').board.stack_bytes};" in get_target("cortex-m4").linker_script()


def test_linker_script_errors():
    with pytest.raises(ConfigError, match="target host: no board support"):
        get_target("host").linker_script()
    with pytest.raises(ConfigError, match="stack_bytes 100 is not a multiple of 8 >= 256.*heap_bytes 3"):
        get_target("cortex-m4").linker_script(stack_bytes=100, heap_bytes=3)
    with pytest.raises(ConfigError, match="leave nothing of the 262144 bytes of RAM"):
        get_target("cortex-m4").linker_script(stack_bytes=200 * 1024, heap_bytes=100 * 1024)


def test_unknown_target_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown name 'cortex-m5'.*did you mean 'cortex-m55'"):
        get_target("cortex-m5")


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(data))
    return p


def test_a_target_file_of_ones_own_loads_by_path(tmp_path):
    data = json.loads((HERE / "cortex-m4.json").read_text())
    data.update(name="my-board", description="my STM32F411 with 128 KB", memory={"ram_bytes": 131072,
                                                                                 "flash_bytes": 524288})
    t = get_target(str(_write(tmp_path, "my-board", data)))
    assert (t.name, t.ram_bytes, t.board.machine) == ("my-board", 131072, "mps2-an386")
    assert "LENGTH = 131072" in t.linker_script()


def test_loader_lists_every_problem_at_once(tmp_path):
    data = json.loads((HERE / "cortex-m4.json").read_text())
    del data["cpu"]
    data["colour"] = "red"
    data["kind"] = 3
    with pytest.raises(ConfigError) as err:
        load_target(_write(tmp_path, "cortex-m4", data))
    msg = str(err.value)
    assert "unknown key 'colour'" in msg and "missing key 'cpu'" in msg and "'kind' must be a string" in msg

    data = json.loads((HERE / "cortex-m4.json").read_text())
    data["memory"] = {"ram_bytes": None, "flash_bytes": -1}
    data["toolchain"]["cflags"] = "-O2"
    with pytest.raises(ConfigError) as err:
        load_target(_write(tmp_path, "cortex-m4", data))
    msg = str(err.value)
    assert "memory: 'flash_bytes' must be an integer or null (got -1)" in msg
    assert "toolchain: 'cflags' must be a list of strings" in msg

    data = json.loads((HERE / "cortex-m4.json").read_text())
    data["memory"]["ram_bytes"] = None
    data["board"]["machine"] = "stm32f4-disco"
    data["kind"] = "mcu"
    with pytest.raises(ConfigError) as err:
        load_target(_write(tmp_path, "other-name", data))
    msg = str(err.value)
    assert "differs from the file name 'other-name'" in msg
    assert "needs memory.ram_bytes and memory.flash_bytes" in msg
    assert "board.machine 'stm32f4-disco' has no board/<machine>/link.ld.in (known: mps2-an386" in msg

    data = json.loads((HERE / "host.json").read_text())
    data["kind"] = "phone"
    data["tvm_target"] = {"mcpu": "x"}
    data["simulator"] = {"argv": ["qemu"], "clock_hz": None}
    with pytest.raises(ConfigError) as err:
        load_target(_write(tmp_path, "host", data))
    msg = str(err.value)
    assert "kind 'phone' is not one of host, linux, mcu" in msg and "tvm_target has no \"kind\"" in msg
    assert "simulator.argv never mentions {program}" in msg

    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read it as JSON"):
        load_target(tmp_path / "broken.json")


def test_package_data_ships_every_target_file():
    """pip install . (not only editable) must carry the JSON files, the runtime and the boards."""
    pyproject = tomllib.loads((HERE.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["edgetune.targets"]
    shipped = {p for pattern in patterns for p in HERE.glob(pattern) if p.is_file()}
    needed = {p for p in HERE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert needed - shipped == set()
    assert {p.name for p in RUNTIME_DIR.glob("*.h")} >= {"edgetune_runtime.h", "et_runtime.h", "et_ckpt.h"}
    assert (BOARD_DIR / "cortex-m" / "startup.c") in shipped


@pytest.mark.toolchain
@pytest.mark.parametrize("name", ["rpi4", "android-arm64"])
def test_aarch64_flags_build_a_program_the_simulator_runs(name, tmp_path):
    t = get_target(name)
    missing = [tool for tool in (t.toolchain.cc, t.simulator.argv[0]) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    src = tmp_path / "hello.c"
    src.write_text('#include <stdio.h>\nint main(int c, char **v) { printf("hi %s\\n", v[c - 1]); return 7; }\n')
    exe = tmp_path / "hello"
    subprocess.run([t.toolchain.cc, *t.toolchain.compile_flags, str(src), *t.toolchain.link_flags, "-o", str(exe),
                    *t.toolchain.libs], check=True)
    proc = subprocess.run(t.simulator_command(exe, ["there"]), capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (7, "hi there\n")
    if shutil.which("file"):
        kind = subprocess.run(["file", str(exe)], capture_output=True, text=True).stdout
        assert ("statically linked" in kind) == t.toolchain.static
