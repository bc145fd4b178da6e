"""An existing ONNX file as an edgetune ``Backbone`` (``edgetune export model.onnx --taps A,B``).

The graph is interpreted in torch (one function per ONNX op in ``OPS``), so fit, eval and
export run unchanged: ``stages`` are the sub-graphs between consecutive taps (tensor names the
user picks, each a cut every path passes through), ``pool`` is what the graph does between the
last tap and the classifier, and ``classifier`` is an ``nn.Linear`` holding the weights of the
named (default: last) Gemm/MatMul, which moves to the float, trainable side.

An already-quantised QDQ graph runs as fake quantisation (QuantizeLinear rounds and saturates,
DequantizeLinear scales back), and ``frozen_graph`` hands the user's own QDQ nodes, cut at the
taps, to export, which writes them as frozen.onnx instead of quantising again.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edgetune.errors import ConfigError, ModelError
from edgetune.models.backbone import Backbone


from edgetune.models.onnx_ops import OPS, Node


_FOLDABLE_DTYPES = (np.float32, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64, np.bool_)


BATCH_BAKING_OPS = frozenset({"Expand", "ConstantOfShape", "Tile"})


class OnnxSubgraph(nn.Module):
    """A run of ONNX nodes from one tensor to another, interpreted in torch; constants are buffers
    (so they are part of ``state_dict`` and of every cache key derived from it)."""

    def __init__(self, nodes: Sequence[Node], source: str, output: str, consts: dict[str, np.ndarray],
                 per_sample: bool = False) -> None:
        super().__init__()
        self.nodes = tuple(nodes)
        self.source, self.output = source, output
        self.per_sample = per_sample
        used = sorted({i for n in self.nodes for i in n.inputs if i in consts})
        self._buffer_of = {name: f"c{k}" for k, name in enumerate(used)}
        for name in used:
            self.register_buffer(self._buffer_of[name], torch.from_numpy(np.array(consts[name])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_sample and x.shape[0] > 1:
            return torch.cat([self._run(x[i:i + 1]) for i in range(x.shape[0])])
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = {self.source: x}
        for node in self.nodes:
            args = [None if not i else env[i] if i in env else getattr(self, self._buffer_of[i])
                    for i in node.inputs]
            out = OPS[node.op](node, args)
            env[node.outputs[0]] = out
        return env[self.output]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        elif isinstance(v, list):
            v = [x.decode() if isinstance(x, bytes) else x for x in v]
        out[a.name] = v
    return out


def _dims(vi: onnx.ValueInfoProto) -> tuple[int | str, ...] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)


@dataclass
class ParsedGraph:
    """An ONNX file read for interpretation: its nodes (constants folded away), constants and shapes."""

    path: str
    model: onnx.ModelProto
    nodes: list[Node]
    consts: dict[str, np.ndarray]
    shapes: dict[str, tuple | None]
    input_name: str
    input_shape: tuple[int, ...]
    producer: dict[str, Node]
    sha256: str
    quantized: bool
    # A file exported at batch 1 may have baked that batch into materialised tensors (a class token
    # expanded to "1 x ...", often folded to a constant): its sub-graphs then run one sample at a time
    # when fit feeds a batch.
    per_sample: bool = False


def parse_onnx(path: str | Path) -> ParsedGraph:
    """Read ``path``, check it has one static float input and only ops ``OPS`` interprets.

    Raises:
        ModelError: the file is missing or not ONNX, has several (or dynamic) inputs, or uses ops
            edgetune cannot run (every such op listed at once with its node name).
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"onnx: {p} is not a file; give the path of a .onnx model")
    raw = p.read_bytes()
    try:
        model = onnx.load_from_string(raw)
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # protobuf DecodeError, onnx's ValidationError / InferenceError
        first = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"onnx: {p.name} is not a readable ONNX model ({first}); re-export it "
                         "(torch.onnx.export, opset >= 13)") from None
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    inputs = [i for i in g.input if i.name not in consts]
    if len(inputs) != 1:
        raise ModelError(f"onnx: {p.name} has {len(inputs)} graph inputs ({', '.join(i.name for i in inputs)}); "
                         "edgetune needs exactly one image/signal input")
    dims = _dims(inputs[0]) or ()
    if len(dims) not in (3, 4) or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise ModelError(f"onnx: input {inputs[0].name!r} has shape {list(dims)}; edgetune needs N x C x H x W "
                         "or N x C x T with static C, H, W (T); re-export with a fixed input size")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(f"onnx: input {inputs[0].name!r} is not float32; export the model with a float input")
    shapes = {vi.name: _dims(vi) for vi in [*g.value_info, *g.input, *g.output]}
    unknown = [f"{(n.domain + '::') if n.domain not in ('', 'ai.onnx') else ''}{n.op_type} (node "
               f"{n.name or n.output[0]!r})" for n in g.node
               if n.op_type != "Constant" and (n.op_type not in OPS or n.domain not in ("", "ai.onnx"))]
    if unknown:
        raise ModelError(f"onnx: {p.name} uses ops edgetune cannot interpret: {', '.join(unknown)}; "
                         "re-export the model without them (supported: " + ", ".join(sorted(OPS)) + ")")
    nodes: list[Node] = []
    for n in g.node:
        node = Node(n.name or n.output[0], n.op_type, tuple(n.input), tuple(n.output), _attrs(n))
        if n.op_type == "Constant":
            value = node.attrs.get("value")
            if value is None:
                for key in ("value_float", "value_floats", "value_int", "value_ints"):
                    if key in node.attrs:
                        value = np.array(node.attrs[key], dtype=np.float32 if "float" in key else np.int64)
            consts[n.output[0]] = np.array(value)
            continue
        if all(not i or i in consts for i in node.inputs) and n.op_type != "QuantizeLinear":
            # Constant sub-expressions (a DequantizeLinear of int8 weights, shape arithmetic) fold once here.
            args = [None if not i else torch.from_numpy(np.array(consts[i])) for i in node.inputs]
            value = OPS[n.op_type](node, args)
            consts[n.output[0]] = value.numpy() if isinstance(value, torch.Tensor) else np.array(value)
            continue
        nodes.append(node)
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node)
    per_sample = any(n.op_type in BATCH_BAKING_OPS for n in g.node)
    return ParsedGraph(p.name, model, nodes, consts, shapes, inputs[0].name, tuple(int(d) for d in dims[1:]),
                       {o: n for n in nodes for o in n.outputs}, hashlib.sha256(raw).hexdigest(), quantized,
                       per_sample)


def _segment(graph: ParsedGraph, source: str, target: str) -> list[Node]:
    """The nodes computing ``target`` from ``source`` alone (plus constants), in graph order.

    Raises:
        ConfigError: ``target`` also depends on another tensor (the tap does not cut the graph).
    """
    needed: set[str] = set()
    stack = [target]
    while stack:
        t = stack.pop()
        if t == source or t in graph.consts or not t:
            continue
        node = graph.producer.get(t)
        if node is None:
            raise ConfigError(f"onnx: tap {target!r} is not computed from {source!r} alone (it also reads "
                              f"{t!r}, e.g. a skip connection around the tap); pick tap tensors every path passes "
                              "through, in graph order (`edgetune inspect MODEL.onnx` lists them)")
        if node.name in needed:
            continue
        needed.add(node.name)
        stack.extend(node.inputs)
    return [n for n in graph.nodes if n.name in needed]


@dataclass(frozen=True)
class Classifier:
    """The Gemm/MatMul (and a bias Add after a MatMul) that becomes the trainable ``nn.Linear``."""

    nodes: tuple[str, ...]
    feature: str
    weight: np.ndarray
    bias: np.ndarray


def find_classifier(graph: ParsedGraph, name: str | None = None) -> Classifier:
    """The named (default: the last) Gemm/MatMul with constant weights, as weight (out x in) and bias.

    Raises:
        ConfigError: no such node, or its weights are not constants.
    """
    linear = [n for n in graph.nodes if n.op in ("Gemm", "MatMul") and n.inputs[1] in graph.consts]
    if not linear:
        raise ConfigError(f"onnx: {graph.path} has no Gemm/MatMul with constant weights to use as the classifier; "
                          "edgetune needs a model that ends in a linear layer")
    if name is None:
        node = linear[-1]
    else:
        match = [n for n in linear if n.name == name or name in n.outputs]
        if not match:
            raise ConfigError(f"onnx: --classifier {name!r} is not a Gemm/MatMul with constant weights in "
                              f"{graph.path}; pick one of {', '.join(n.name for n in linear)}")
        node = match[0]
    w = np.array(graph.consts[node.inputs[1]], dtype=np.float32)
    if node.op == "Gemm":
        if node.attr("transA", 0):
            raise ConfigError(f"onnx: classifier {node.name!r} has transA=1; re-export with the feature as input A")
        w = (w if node.attr("transB", 0) else w.T) * node.attr("alpha", 1.0)
        c = node.inputs[2] if len(node.inputs) > 2 else ""
        b = (np.broadcast_to(np.array(graph.consts[c], dtype=np.float32) * node.attr("beta", 1.0), (w.shape[0],))
             if c else np.zeros(w.shape[0], np.float32))
        return Classifier((node.name,), node.inputs[0], np.ascontiguousarray(w), np.array(b))
    w = w.T
    after = [n for n in graph.nodes if node.outputs[0] in n.inputs]
    if len(after) == 1 and after[0].op == "Add":
        other = [i for i in after[0].inputs if i != node.outputs[0]]
        if other and other[0] in graph.consts and np.size(graph.consts[other[0]]) in (1, w.shape[0]):
            b = np.broadcast_to(np.array(graph.consts[other[0]], dtype=np.float32).reshape(-1), (w.shape[0],))
            return Classifier((node.name, after[0].name), node.inputs[0], np.ascontiguousarray(w), np.array(b))
    return Classifier((node.name,), node.inputs[0], np.ascontiguousarray(w), np.zeros(w.shape[0], np.float32))


class OnnxBackbone(Backbone):
    """A float or QDQ ONNX graph cut at user-named taps (see the module docstring)."""

    def __init__(self, graph: ParsedGraph, taps: Sequence[str], classifier: Classifier) -> None:
        super().__init__()
        self.input_shape = graph.input_shape  # type: ignore[assignment]
        self.num_classes = int(classifier.weight.shape[0])
        self.tap_names = tuple(taps)
        self.source = {"onnx": graph.path, "sha256": graph.sha256, "taps": list(taps),
                       "classifier": list(classifier.nodes), "quantized": graph.quantized}
        self.quantized = graph.quantized
        bounds = [graph.input_name, *taps]
        self.stages = nn.ModuleList(OnnxSubgraph(_segment(graph, a, b), a, b, graph.consts, graph.per_sample)
                                    for a, b in zip(bounds, bounds[1:]))
        self.head_pool = (OnnxSubgraph(_segment(graph, taps[-1], classifier.feature), taps[-1], classifier.feature,
                                       graph.consts, graph.per_sample) if classifier.feature != taps[-1] else None)
        self.classifier = nn.Linear(classifier.weight.shape[1], self.num_classes)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.from_numpy(classifier.weight))
            self.classifier.bias.copy_(torch.from_numpy(classifier.bias))
        self._graph_bytes = graph.model.SerializeToString()
        self._input_name = graph.input_name
        self._feature = classifier.feature

    def pool(self, feature: torch.Tensor, stage: int) -> torch.Tensor:
        if stage == len(self.stages) - 1:
            return self.head_pool(feature) if self.head_pool is not None else feature
        return feature.mean(dim=tuple(range(2, feature.dim()))) if feature.dim() > 2 else feature

    def for_export(self) -> "OnnxBackbone":
        return copy.deepcopy(self).eval()  # nothing to fold: the graph is exported as it was given

    def frozen_graph(self, specs: Sequence[Any]) -> onnx.ModelProto:
        """The user's own graph (QDQ nodes as given) from input ``x`` to the taps ``specs`` asks for
        (``TapSpec``: stage, pooled), named as the bundle names them; intermediate pooled taps get a
        ReduceMean over the spatial axes, the last one the graph's own pooling.

        Raises:
            ModelError: a spec reads the input image itself (stage -1), which has no QDQ graph.
        """
        model = onnx.load_from_string(self._graph_bytes)
        g = model.graph
        produced: dict[str, str] = {}  # tap name -> graph tensor
        extra: list[onnx.NodeProto] = []
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=17)
        last = len(self.stages) - 1
        for spec in specs:
            if spec.stage < 0:
                raise ModelError("onnx: a method reading the input image needs the backbone in torch; "
                                 "export a partitioned method (feature-align, tinytta, lst, vqt, source)")
            tensor = self.tap_names[spec.stage]
            if spec.pooled and spec.stage == last:
                tensor = self._feature
            elif spec.pooled and self._rank(spec.stage) > 2:
                pooled = f"{spec.name}_reduce"
                axes = list(range(2, self._rank(spec.stage)))
                if opset >= 18:
                    axes_name = f"{spec.name}_axes"
                    g.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))
                    extra.append(onnx.helper.make_node("ReduceMean", [tensor, axes_name], [pooled], keepdims=0,
                                                       name=pooled))
                else:
                    extra.append(onnx.helper.make_node("ReduceMean", [tensor], [pooled], axes=axes, keepdims=0,
                                                       name=pooled))
                tensor = pooled
            produced[spec.name] = tensor
        g.node.extend(extra)
        for name, tensor in produced.items():
            g.node.append(onnx.helper.make_node("Identity", [tensor], [name], name=f"{name}_out"))
        del g.output[:]
        g.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in produced)
        g.input[0].name = "x"
        for node in g.node:
            node.input[:] = ["x" if i == self._input_name else i for i in node.input]
        del g.value_info[:]
        model = onnx.utils.Extractor(model).extract_model(["x"], list(produced))
        return _drop_identities(onnx.shape_inference.infer_shapes(model), set(produced))

    def _rank(self, stage: int) -> int:
        return len(self.stage_shapes()[stage]) + 1


def _drop_identities(model: onnx.ModelProto, outputs: set[str]) -> onnx.ModelProto:
    """Rename each output Identity's input tensor to the output name where that tensor has no other use."""
    g = model.graph
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    graph_outputs = {o.name for o in g.output}
    for node in [n for n in g.node if n.op_type == "Identity" and n.output[0] in outputs]:
        src = node.input[0]
        if uses.get(src, 0) != 1 or src in graph_outputs or any(src == i.name for i in g.input):
            continue
        g.node.remove(node)
        for n in g.node:
            n.output[:] = [node.output[0] if o == src else o for o in n.output]
            n.input[:] = [node.output[0] if i == src else i for i in n.input]
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


# Methods that read one tap per stage need at least this many taps (the rest read the pooled feature).
MIN_TAPS = {"tinytta": 2, "lst": 2, "vqt": 2}


def check_taps_for_method(backbone: OnnxBackbone, method: str) -> None:
    """Refuse a method whose per-stage attachments need more taps than ``--taps`` gave.

    Raises:
        ConfigError: naming the method, how many taps it needs and how many were given.
    """
    need = MIN_TAPS.get(method, 1)
    have = len(backbone.tap_names)
    if have < need:
        raise ConfigError(f"onnx: method {method} attaches to every stage and needs at least {need} taps (got {have}:"
                          f" {','.join(backbone.tap_names)}); pass --taps A,B,... with block outputs in graph order "
                          "(`edgetune inspect MODEL.onnx` suggests them)")
    if method in ("lst", "vqt"):
        flat = [n for n, s in zip(backbone.tap_names, backbone.stage_shapes()) if len(s) < 3]
        if flat:
            raise ConfigError(f"onnx: method {method} needs feature maps (N x C x H x W) at every tap, but "
                              f"{', '.join(flat)} is already pooled; end --taps at the last feature map")


def load_onnx_backbone(path: str | Path, taps: Sequence[str] | None = None,
                       classifier: str | None = None) -> OnnxBackbone:
    """An ``OnnxBackbone`` for ``path`` cut at ``taps`` (default: the classifier's input feature).

    Raises:
        ModelError: see ``parse_onnx``.
        ConfigError: unknown tap names, taps out of graph order or not cutting the graph, a tap that
            is not a float tensor, or no usable classifier.
    """
    graph = parse_onnx(path)
    head = find_classifier(graph, classifier)
    taps = list(taps) if taps else [head.feature]
    order = {o: k for k, n in enumerate(graph.nodes) for o in n.outputs}
    unknown = [t for t in taps if t not in order]
    if unknown:
        raise ConfigError(f"onnx: --taps {', '.join(unknown)} not found among {graph.path}'s computed tensors; "
                          "`edgetune inspect MODEL.onnx` lists the candidates")
    feature_at = order.get(head.feature, len(graph.nodes))
    late = [t for t in taps if order[t] > feature_at]
    if late or [order[t] for t in taps] != sorted(order[t] for t in taps) or len(set(taps)) != len(taps):
        raise ConfigError(f"onnx: --taps must be distinct tensors in graph order, before the classifier's input "
                          f"{head.feature!r} (got {','.join(taps)}); `edgetune inspect MODEL.onnx` lists them")
    quantised = [t for t in taps if graph.producer[t].op == "QuantizeLinear"]
    if quantised:
        raise ConfigError(f"onnx: taps {', '.join(quantised)} are int8 (QuantizeLinear outputs); pick the float "
                          "DequantizeLinear output that follows each")
    model = OnnxBackbone(graph, taps, head)
    with torch.no_grad():
        try:
            feature = model.pool(model.stage_outputs(torch.zeros(1, *model.input_shape))[-1], len(taps) - 1)
        except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as exc:
            raise ModelError(f"onnx: interpreting {graph.path} failed ({str(exc).strip().splitlines()[0][:120]}); "
                             "check the graph with onnxruntime and re-export it") from None
    if tuple(feature.shape) != (1, model.classifier.in_features):
        raise ConfigError(f"onnx: the classifier's input {head.feature!r} has shape {tuple(feature.shape)}, not "
                          f"1 x {model.classifier.in_features}; name the Gemm/MatMul on the pooled feature with "
                          "--classifier")
    return model.eval()


@dataclass(frozen=True)
class TapCandidate:
    """A tensor ``edgetune inspect MODEL.onnx`` offers as a tap."""

    name: str
    shape: tuple
    op: str
    why: str


def _dry_run_shapes(graph: ParsedGraph) -> dict[str, tuple[int, ...]]:
    """Every computed tensor's shape at batch 1, from running the graph (shape inference may leave
    reshaped tensors symbolic)."""
    run = OnnxSubgraph(graph.nodes, graph.input_name, graph.nodes[-1].outputs[0], graph.consts)
    env: dict[str, Any] = {graph.input_name: torch.zeros(1, *graph.input_shape)}
    with torch.no_grad():
        for node in run.nodes:
            args = [None if not i else env[i] if i in env else getattr(run, run._buffer_of[i]) for i in node.inputs]
            env[node.outputs[0]] = OPS[node.op](node, args)
    return {k: tuple(v.shape) for k, v in env.items() if isinstance(v, torch.Tensor)}


def _merges(graph: ParsedGraph, name: str) -> bool:
    """Whether ``name`` (through Q/DQ) is an Add/Concat of two computed tensors: branches meeting."""
    node = graph.producer.get(name)
    while node is not None and node.op in ("QuantizeLinear", "DequantizeLinear"):
        node = graph.producer.get(node.inputs[0])
    return node is not None and sum(1 for i in node.inputs if i and i not in graph.consts) >= 2


_ACTIVATIONS = ("Relu", "Clip", "HardSwish", "LeakyRelu", "Sigmoid")


def _after_pointwise_conv(graph: ParsedGraph, name: str) -> bool:
    """An activation whose conv is 1x1: where a depthwise-separable block ends."""
    node = graph.producer.get(name)
    while node is not None and node.op in ("QuantizeLinear", "DequantizeLinear", *_ACTIVATIONS):
        node = graph.producer.get(node.inputs[0])
    if node is None or node.op != "Conv" or node.inputs[1] not in graph.consts:
        return False
    return all(k == 1 for k in np.shape(graph.consts[node.inputs[1]])[2:])


def _computing_op(graph: ParsedGraph, name: str) -> str | None:
    """The op that computed ``name``, looking through Quantize/DequantizeLinear (None: the input itself)."""
    node = graph.producer.get(name)
    while node is not None and node.op in ("QuantizeLinear", "DequantizeLinear"):
        node = graph.producer.get(node.inputs[0])
    return node.op if node is not None else None


def tap_candidates(path: str | Path, classifier: str | None = None) -> tuple[list[TapCandidate], list[str]]:
    """Tensors that cut the graph (nothing else is live there) and are the last at their shape, plus
    the classifier's input feature; and a suggested ``--taps`` for per-stage methods.

    Raises:
        ModelError, ConfigError: as ``load_onnx_backbone``.
    """
    graph = parse_onnx(path)
    head = find_classifier(graph, classifier)
    feature_at = next(k for k, n in enumerate(graph.nodes) if head.feature in n.outputs)
    last_use: dict[str, int] = {}
    for k, n in enumerate(graph.nodes):
        for i in n.inputs:
            last_use[i] = k
    cuts: list[str] = []
    live: set[str] = {graph.input_name}
    for k, n in enumerate(graph.nodes[:feature_at + 1]):
        live |= set(n.outputs)
        live = {t for t in live if last_use.get(t, -1) > k or t == n.outputs[0]}
        consumers = [c.op for c in graph.nodes if n.outputs[0] in c.inputs]
        # In a QDQ graph a tensor about to be quantised is offered as the DequantizeLinear output after it.
        if live == {n.outputs[0]} and n.op != "QuantizeLinear" and consumers != ["QuantizeLinear"]:
            cuts.append(n.outputs[0])
    shapes = _dry_run_shapes(graph)
    found: list[TapCandidate] = []
    pointwise: list[TapCandidate] = []
    for name, nxt in zip(cuts, [*cuts[1:], None]):
        shape = shapes.get(name)
        role = _computing_op(graph, name)
        if name == head.feature or shape is None or len(shape) < 3 or role is None:
            continue
        next_shape = shapes.get(nxt) if nxt else None
        if role in ("Add", "Concat", "Sum") and _merges(graph, name):
            found.append(TapCandidate(name, tuple(shape), role, "block output (branches merge)"))
        elif next_shape is None or tuple(next_shape[2:]) != tuple(shape[2:]) or len(next_shape) < 3:
            found.append(TapCandidate(name, tuple(shape), role, "last cut before the resolution changes"))
        elif role in _ACTIVATIONS and _after_pointwise_conv(graph, name):
            pointwise.append(TapCandidate(name, tuple(shape), role, "block output (pointwise conv + activation)"))
    # Per-stage methods: at each resolution the last block output (narrower than the expansions inside a
    # block), at the last resolution the pooling's own input.
    last_at: dict[tuple, str] = {}
    for c in found:
        if c.why.startswith("block output") or tuple(c.shape[2:]) not in last_at:
            last_at[tuple(c.shape[2:])] = c.name
    if found:
        last_at[tuple(found[-1].shape[2:])] = found[-1].name
    per_stage = list(last_at.values()) or [head.feature]
    if len(per_stage) < 2 and pointwise and found:
        # One resolution throughout (a keyword-spotting DS-CNN): up to four evenly spaced separable-block
        # outputs, the last being the pooling's input.
        found = [*pointwise, found[-1]]
        picks = sorted({round(k * (len(found) - 1) / 3) for k in range(4)})
        per_stage = [found[k].name for k in picks]
    found.append(TapCandidate(head.feature, tuple(shapes.get(head.feature) or ()),
                              graph.producer[head.feature].op if head.feature in graph.producer else "input",
                              f"pooled feature (input of classifier {head.nodes[0]}): the default --taps"))
    return found, per_stage
