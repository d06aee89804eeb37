"""export/onnx_attention.py: one fused float MultiHeadAttention node against its int8 rewrite, at a
small shape (512 tokens, 4 heads of 32, 4 query chunks of 128 rows walked by a Scan), on heads from
diffuse to peaked."""

import numpy as np
import pytest

TOKENS, HEADS, DIM = 512, 4, 32
COS_MIN = 0.999  # what vision=auto asks of a whole tower (runtime/vision_choice.FIDELITY_MIN); measured: 0.9996 on the worst head


def _mha_model():
    from onnx import TensorProto, helper

    io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, TOKENS, HEADS * DIM])  # noqa: E731
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft",
                            num_heads=HEADS, scale=DIM ** -0.5)
    graph = helper.make_graph([node], "attention", [io("q"), io("k"), io("v")], [io("o")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _run(model, feed):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _rewritten(rows=128):
    import copy

    from medgemma_edge.export.onnx_attention import quantize_attention

    model = copy.deepcopy(_mha_model())
    assert quantize_attention(model, tokens=TOKENS, rows=rows) == 1
    return model


def _feed():
    rng = np.random.default_rng(0)
    # per head a score spread from diffuse (0.3) to peaked (4): the rows' largest weights range over decades
    spread = np.repeat(np.array([0.3, 1.0, 2.0, 4.0], np.float32), DIM)
    q = rng.standard_normal((1, TOKENS, HEADS * DIM)).astype(np.float32) * np.sqrt(spread)
    k = rng.standard_normal((1, TOKENS, HEADS * DIM)).astype(np.float32) * np.sqrt(spread)
    v = rng.standard_normal((1, TOKENS, HEADS * DIM)).astype(np.float32)
    return {"q": q, "k": k, "v": v}


def test_rewrite_is_a_valid_graph_without_float_attention():
    import onnx

    from medgemma_edge.export.onnx_attention import _chunks

    model = _rewritten()
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    scans = [n for n in model.graph.node if n.op_type == "Scan"]
    assert "MultiHeadAttention" not in ops and len(scans) == 1, ops  # one Scan walks the 4 query chunks
    body = [n.op_type for n in onnx.helper.get_attribute_value(scans[0].attribute[0]).node]
    assert body.count("MatMulIntegerToFloat") == 2 and body.count("Softmax") == 1, body
    assert [_chunks(t) for t in (4096, 1024, 256, 100, 4900)] == [16, 4, 1, 1, 20]  # each divides its tokens


def test_int8_attention_matches_float_attention():
    from medgemma_edge.runtime.vision_choice import cpu_flags, cpu_kind

    if cpu_kind(cpu_flags()) != "vnni":
        # u8 x s8 products at full range overflow AVX2's int16 pair sums: the runtime never runs
        # int8 attention there (runtime/vision_choice.NEEDS), so there is no bound to hold here
        pytest.skip("int8 attention products are for CPUs with VNNI; this one has none")
    feed = _feed()
    want = _run(_mha_model(), feed).astype(np.float64)
    got = _run(_rewritten(), feed).astype(np.float64)
    per_head = []
    for h in range(HEADS):
        a, b = got[..., h * DIM:(h + 1) * DIM].ravel(), want[..., h * DIM:(h + 1) * DIM].ravel()
        per_head.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    worst = np.abs(got - want).max()
    msg = f"int8 attention vs float: cosine per head {np.round(per_head, 6).tolist()}, worst |d| {worst:.3e}"
    print(msg)
    assert min(per_head) >= COS_MIN, msg
