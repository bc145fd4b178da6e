"""A firmware's flash and SRAM from the ONNX graphs alone, before any TVM work (onnx + numpy only).

``write_target_project`` compiles a bundle for minutes before the generated model's exact
figures exist; a model that cannot fit should be refused in seconds. This estimate reads only
the graphs' shapes and constants and mirrors what the compiler will make of them:

* flash: per quantised Conv/Gemm/MatMul its int8 weight, an int32 bias (always: it carries the
  input zero-point correction) and a float32 requantisation scale per output channel; the
  tables and scalar parameters each int8 rule of the op table (``edgetune.export.ops``) builds at
  compile time (``RULE_CONSTANTS``: a 256-entry int8 lookup table, Softmax's float32 exp table,
  the 1 KB dequantisation table of a mean or an average pool); every other initialiser (float
  islands, the method's parameters and constants) in float32; the initial values of the RAM
  tensors; each constant 64-byte aligned, as the emitter lays them out. Code: a base, a call
  record per kernel and the kernel's code by its op-table kernel family (``FAMILY_CODE_BYTES``),
  all measured on linked Cortex-M firmware (``benchmarks/budget_estimate.py``).
* SRAM: the kernel workspace (the largest of: a conv's padded input band, the float32 result
  a float island or a quantised mean computes before quantising it in the same kernel, the
  mean's packet accumulators); the activation arena from a static liveness plan over the ONNX shapes, allocated the
  way TVM's ``StaticPlanBlockMemory`` shares storage (one pool per dtype, a freed block is reused
  by a request within a factor 16 of its size, growing it when smaller), int8 for quantised
  tensors and float32 otherwise. A tensor lives from its producer to its last consumer; views
  (Reshape/Flatten/Squeeze/Unsqueeze/Identity) and dequantised activations alias their input;
  an op whose only consumers quantise its output is fused into that kernel, and in the float
  method graph an elementwise op into its only elementwise or reducing consumer (TVM's FuseOps).
  A learning method's step keeps every forward tensor for the backward plus a gradient of each
  one a trainable parameter reaches. Then the rows every firmware has: taps, parameters,
  optimizer state, running statistics, I/O, the runtime's work area, static data, stack and heap.

The result is the same ``MemoryBudget`` table ``firmware_budget`` gives after compiling, so a
refusal reads the same before and after.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgetune.deploy.budget import STATIC_DATA_BYTES, MemoryBudget, MemoryRow
from edgetune.export.decompose import decompose_layer_norms
from edgetune.export.ops import FLOAT_ONLY, ISLAND, OP_TABLE, QDQ, float_islands
from edgetune.targets import Target

ALIGN = 64  # the emitter's and the planner's alignment of every constant and arena block
MATCH_RANGE = 16  # StaticPlanBlockMemory reuses a free block within this size factor
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
# Activations the int8 quantiser fuses into the kernel before them (one requantised output).
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu"})
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
ELEMENTWISE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Exp", "Log", "Sqrt", "Pow", "Abs", "Relu", "Sigmoid",
                             "Tanh", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Erf", "Max", "Min", "Where"})
REDUCE_OPS = frozenset({"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin"})
DEQUANT_TABLE_BYTES = 256 * 4  # boundary mean of a pooled tap: one float per int8 value
# Code (runtime + app + board + libc + kernels), fitted as an upper envelope of linked cortex-m4 / cortex-m7
# firmware (arm-none-eabi-gcc -O2, newlib + rdimon; benchmarks/budget_estimate.py, the symbol sizes of
# the generated functions): a base, each int8 kernel of the frozen graph (a call record + its family's
# code), each float kernel of the method graph's forward, and when the method learns, its training step
# (backward kernels, the optimizer, the runtime's guard) with a share per weighted op of the method graph
# (a Conv's backward is two kernels, a Gemm/MatMul's one).
CODE_BASE_BYTES = 62 * 1024 + 512
# a float kernel of the method graph's forward (TVM's fused elementwise / reduction / matmul functions)
CODE_PER_FLOAT_KERNEL_BYTES = 750
CODE_PER_FROZEN_KERNEL_BYTES = 1400  # a kernel family without a measured figure below
# Every int8 kernel's call record in the generated model (argument descriptors, shapes, the call table).
CODE_PER_CALL_BYTES = 280
# Code of one kernel by its family in the op table (``OpRule.family``), an upper envelope of the
# generated functions' sizes in linked cortex-m4 firmware of the zoo and corpus models (TVM emits one
# function per shape: a conv unrolls its kernel window, a lookup table is one indexed load per element).
FAMILY_CODE_BYTES: dict[str, int] = {
    "qconv2d": 2600, "qmatmul": 1150, "elementwise": 300, "lookup table (int8)": 100,
    "qsoftmax (exp table, float32 row sum)": 1000, "ort_mean": 1000, "qglobal_pool": 700, "qavg_pool": 1000,
    "qmax_pool": 800, "data movement (int8)": 300, "float island": 1000, "per-channel affine (float)": 600,
}


@dataclass(frozen=True)
class RuleConstants:
    """Flash an int8 rule's kernel brings in besides the op's own weights: a table built at compile
    time, and whether it carries a block of scalar parameters (scales, zero points: one 64-byte
    aligned constant)."""

    table: int = 0
    scalars: bool = False


# By int8 rule of the op table (``OpRule.int8``); see compilers/int8_tables.py and compilers/boundary.py.
RULE_CONSTANTS: dict[str, RuleConstants] = {
    "lut": RuleConstants(table=256),  # 256 int8 entries
    "softmax": RuleConstants(table=256 * 4, scalars=True),  # float32 exp table indexed by max - x
    "mean": RuleConstants(table=DEQUANT_TABLE_BYTES, scalars=True),  # onnxruntime's float mean, then quantise
    "avg_pool": RuleConstants(table=DEQUANT_TABLE_BYTES, scalars=True),
    "add": RuleConstants(scalars=True), "mul": RuleConstants(scalars=True),
    "global_pool": RuleConstants(scalars=True), "clip": RuleConstants(scalars=True),
    "max_pool": RuleConstants(scalars=True),  # the rescale after the max
}
# float lanes of the quantised mean's accumulators: two packets of Eigen's four (compilers/boundary.py)
MEAN_ACCUMULATOR_LANES = 8
# ops of a float graph the int8 quantiser splits in two kernels: the op -> the second one (HardSwish is
# a lookup table then QLinearMul)
SPLIT_BY_QUANTISER = {"HardSwish": "Mul"}
# a 1x1 conv (no window to unroll): its measured figure instead of the "qconv2d" family's
POINTWISE_CONV_CODE_BYTES = 1400
CODE_LEARNING_BYTES = 42 * 1024
CODE_PER_LEARNED_OP_BYTES = 1300
# bytes of arena per byte of float32 block the step's plan needs: compilers/plan.py declares each
# block at StaticPlanBlockMemory's alloc_storage size, which is in bytes for every dtype
FLOAT_STORAGE_FACTOR = 1


@dataclass(frozen=True)
class GraphEstimate:
    """What one graph takes: flash constants, its arena (planned and the ideal peak), kernel
    workspace, kernels, and its float32 outputs (taps of the frozen graph)."""

    constants: int
    arena: int
    peak: int
    workspace: int
    kernels: int
    outputs: int
    kept: int = 0  # every materialised tensor at once: what a backward keeps of the forward
    adjoints: int = 0  # the materialised tensors that depend on a trainable parameter (each gets a gradient)
    transposed: int = 0  # trainable Gemm weights inference transposes at run time (inputs, not constants)
    code: int = 0  # the kernels' code and call records (FAMILY_CODE_BYTES, CODE_PER_CALL_BYTES)


def _align(n: int) -> int:
    return (max(1, n) + ALIGN - 1) // ALIGN * ALIGN


def _elem_bytes(elem_type: int) -> int:
    return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)


def _value_types(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (static shape, element bytes) of every tensor shape inference resolves."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out: dict[str, tuple[tuple[int, ...], int]] = {}
    g = inferred.graph
    for v in [*g.input, *g.value_info, *g.output]:
        t = v.type.tensor_type
        if t.HasField("shape") and t.elem_type:
            out[v.name] = (tuple(max(1, d.dim_value) for d in t.shape.dim), _elem_bytes(t.elem_type))
    for init in g.initializer:
        out[init.name] = (tuple(init.dims), _elem_bytes(init.data_type))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def plan_arena(tensors: list[tuple[int, str, int, int]]) -> tuple[int, int]:
    """(planned arena, ideal peak) for tensors ``(bytes, pool, birth, death)`` (node indices, inclusive).

    The planned figure follows TVM's ``StaticPlanBlockMemory``: tensors are allocated in birth
    order; a tensor's block is released after its last consumer ran (so a kernel's inputs and
    output never share memory); a request takes the smallest free block of its pool at least as
    large (within ``MATCH_RANGE``), else the largest smaller one within range, grown to fit; else
    a new block. The arena is the sum of the aligned blocks. The peak is the largest sum of live
    tensors at one node: no planner can do better.
    """
    if not tensors:
        return 0, 0
    order = sorted(range(len(tensors)), key=lambda i: (tensors[i][2], i))
    blocks: list[int] = []  # block sizes
    free: dict[str, list[int]] = {}  # pool -> free block ids
    release: dict[int, list[tuple[str, int]]] = {}  # node index after which blocks are freed
    for i in order:
        size, pool, birth, death = tensors[i]
        for t in sorted(k for k in release if k < birth):
            for p, b in release.pop(t):
                free.setdefault(p, []).append(b)
        candidates = free.get(pool, [])
        bigger = [b for b in candidates if size <= blocks[b] <= size * MATCH_RANGE]
        smaller = [b for b in candidates if size // MATCH_RANGE <= blocks[b] < size]
        if bigger:
            block = min(bigger, key=lambda b: (blocks[b], b))
        elif smaller:
            block = max(smaller, key=lambda b: (blocks[b], -b))
            blocks[block] = size
        else:
            blocks.append(size)
            block = len(blocks) - 1
        if block in candidates:
            candidates.remove(block)
        release.setdefault(death, []).append((pool, block))
    arena = sum(_align(b) for b in blocks)
    last = max(t[3] for t in tensors)
    first = min(t[2] for t in tensors)
    peak = max(sum(_align(t[0]) for t in tensors if t[2] <= k <= t[3]) for k in range(first, last + 1))
    return arena, peak


class _Walk:
    """One pass over a graph in node order: which tensors are materialised, and how long they live."""

    def __init__(self, model: onnx.ModelProto, quantize: bool, islands: frozenset[str] = frozenset()) -> None:
        self.graph = model.graph
        self.islands = islands  # nodes the quantiser leaves in float (a LayerNorm written out)
        self.types = _value_types(model)
        self.inits = {i.name: i for i in self.graph.initializer}
        for node in self.graph.node:  # Constant nodes are initialisers too
            if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
                self.inits[node.output[0]] = node.attribute[0].t
        self.const = set(self.inits)  # + values computed from constants alone (folded by the compiler)
        for node in self.graph.node:
            if node.input and all(not n or n in self.const for n in node.input):
                self.const.update(node.output)
        self.producers = {o: node for node in self.graph.node for o in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in self.graph.output}
        self.qdq = any(n.op_type == "QuantizeLinear" for n in self.graph.node)
        self.quantize = quantize

    def nbytes(self, name: str, elem: int | None = None) -> int:
        shape, size = self.types.get(name, ((1,), 4))
        return _numel(shape) * (size if elem is None else elem)

    def fused(self, name: str) -> bool:
        """Not materialised: every consumer finishes this value inside its own kernel."""
        if name in self.outputs or name not in self.consumers:
            return False
        uses = self.consumers[name]
        if self.qdq:
            return all(u.op_type == "QuantizeLinear" for u in uses)
        if self.quantize:
            return len(uses) == 1 and uses[0].op_type in FUSED_ACTIVATIONS
        # float graphs: TVM's FuseOps folds an elementwise op into its only consumer when that is
        # elementwise or a reduction
        producer = self.producers.get(name)
        return (len(uses) == 1 and producer is not None and producer.op_type in ELEMENTWISE_OPS
                and uses[0].op_type in ELEMENTWISE_OPS | REDUCE_OPS)

    def activation_bytes(self, name: str) -> int:
        if self.qdq:
            return self.nbytes(name)  # QuantizeLinear outputs are int8 already; float islands float32
        if self.quantize and _island_chain(self, name):
            return self.nbytes(name, 4)  # a float island's result feeding another island stays float32
        return self.nbytes(name, 1 if self.quantize else 4)


def _island_chain(walk: _Walk, name: str) -> bool:
    """In a float graph the quantiser will turn to int8: ``name`` is made by a float island (no int8
    rule; not a BatchNormalization, computed inline) and read by one too."""
    def island(node: onnx.NodeProto | None) -> bool:
        if node is not None and (node.name or node.output[0]) in walk.islands:
            return True
        rule = OP_TABLE.get(node.op_type) if node is not None else None
        return rule is not None and rule.int8 == ISLAND and rule.op != "BatchNormalization"
    return island(walk.producers.get(name)) and any(island(u) for u in walk.consumers.get(name, []))


def _constant_bytes(walk: _Walk, node: onnx.NodeProto, counted: set[str]) -> int:
    """Flash bytes of the constants ``node`` brings in (each initialiser counted once)."""
    if node.op_type == "DequantizeLinear":
        name = node.input[0]
        if name in walk.inits and name not in counted and walk.inits[name].data_type != onnx.TensorProto.INT32:
            counted.add(name)  # a pre-quantised weight, stored as it is (int32 biases: see below)
            return _align(walk.nbytes(name))
        return 0
    if node.op_type == "QuantizeLinear":
        return 0
    total = 0
    weights = (node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in walk.const
               and (walk.qdq or walk.quantize))
    if weights:  # an int32 bias (it carries the input zero-point correction) + a requantisation scale per channel
        w = walk.types.get(node.input[1], ((1,), 4))[0]
        channels = w[-1] if node.op_type == "MatMul" else w[0]
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute):
            channels = w[-1]
        total += 2 * _align(4 * channels)
    for k, name in enumerate(node.input):
        if name not in walk.inits or name in counted:
            continue
        counted.add(name)
        if weights and k == 1:
            total += _align(walk.nbytes(name, 1))
        elif weights and k == 2:
            continue  # replaced by the int32 bias above
        elif walk.qdq or _numel(walk.types.get(name, ((1,), 4))[0]) > 1:
            # a float graph's scalars become kernel immediates; a float island's stay 64-byte aligned constants
            total += _align(walk.nbytes(name, 4))
    return total


def estimate_graph(model: onnx.ModelProto, quantize: bool = True, external_inputs: bool = True,
                   trainable: frozenset[str] = frozenset()) -> GraphEstimate:
    """The memory one graph takes once compiled.

    ``quantize``: a float graph (no QDQ nodes) is estimated as the int8 graph the quantiser will
    make of it (int8 weights and activations, its LayerNorms written out as float ops); a QDQ graph
    is read as it is. The graph's inputs and outputs are the caller's buffers (not in the arena) when
    ``external_inputs``. ``trainable``: initialiser names of the parameters a training step updates.

    Raises:
        ExportError: a LayerNormalization the quantiser could not write out either (see
            ``edgetune.export.decompose``).
    """
    written_out: frozenset[str] = frozenset()
    if quantize and not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        model, names = decompose_layer_norms(model)  # as the quantiser will (edgetune.export.quantize)
        written_out = frozenset(names)
    walk = _Walk(model, quantize, written_out)
    learned = set(trainable)  # values that depend on a trainable parameter
    kept = adjoints = transposed = 0
    nodes = list(walk.graph.node)
    born: dict[str, int] = {}
    died: dict[str, int] = {}
    size: dict[str, tuple[int, str]] = {}
    reads: dict[str, set[str]] = {}  # value -> the materialised tensors it is computed from
    counted: set[str] = set()
    constants = tables = kernels = code = 0
    workspace = 0
    int8_input = walk.quantize and not walk.qdq
    int8 = walk.qdq or walk.quantize
    islands = {i.node for i in float_islands(model)} if walk.qdq else set(written_out)
    fused_into: set[str] = set()  # outputs of kernels that finish a fused producer
    for inp in walk.graph.input:
        if inp.name in walk.inits:
            continue
        if int8_input:  # the quantise kernel's int8 copy of the float input
            size[inp.name] = (walk.nbytes(inp.name, 1), "int8")
            born[inp.name], died[inp.name] = -1, -1
            kernels += 1
            code += CODE_PER_CALL_BYTES + FAMILY_CODE_BYTES[OP_TABLE["QuantizeLinear"].family]
        elif not external_inputs:
            size[inp.name] = (walk.nbytes(inp.name), "float32")
            born[inp.name], died[inp.name] = -1, -1
        reads[inp.name] = {inp.name} if inp.name in size else set()
    for k, node in enumerate(nodes):
        if node.op_type == "Constant":
            continue
        constants += _constant_bytes(walk, node, counted)
        ins: set[str] = set()
        for name in node.input:
            ins |= reads.get(name, set())
        for name in ins:
            died[name] = max(died.get(name, k), k)
        out = node.output[0]
        if any(name in learned for name in node.input):
            learned.update(node.output)
        if node.op_type == "Gemm" and node.input[1] in trainable and any(a.name == "transB" and a.i
                                                                          for a in node.attribute):
            transposed += _align(walk.nbytes(node.input[1], 4))
        if out in walk.const:
            continue
        if node.op_type in VIEW_OPS or (node.op_type == "DequantizeLinear"):
            reads[out] = ins
            continue
        rule = _int8_rule(node, islands) if int8 else None
        if rule is not None:
            cost = RULE_CONSTANTS.get(rule, RuleConstants())
            tables += _align(cost.table) if cost.table else 0
            tables += ALIGN if cost.scalars else 0
        fused = walk.fused(out)
        workspace = max(workspace, _conv_band(walk, node), _float_result(walk, node, rule, fused))
        if fused:  # its code is in the kernel of the consumer that quantises it
            code += _kernel_code(walk, node, rule) if int8 else 0
            fused_into.update(u.output[0] for u in walk.consumers[out])
            reads[out] = ins
            continue
        kernels += 1
        if int8:
            code += CODE_PER_CALL_BYTES + (0 if out in fused_into else _kernel_code(walk, node, rule))
        if out in walk.outputs and external_inputs:
            if walk.quantize and not walk.qdq and node.op_type != "ReduceMean":
                # the int8 graph keeps this op's quantised output and dequantises it last
                size[out], born[out], died[out], reads[out] = (walk.nbytes(out, 1), "int8"), k, k, {out}
            else:
                reads[out] = ins  # the int8 rewrite emits the float boundary last: its inputs live to the end
            continue
        if node.op_type in SPLIT_BY_QUANTISER and int8_input:
            # onnxruntime's quantiser writes x * HardSigmoid(x): the int8 gate lives next to x and the output
            gate = f"{out}#gate"
            size[gate], born[gate], died[gate] = (walk.nbytes(out, 1), "int8"), k, k
            kernels += 1
            code += CODE_PER_CALL_BYTES + FAMILY_CODE_BYTES[OP_TABLE[SPLIT_BY_QUANTISER[node.op_type]].family]
            tables += ALIGN if RULE_CONSTANTS[OP_TABLE[SPLIT_BY_QUANTISER[node.op_type]].int8].scalars else 0
        for o in node.output:
            if not o:
                continue
            elem = walk.activation_bytes(o)
            pool = "int8" if elem == _numel(walk.types.get(o, ((1,), 4))[0]) else "float32"
            size[o] = (elem, pool)
            born[o], died[o] = k, k
            reads[o] = {o}
            kept += _align(elem)
            adjoints += _align(elem) if o in learned else 0
    for o in walk.outputs:  # what an output is computed from lives to the end
        for name in reads.get(o, set()):
            died[name] = len(nodes)
    planned, peak = plan_arena([(size[n][0], size[n][1], born[n], died[n]) for n in size])
    outputs = sum(_align(walk.nbytes(o.name, 4)) for o in walk.graph.output)
    return GraphEstimate(constants + tables, planned, peak, workspace, kernels, outputs, kept, adjoints, transposed,
                         code)


def _int8_rule(node: onnx.NodeProto, islands: set[str]) -> str | None:
    """The op table's int8 rule that lowers ``node``, or None when it runs in float (no rule, or a
    float island of this QDQ graph: a precondition of its rule fails)."""
    rule = OP_TABLE.get(node.op_type)
    if rule is None or rule.int8 in (ISLAND, QDQ, FLOAT_ONLY) or (node.name or node.output[0]) in islands:
        return None
    return rule.int8


def _kernel_code(walk: _Walk, node: onnx.NodeProto, rule: str | None) -> int:
    """Code bytes of the int8 graph's kernel for ``node``, by the op table's kernel family."""
    if rule is None:  # Quantize/DequantizeLinear's own family, else a float island (Sub has no int8 rule)
        own = OP_TABLE.get(node.op_type)
        return FAMILY_CODE_BYTES[own.family if own is not None and own.int8 == QDQ else OP_TABLE["Sub"].family]
    if rule == "conv" and _numel(walk.types.get(node.input[1], ((1, 1, 3, 3), 4))[0][2:]) == 1:
        return POINTWISE_CONV_CODE_BYTES
    return FAMILY_CODE_BYTES.get(OP_TABLE[node.op_type].family, CODE_PER_FROZEN_KERNEL_BYTES)


def _float_result(walk: _Walk, node: onnx.NodeProto, rule: str | None, fused: bool) -> int:
    """Workspace of a kernel that computes a float32 result and quantises it itself: a float island
    fused with its QuantizeLinear, and a quantised mean (onnxruntime's float mean; on rows of whole
    packets it also keeps ``MEAN_ACCUMULATOR_LANES`` float accumulators per channel)."""
    if not (walk.qdq or walk.quantize) or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return 0
    out = walk.types.get(node.output[0], ((1,), 4))[0]
    if rule == "mean":
        x = walk.types.get(node.input[0], ((1,), 4))[0]
        channels, row = _numel(x[:2]), _numel(x[2:])
        packets = row % (MEAN_ACCUMULATOR_LANES // 2) == 0 and row >= MEAN_ACCUMULATOR_LANES
        return _align(4 * _numel(out)) + (_align(4 * MEAN_ACCUMULATOR_LANES * channels) if packets else 0)
    # elementwise islands (and a BatchNormalization's per-channel affine) compute each value inline
    inline = node.op_type in ELEMENTWISE_OPS or OP_TABLE.get(node.op_type) == OP_TABLE["BatchNormalization"]
    if rule is None and (fused or not walk.qdq) and not inline and node.op_type in OP_TABLE:
        return _align(4 * _numel(out))
    return 0


def _conv_band(walk: _Walk, node: onnx.NodeProto) -> int:
    """The kernel's padded input band (``compilers/schedule.py``: kh input rows of every input
    channel, the padded row rounded up to the vector lanes), int8 when quantised."""
    if node.op_type != "Conv":
        return 0
    x = walk.types.get(node.input[0], ((1,), 4))[0]
    w = walk.types.get(node.input[1], ((1,), 4))[0]
    if len(x) != 4 or len(w) != 4:
        return 0
    attrs = {a.name: a for a in node.attribute}
    pads = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
    group = attrs["group"].i if "group" in attrs else 1
    channels = 1 if group == x[1] and w[1] == 1 else x[1]
    row = (x[3] + pads[1] + pads[3] + 3) // 4 * 4
    elem = 1 if (walk.qdq or walk.quantize) else 4
    return _align(channels * w[2] * row * elem)


@dataclass(frozen=True)
class MethodState:
    """The method's RAM tensors and step, as the manifest (or the torch method) describes them."""

    params: int  # trainable parameters (float32 elements)
    optimizer: int  # optimizer state elements
    states: tuple[int, ...]  # elements of each running-statistics tensor
    classes: int
    input_elems: int
    learns: bool  # a training step runs on the device
    trainable: frozenset[str]  # trainable.onnx initialisers the step updates
    learner: int = 0  # bytes of the learner's workspace (replay buffer, warm-up copy)

    @property
    def state_bytes(self) -> int:
        """The statistics as the emitter lays them out (each 64-byte aligned): their initial values
        in flash, their updated values in the step's scratch."""
        return sum(_align(4 * n) for n in self.states)


def estimate_budget(target: Target, frozen: onnx.ModelProto, trainable: onnx.ModelProto, state: MethodState,
                    quantize: bool = True) -> MemoryBudget:
    """The firmware's memory table from the two graphs and the method's state (no TVM).

    ``frozen`` may be the bundle's int8 QDQ graph or the float graph ``quantize`` will turn into one.
    """
    f = estimate_graph(frozen, quantize)
    t = estimate_graph(trainable, quantize=False, trainable=state.trainable)
    learned_ops = sum(2 if n.op_type == "Conv" else 1 for n in trainable.graph.node if n.op_type in WEIGHTED_OPS)
    code = CODE_BASE_BYTES + f.code
    if state.learns:  # the step's figures were measured with its forward kernels included
        code += CODE_LEARNING_BYTES + CODE_PER_LEARNED_OP_BYTES * learned_ops
    else:
        code += CODE_PER_FLOAT_KERNEL_BYTES * t.kernels
    # the step's float blocks: inference reuses them along the liveness plan (plus run-time transposed
    # weights); a training step keeps every forward tensor for the backward plus a gradient of each
    # one a parameter reaches (measured: -2 % .. +30 % of the generated step's blocks). The new
    # statistics go to scratch after the plan; parameters and optimizer state are updated in place.
    floats = max(t.arena + t.transposed, t.kept + t.adjoints if state.learns else 0)
    step = FLOAT_STORAGE_FACTOR * floats + state.state_bytes
    param_bytes = 4 * state.params if state.learns else 0
    board = target.board
    rows = [
        MemoryRow("frozen weights, constants, initial values", f.constants + t.constants + state.state_bytes, 0),
        MemoryRow(f"code (estimate: runtime + libc + {f.kernels} int8 kernels + method step)", code, 0),
        MemoryRow("activation arena (frozen + method step)", 0, max(f.arena, step)),
        MemoryRow("kernel workspace", 0, max(f.workspace, t.workspace)),
        MemoryRow("taps", 0, f.outputs),
        MemoryRow("trainable parameters", 0, param_bytes),
        MemoryRow("optimizer state", 0, 4 * state.optimizer if state.learns else 0),
        MemoryRow("running statistics", 0, 4 * sum(state.states)),
        MemoryRow("input sample, logits, target", 0, 4 * (state.input_elems + 2 * state.classes + 2)),
        MemoryRow("runtime: guard histogram + weight snapshot", 0, 4 * state.classes + param_bytes),
        MemoryRow("learner: replay buffer + warm-up copy", 0, state.learner if state.learns else 0),
        MemoryRow("static data (libc, runtime, app)", 0, STATIC_DATA_BYTES),
    ]
    if board is not None:
        rows += [MemoryRow("stack (reserved)", 0, board.stack_bytes),
                 MemoryRow("heap (reserved, libc stdio)", 0, board.heap_bytes)]
    return MemoryBudget(target.name, tuple(rows), target.flash_bytes, target.ram_bytes)


def estimate_bundle(bundle_dir: str | Path, target: Target, inference_only: bool = False) -> MemoryBudget:
    """``estimate_budget`` of an exported bundle (its manifest, frozen.onnx and trainable.onnx).

    Raises:
        CheckpointError: the bundle is missing or corrupt.
    """
    from edgetune.export import load_manifest

    bundle = Path(bundle_dir)
    manifest = load_manifest(bundle)
    tr = manifest.trainable
    learns = not inference_only and tr.optimizer.lr > 0 and bool(tr.trainable_parameters())
    state = MethodState(
        params=sum(_numel(tuple(p.shape)) for p in tr.trainable_parameters()),
        optimizer=sum(_numel(tuple(s.shape)) for s in tr.optimizer.states),
        states=tuple(_numel(tuple(i.shape)) for i in tr.inputs if i.role == "state"),
        classes=manifest.num_classes, input_elems=_numel(tuple(manifest.input.shape)), learns=learns,
        trainable=frozenset(p.name for p in tr.trainable_parameters()),
        learner=manifest.memory.get("replay_buffer", 0))
    return estimate_budget(target, onnx.load(str(bundle / manifest.frozen.file)),
                           onnx.load(str(bundle / tr.file)), state, manifest.frozen.quantized)


__all__ = ["GraphEstimate", "MethodState", "estimate_budget", "estimate_bundle", "estimate_graph", "plan_arena"]
