"""C-source emitter for microcontrollers: TVM's C kernels plus a driver generated from the static plan.

No TVM runtime runs on the device. The emitted files are:

* ``<prefix>_kernels.c`` — TVM's C codegen of every kernel, asserts stripped
  (``tirx.disable_assert``), each exported as ``__tvm_ffi_<prefix>_<kernel>``;
* ``<prefix>_model.c`` / ``<prefix>_model.h`` — constants as ``const`` arrays (flash), and
  ``<prefix>_run(arena, inputs..., outputs...)``: the plan's calls in order, every tensor a
  ``DLTensor`` into the caller's arena (``<PREFIX>_ARENA_BYTES``, 64-byte aligned), inputs
  or outputs;
* ``tvm_workspace.c`` — the two backend symbols the kernels need (a LIFO workspace pool of
  ``EDGETUNE_WORKSPACE_BYTES``); one per firmware, whatever number of programs it links;
* ``include/`` — the tvm-ffi / dlpack headers the kernels include (from the TVM wheel).

The driver is C99 and builds warning-free with ``-Wall -Wextra``.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm

from edgetune.compilers.dsp_kernels import HEADER as DSP_HEADER
from edgetune.compilers.emit import kernel_module
from edgetune.compilers.plan import ALIGNMENT, StaticPlan
from edgetune.errors import CompileError
from edgetune.targets import RUNTIME_DIR

CTYPES = {"float32": "float", "float64": "double", "int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t",
          "uint16": "uint16_t", "int32": "int32_t", "uint32": "uint32_t", "int64": "int64_t", "uint64": "uint64_t",
          "bool": "uint8_t"}
DLCODES = {"int": "kDLInt", "uint": "kDLUInt", "float": "kDLFloat", "bool": "kDLBool"}
HEADERS = [("tvm_ffi", "include/tvm/ffi/c_api.h", "tvm/ffi/c_api.h"),
           ("tvm_ffi", "include/tvm/ffi/extra/c_env_api.h", "tvm/ffi/extra/c_env_api.h"),
           ("tvm_ffi", "include/dlpack/dlpack.h", "dlpack/dlpack.h"),
           ("tvm", "include/tvm/runtime/base.h", "tvm/runtime/base.h"),
           ("tvm", "include/tvm/runtime/c_backend_api.h", "tvm/runtime/c_backend_api.h")]


@dataclass(frozen=True)
class CSources:
    """The emitted files; compile ``sources`` with ``-I include_dir``."""

    kernels: Path
    model: Path
    header: Path
    workspace: Path
    include_dir: Path

    @property
    def sources(self) -> tuple[Path, ...]:
        return (self.kernels, self.model, self.workspace)


def dl_dtype(dtype: str) -> str:
    """The C initialiser of a ``DLDataType`` for a tensor dtype name ("int8" -> "{kDLInt, 8, 1}").

    Raises:
        CompileError: a dtype with no DLPack code.
    """
    if dtype == "bool":
        return "{kDLBool, 8, 1}"
    m = re.fullmatch(r"([a-z]+)(\d+)", dtype)
    if m is None or m.group(1) not in DLCODES:
        raise CompileError(f"emit: dtype {dtype!r} has no DLPack code; only int/uint/float/bool tensors")
    return "{%s, %s, 1}" % (DLCODES[m.group(1)], m.group(2))


def _c_literals(arr: np.ndarray) -> str:
    flat = arr.reshape(-1)
    if flat.dtype.kind == "f":
        items = [float(v).hex() + ("f" if flat.dtype == np.float32 else "") if np.isfinite(v)
                 else ("NAN" if np.isnan(v) else ("INFINITY" if v > 0 else "-INFINITY")) for v in flat]
    elif flat.dtype == np.int64:
        items = [f"INT64_C({int(v)})" for v in flat]
    else:
        items = [str(int(v)) for v in flat]
    rows = [", ".join(items[i:i + 16]) for i in range(0, len(items), 16)]
    return "  " + ",\n  ".join(rows) if rows else "  0"


KERNELS_PROLOGUE = """/* TVM-generated kernels (edgetune), asserts stripped. Do not edit. */
#if defined(__GNUC__) && !defined(__clang__)
/* The same code at the project's -O level, whatever it is: the loops that need unrolling are unrolled
 * in this source already (compilers/unroll.py), and GCC's -Os would spill a register tile's
 * accumulators to the stack (2x the instructions on a Cortex-M4). No FMA contraction: results stay
 * bit-exact with the host oracle. */
#pragma GCC optimize("O3", "fp-contract=off")
#endif
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wunused-variable"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#endif
#if defined(__arm__) && !defined(__ARM_FEATURE_DIRECTED_ROUNDING)
/* nearbyintf without a libm call where the FPU has no round-to-integral instruction (Cortex-M4):
 * adding and subtracting 2^23 rounds to an integer in the default rounding mode, round half to
 * even, exactly as nearbyintf does for every float (larger magnitudes are integers already). */
static inline float et_nearbyintf(float x) {
  if (x < 8388608.0f && x > -8388608.0f) {
    float m = x >= 0.0f ? 8388608.0f : -8388608.0f;
    return (x + m) - m;
  }
  return x;
}
#else
#include <math.h>
#define et_nearbyintf nearbyintf /* one instruction (VRINTR, FRINTX) or the host's libm */
#endif
"""


def c_kernels(source: str) -> str:
    """TVM's C kernel source as edgetune ships it: the prologue above, rounding through
    ``et_nearbyintf``, and the DSP micro-kernels' header where a kernel calls one (``dsp_kernels``)."""
    source = re.sub(r"^TVM_DLL float nearbyintf\(float\);\n", "", source, flags=re.M)  # TVM's extern declarations
    # the micro-kernels are static inline functions of the header, not the externs TVM declares
    source = re.sub(r"^TVM_DLL int32_t et_dsp_\w+\([^;]*\);\n", "", source, flags=re.M)
    prologue = KERNELS_PROLOGUE + (f'#include "{DSP_HEADER}"\n' if "et_dsp_" in source else "")
    return prologue + source.replace("nearbyintf(", "et_nearbyintf(")


def write_kernels(lowered: tvm.IRModule, plan: StaticPlan, path: Path, prefix: str) -> Path:
    """TVM's C codegen of the plan's kernels, asserts stripped."""
    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
        built = tvm.tirx.build(kernel_module(lowered, plan, prefix), target=tvm.target.Target({"kind": "c"}))
    # TVM's C codegen leaves unused shape/device locals and packed-API parameters behind; they are
    # harmless, and silencing them keeps the firmware build -Wall -Wextra -Werror clean
    path.write_text(c_kernels(built.inspect_source()))
    return path


# Per-call timing for benchmarks (benchmarks/bench_kernels.py builds with -DEDGETUNE_PROFILE and defines the
# hook); without the define the hook compiles to nothing, so shipped firmware is unchanged.
PROFILE_HOOK = """#ifdef EDGETUNE_PROFILE
void %(prefix)s_profile(int32_t call, int32_t end); /* end = 0 before the call, 1 after it */
#define ET_PROFILE(call, end) %(prefix)s_profile((call), (end))
#else
#define ET_PROFILE(call, end) ((void)0)
#endif
"""


def write_driver(plan: StaticPlan, constants: dict[str, np.ndarray], out_dir: Path, prefix: str,
                 source: str) -> tuple[Path, Path]:
    """``<prefix>_model.c`` / ``.h``: constants, the call sequence and the arena layout of ``plan``."""
    upper = prefix.upper()
    inputs = [plan.buffer(n) for n in plan.inputs]
    outputs = [plan.buffer(n) for n in plan.outputs]
    in_params = [f"const {CTYPES[b.dtype]}* {_ident(b.name)}" for b in inputs]
    out_params = [f"{CTYPES[b.dtype]}* out{i}" for i, b in enumerate(outputs)]
    signature = f"int32_t {prefix}_run(uint8_t* arena, {', '.join(in_params + out_params)})"

    h = [f"/* {prefix}: generated by edgetune from {source} (do not edit). */",
         f"#ifndef {upper}_MODEL_H_", f"#define {upper}_MODEL_H_", "#include <stdint.h>", "",
         f"#define {upper}_ARENA_BYTES {plan.arena_bytes}u",
         f"#define {upper}_WORKSPACE_BYTES {plan.workspace_bytes}u  /* largest kernel scratch (tvm_workspace.c) */",
         f"#define {upper}_ALIGNMENT {plan.alignment}u  /* arena, inputs and outputs must be aligned to this */"]
    for i, b in enumerate(inputs):
        h.append(f"#define {upper}_IN{i}_ELEMS {int(np.prod(b.shape))}u  /* {b.name} {list(b.shape)} {b.dtype} */")
    for i, b in enumerate(outputs):
        h.append(f"#define {upper}_OUT{i}_ELEMS {int(np.prod(b.shape))}u  /* {b.name} {list(b.shape)} {b.dtype} */")
    h += ["", "/* Runs the program once; returns 0, or the failing kernel's status. */", f"{signature};",
          "#endif", ""]

    c = [f"/* {prefix}: generated by edgetune from {source} (do not edit). */", "#include <stddef.h>",
         "#include <stdint.h>", '#include "tvm/ffi/c_api.h"', f'#include "{prefix}_model.h"', "",
         PROFILE_HOOK % {"prefix": prefix}]
    kernels = [k.name for k in plan.kernels]
    for k in kernels:
        c.append(f"int32_t __tvm_ffi_{prefix}_{k}(void* self, void* args, int32_t num_args, void* result);")
    c.append("")
    for const in plan.constants:
        arr = constants[const.name]
        c.append(f"/* {const.name}: {list(const.shape)} {const.dtype} */")
        c.append(f"static const {CTYPES[const.dtype]} {prefix}_{const.name}[{max(1, arr.size)}] "
                 f"__attribute__((aligned({ALIGNMENT}))) = {{\n{_c_literals(arr)}\n}};")
    c.append("")

    shapes: dict[tuple[int, ...], str] = {}

    def shape_name(shape: tuple[int, ...]) -> str:
        if shape not in shapes:
            shapes[shape] = f"shape{len(shapes)}"
        return shapes[shape]

    out_index = {b.name: i for i, b in enumerate(outputs)}

    def data_expr(name: str) -> tuple[str, tuple[int, ...], str]:
        if name in {k.name for k in plan.constants}:
            const = next(k for k in plan.constants if k.name == name)
            return f"(void*){prefix}_{name}", const.shape, const.dtype
        b = plan.buffer(name)
        root = plan.root(name)
        if root.kind == "input":
            ptr = f"(void*){_ident(root.name)}"
        elif root.kind == "output":
            ptr = f"(void*)out{out_index[root.name] if root.name in out_index else root.index}"
        else:
            ptr = f"(void*)(arena + {root.offset})"
        return ptr, b.shape, b.dtype

    body = []
    for i, call in enumerate(plan.calls):
        body.append(f"  {{ /* {i}: {call.kernel} */")
        body.append(f"    DLTensor t[{len(call.args)}] = {{")
        for arg in call.args:
            ptr, shape, dtype = data_expr(arg)
            body.append(f"      {{{ptr}, {{kDLCPU, 0}}, {len(shape)}, {dl_dtype(dtype)}, "
                        f"(int64_t*){shape_name(shape)}, NULL, 0}},  /* {arg} */")
        body.append("    };")
        body.append(f"    TVMFFIAny a[{len(call.args)}];")
        body.append(f"    for (int i = 0; i < {len(call.args)}; ++i) {{")
        body.append("      a[i].type_index = kTVMFFIDLTensorPtr;")
        body.append("      a[i].zero_padding = 0;")
        body.append("      a[i].v_ptr = &t[i];")
        body.append("    }")
        body.append(f"    ET_PROFILE({i}, 0);")
        body.append(f"    rc = __tvm_ffi_{prefix}_{call.kernel}(NULL, a, {len(call.args)}, &ret);")
        body.append(f"    ET_PROFILE({i}, 1);")
        body.append("    if (rc != 0) return rc;")
        body.append("  }")
    for shape, name in shapes.items():
        dims = ", ".join(str(d) for d in shape) or "1"
        c.append(f"static const int64_t {name}[{max(1, len(shape))}] = {{{dims}}};")
    c += ["", f"{signature} {{", "  int32_t rc;", "  TVMFFIAny ret;"]
    if not plan.arena_bytes:
        c.append("  (void)arena;")
    c += body + ["  (void)ret;", "  return 0;", "}", ""]
    header = out_dir / f"{prefix}_model.h"
    model = out_dir / f"{prefix}_model.c"
    header.write_text("\n".join(h))
    model.write_text("\n".join(c))
    return model, header


def _ident(name: str) -> str:
    ident = re.sub(r"\W", "_", name)
    return ident if ident and not ident[0].isdigit() else f"t_{ident}"


WORKSPACE_C = r"""/* TVM backend symbols for kernels that run without TVM's runtime (generated by edgetune).
 * Kernels allocate scratch in LIFO order and free it before returning, so one static pool
 * of the largest kernel's need suffices. Define EDGETUNE_WORKSPACE_BYTES to the largest
 * <PREFIX>_WORKSPACE_BYTES of every program linked into the firmware. */
#include <stddef.h>
#include <stdint.h>
#include "tvm/runtime/c_backend_api.h"

#ifndef EDGETUNE_WORKSPACE_BYTES
#define EDGETUNE_WORKSPACE_BYTES %(bytes)du
#endif
#define EDGETUNE_WORKSPACE_ALIGN %(align)du

static uint8_t g_workspace[EDGETUNE_WORKSPACE_BYTES + EDGETUNE_WORKSPACE_ALIGN]
    __attribute__((aligned(EDGETUNE_WORKSPACE_ALIGN)));
static size_t g_top = 0;

void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint) {
  size_t n = ((size_t)nbytes + EDGETUNE_WORKSPACE_ALIGN - 1u) & ~(size_t)(EDGETUNE_WORKSPACE_ALIGN - 1u);
  void* p;
  (void)device_type;
  (void)device_id;
  (void)dtype_code_hint;
  (void)dtype_bits_hint;
  if (g_top + n > sizeof(g_workspace)) return NULL; /* the kernel then returns -1 */
  p = g_workspace + g_top;
  g_top += n;
  return p;
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {
  size_t off = (size_t)((uint8_t*)ptr - g_workspace);
  (void)device_type;
  (void)device_id;
  if (off < g_top) g_top = off; /* LIFO release */
  return 0;
}

/* TVM's LLVM objects call the backend through these function-pointer variables. */
void* __TVMBackendAllocWorkspace = (void*)&TVMBackendAllocWorkspace;
void* __TVMBackendFreeWorkspace = (void*)&TVMBackendFreeWorkspace;
"""


def write_workspace(path: Path, workspace_bytes: int) -> Path:
    path.write_text(WORKSPACE_C % {"bytes": max(workspace_bytes, 1), "align": ALIGNMENT})
    return path


def copy_headers(include_dir: Path) -> Path:
    """The headers TVM's C kernels include, copied from the installed tvm / tvm-ffi wheels."""
    import tvm_ffi

    roots = {"tvm": Path(tvm.__file__).parent, "tvm_ffi": Path(tvm_ffi.__file__).parent}
    for package, src, dst in HEADERS:
        target = include_dir / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(roots[package] / src, target)
    return include_dir


def emit_c_source(lowered: tvm.IRModule, plan: StaticPlan, constants: dict[str, np.ndarray], out_dir: Path,
                  prefix: str, source: str = "a Relax module") -> CSources:
    """Write the C sources of ``plan`` (see the module docstring) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kernels = write_kernels(lowered, plan, out_dir / f"{prefix}_kernels.c", prefix)
    model, header = write_driver(plan, constants, out_dir, prefix, source)
    workspace = write_workspace(out_dir / "tvm_workspace.c", plan.workspace_bytes)
    include = copy_headers(out_dir / "include")
    if DSP_HEADER in kernels.read_text():
        shutil.copyfile(RUNTIME_DIR / DSP_HEADER, include / DSP_HEADER)
    return CSources(kernels, model, header, workspace, include)
