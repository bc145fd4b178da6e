"""norm-align: the integer reference against onnxruntime, the fold into requantisation, label-freedom,
reset, and bn-adapt's batch reference. Small: mcunet-s trained on digits, a few dozen samples."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from edgetune.adapt import fit, prepare
from edgetune.data import build_stream, to_tensor
from edgetune.errors import ConfigError
from edgetune.evaluate import run_stream
from edgetune.int8ref.norm_align_int8 import Int8NormAlign, fold_affine, int8_graph
from edgetune.int8ref.qdq_model import QDQModel
from edgetune.int8ref.variants import AlignedStreams, Variant, conv_kinds, conv_stages
from edgetune.methods import norm_align  # noqa: F401 - registers norm-align
from edgetune.methods.tinytta import POOLED_NO_EXITS
from edgetune.models import build_model

SAMPLES = 40


@pytest.fixture(scope="module")
def graph(mcunet, digits, tmp_path_factory):
    """The digits mcunet-s's frozen part as int8 QDQ, and its integer reference."""
    path = int8_graph(mcunet[0], digits.train_x, digits.name, tmp_path_factory.mktemp("na") / "frozen.onnx")
    return path, QDQModel(path)


def _every_int8_tensor(path, qdq: QDQModel, out):
    """A copy of the graph whose outputs are every int8 activation the reference computes."""
    model = onnx.load(str(path))
    names = [n for n in qdq.q]
    for n in names:
        model.graph.output.append(helper.make_tensor_value_info(n, TensorProto.INT8, None))
    onnx.save(model, str(out))
    return names


def test_int8_reference_equals_onnxruntime_bit_for_bit(graph, digits, tmp_path):
    path, qdq = graph
    names = _every_int8_tensor(path, qdq, tmp_path / "all.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    sess = ort.InferenceSession(str(tmp_path / "all.onnx"), options, providers=["CPUExecutionProvider"])
    assert len(qdq.convs) == 26 and len(names) == 32  # mcunet-s: 26 convs, 5 adds, the input
    x = to_tensor(digits.test_x[:SAMPLES])
    for i in range(SAMPLES):
        outs = sess.run([sess.get_outputs()[0].name] + names, {"x": x[i:i + 1].numpy()})
        pooled, vals = qdq.run(x[i:i + 1])
        for name, got in zip(names, outs[1:]):
            assert np.array_equal(vals[name].numpy(), got.astype(np.float64)), (i, name)
        np.testing.assert_allclose(pooled.numpy(), outs[0], rtol=0, atol=1e-5)


def test_folded_affine_equals_float_affine_within_one_step(graph, digits):
    _, qdq = graph
    x = to_tensor(digits.test_x[:4])
    _, vals = qdq.run(x)
    g = torch.Generator().manual_seed(0)
    moved = 0
    for op in qdq.convs:
        acc = qdq.accumulate(op, vals[op.src])
        c = acc.shape[1]
        a = torch.exp(torch.empty(c).uniform_(-0.7, 0.7, generator=g))  # gains from 0.5 to 2
        y = acc * op.accum_scale.double()[None, :, None, None]
        b = torch.randn(c, generator=g, dtype=torch.float64) * y.std()
        folded = qdq.requantize(op, acc, *fold_affine(a, b, op.accum_scale))
        out = qdq.q[op.dst]
        exact = torch.clamp(torch.round((a.double()[None, :, None, None] * y + b[None, :, None, None]) / out.scale)
                            + out.zero_point, -128, 127)
        assert (folded - exact).abs().max() <= 1
        moved += int((folded != qdq.requantize(op, acc)).sum())
    assert moved > 0  # the affine did change the integers


def _int8_method(mcunet, digits, graph, **overrides):
    adaptable = prepare(copy.deepcopy(mcunet[0]), "norm-align", overrides, model_name="mcunet-s")
    fit(adaptable, digits, progress=False, use_cache=False)
    model = Int8NormAlign(adaptable.method, graph[1])
    model.calibrate(digits.train_x[:300])
    return model


def _stream(digits):
    return build_stream(digits, ("gaussian_noise",), 5, "episodic", 0, SAMPLES)[0]


def test_reset_restores_source_statistics_and_predictions(mcunet, digits, graph):
    model = _int8_method(mcunet, digits, graph, pooled="true")
    source = [(m.clone(), s.clone()) for m, s in model.state]
    head = model.method.get_buffer(f"mean{len(model.method.aligned) - 1}").clone()
    x = to_tensor(_stream(digits).images)
    first = [int(model.step(x[i:i + 1]).argmax()) for i in range(SAMPLES)]
    assert any(not torch.equal(m, s[0]) for m, s in zip((m for m, _ in model.state), source))
    model.reset()
    assert all(torch.equal(m, s[0]) and torch.equal(q, s[1]) for (m, q), s in zip(model.state, source))
    assert torch.equal(model.method.get_buffer(f"mean{len(model.method.aligned) - 1}"), head)
    assert [int(model.step(x[i:i + 1]).argmax()) for i in range(SAMPLES)] == first


def test_statistics_never_read_labels(mcunet, digits, graph):
    """The source statistics come out the same from a source whose labels are shuffled, and a stream's
    predictions do not depend on its labels (the runner never receives them)."""
    labelled = prepare(copy.deepcopy(mcunet[0]), "norm-align", {}, model_name="mcunet-s")
    fit(labelled, digits, progress=False, use_cache=False)
    wrong = dataclasses.replace(digits, train_y=np.random.RandomState(0).permutation(digits.train_y))
    relabelled = prepare(copy.deepcopy(mcunet[0]), "norm-align", {}, model_name="mcunet-s")
    fit(relabelled, wrong, progress=False, use_cache=False)
    for a, b in zip(labelled.method.aligned, relabelled.method.aligned):
        assert torch.equal(a.source_mean, b.source_mean) and torch.equal(a.source_sqmean, b.source_sqmean)
    seg = _stream(digits)
    shuffled = dataclasses.replace(seg, labels=np.random.RandomState(1).permutation(seg.labels))
    runs = [run_stream(labelled, [s], progress=False) for s in (seg, shuffled)]
    assert runs[0].predictions == runs[1].predictions
    assert runs[0].per_corruption != runs[1].per_corruption  # the labels did differ


def test_int8_follows_the_float_reference(mcunet, digits, graph):
    model = _int8_method(mcunet, digits, graph)
    float_ref = prepare(copy.deepcopy(mcunet[0]), "norm-align", {}, model_name="mcunet-s")
    fit(float_ref, digits, progress=False, use_cache=False)
    x = to_tensor(_stream(digits).images)
    agree = sum(int(model.step(x[i:i + 1]).argmax()) == int(float_ref.step(x[i:i + 1]).argmax())
                for i in range(SAMPLES))
    assert agree >= 0.85 * SAMPLES


def _streams(mcunet, digits, graph, variants, tinytta=None):
    bank = AlignedStreams(graph[1], conv_stages(mcunet[0]), mcunet[0].for_export().classifier, variants, tinytta)
    bank.calibrate(to_tensor(digits.train_x[:300]))
    return bank


def test_variant_rows_equal_the_single_stream_reference(mcunet, digits, graph):
    """The default configuration (class prior and shift gate on) as one row of a batch next to other variants
    predicts exactly what the one-sample-at-a-time ``Int8NormAlign`` predicts, with the same gate strength (and
    the rows do not leak into each other)."""
    model = _int8_method(mcunet, digits, graph, first_stage="2", include_sample="false", pooled="true")
    variants = [Variant(prior_rate=0.02, gate="global", gate_level=3.0),
                Variant("mixed", mode="var", instance=0.3, strength=0.5, include_sample=True,
                        kinds=("expand", "project"), prior_rate=0.02),
                Variant("source", first_stage=4, pooled=False)]
    bank = _streams(mcunet, digits, graph, variants)
    x = to_tensor(_stream(digits).images)
    rows, single, strength = [], [], []
    for i in range(SAMPLES):
        strength.append((float(model.gate_strength()), float(bank._global_strength()[0, 0])))
        rows.append(bank.step(x[i:i + 1].expand(3, -1, -1, -1)))
        single.append(int(model.step(x[i:i + 1]).argmax()))
    rows = torch.stack(rows)
    assert rows[:, 0].tolist() == single
    assert all(abs(a - b) < 1e-9 for a, b in strength) and max(a for a, _ in strength) > 0.0, strength
    classifier = mcunet[0].for_export().classifier
    source = [int(classifier(graph[1].run(x[i:i + 1])[0]).argmax()) for i in range(SAMPLES)]
    assert rows[:, 2].tolist() == source  # nothing folded, nothing aligned: the exported graph's prediction
    assert rows[:, 1].tolist() != rows[:, 0].tolist()  # the options do change the predictions


def test_variant_options_fold_what_they_say(mcunet, digits, graph):
    _, qdq = graph
    kinds = conv_kinds(qdq.convs)
    assert kinds[:4] == ["stem", "expand", "depthwise", "project"] and kinds[-1] == "head"
    stages = conv_stages(mcunet[0])
    variants = [Variant("dw", first_stage=0, kinds=("depthwise",)), Variant("mean", mode="mean"),
                Variant("half", strength=0.5), Variant()]
    bank = _streams(mcunet, digits, graph, variants)
    assert bank.aligned[0].tolist() == [k == "depthwise" for k in kinds]
    assert bank.aligned[1].tolist() == [s >= 2 for s in stages]
    x = to_tensor(_stream(digits).images)
    for i in range(5):
        bank.step(x[i:i + 1].expand(4, -1, -1, -1))
    k = stages.index(2)
    y = torch.randn(4, len(bank.source[k][0]), 3, 3, dtype=torch.float64)
    a, b = bank._affine(k, y, torch.full((4, 1), 0.05, dtype=torch.float64))
    assert torch.equal(a[1], torch.ones_like(a[1])) and not torch.equal(b[1], torch.zeros_like(b[1]))
    torch.testing.assert_close(a[2] - 1.0, 0.5 * (a[3] - 1.0))
    torch.testing.assert_close(b[2], 0.5 * b[3])
    with pytest.raises(ConfigError, match="variant 'bad' has mode 'median'"):
        _streams(mcunet, digits, graph, [Variant("bad", mode="median")])


def test_tinytta_row_reads_the_aligned_stage_outputs(mcunet, digits, graph):
    # the study's tinytta reads pooled stage outputs: pooled heads at every exit, no exits (its earlier default)
    adaptable = prepare(copy.deepcopy(mcunet[0]), "tinytta", POOLED_NO_EXITS, model_name="mcunet-s")
    fit(adaptable, digits, progress=False)
    bank = _streams(mcunet, digits, graph, [Variant("tinytta", first_stage=4, tinytta=True),
                                            Variant("composed", tinytta=True)], adaptable.method)
    # the stage ends are the graph's tensors: the last is the one the graph averages for its output
    assert len(bank.stage_ends) == 4 and bank.stage_ends[-1] == graph[1].output[0]
    x = to_tensor(_stream(digits).images)
    rows = torch.stack([bank.step(x[i:i + 1].expand(2, -1, -1, -1)) for i in range(SAMPLES)])
    assert bank.tinytta[0].steps == SAMPLES and rows[:, 0].tolist() != rows[:, 1].tolist()
    bank.reset()
    assert bank.tinytta[0].steps == 0


def test_unknown_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="layers='everything' is unknown; use one of convs, stages"):
        prepare(build_model("mcunet-s"), "norm-align", {"layers": "everything"})


def test_bn_adapt_batch_reference_uses_the_batch_statistics():
    torch.manual_seed(0)
    backbone = build_model("mcunet-s-bn")
    adaptable = prepare(copy.deepcopy(backbone), "bn-adapt", {"batch": "64"})
    x = torch.rand(64, *backbone.input_shape)
    reference = copy.deepcopy(backbone)
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()  # training-mode BatchNorm normalises with the batch's own (biased) statistics
    with torch.no_grad():
        torch.testing.assert_close(adaptable.method.predict_batch(x), reference(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="batch=64 is a big-batch reference"):
        adaptable.method.step([x[:1]])
