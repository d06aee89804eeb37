"""Int8 attention for the ONNX vision tower: each fused float MultiHeadAttention node → int8 products.

At MedGemma-4B shape (4096 tokens, 16 heads of 72) the float attention is ~2/3 of an int8-vnni
encode on two cores (benchmarks/bench_encoder.py profiles it): 27 × 16 × 4096² scores, QKᵀ and PV
each ~0.5 T multiply-adds, near the float peak of the cores. onnxruntime's CPU kernels have no bf16
or fp16 matmul on x86, but their u8 × s8 matmuls (MatMulIntegerToFloat) run on VNNI's int8 dot
products at several times the float rate, so both products are moved there:

    S = (Q / scale_q)·(K / scale_k)ᵀ      Q: one u8 scale + zero point (DynamicQuantizeLinear),
                                          K: symmetric s8, one scale per head and key token
    P = softmax(S)                        float, onnxruntime's Softmax
    O = (P / scale_p)·(V / scale_v)       P: u8, one scale per row (its maximum / 255), so a diffuse
                                          row keeps its resolution; V: s8 per head and channel

The per-row P scale goes back onto the output rows (a small (heads, rows, 1) Mul), and the
normalization stays the float softmax's: renormalizing over the rounded weights instead (a column
of ones beside V) tripled one 4B-shaped layer's distance from the float output (1 - cosine
0.0023 against 0.0007), because rows lose their small weights to rounding; one scale for all of P (1/255) lost most of the image
(cosine 0.34 at 4B shape, whose random-weight attention is diffuse). The scores are computed in
query chunks (CHUNK_ROWS rows of every head at a time), so that a chunk's scores are 64 MB, not
the whole 1 GB, by one Scan node per layer whose body is one chunk's nodes: written out chunk by
chunk (16 copies of the nodes per layer at 4B) the graph took several times as long to open, as
onnxruntime's optimizers walk every node.

u8 × s8 products with full 8-bit ranges overflow the int16 pair sums of AVX2 without VNNI, as the
onnx-int8-vnni weights do: a file with int8 attention is for VNNI CPUs only (runtime/vision_choice
NEEDS); AVX2 keeps onnx-int8's float attention.
"""

from __future__ import annotations

import numpy as np

MHA = "MultiHeadAttention"
# Query rows per chunk (of every head). Written out chunk by chunk, at 4B shape, one layer on two
# cores against the float node (ratio of times, median of 7, busy machine): 128 rows 0.94, 256
# 0.87, 512 0.76-0.81, 1024 0.81, all 4096 at once 0.76; per-head chunks 0.97-1.03. Whole towers:
# 512 rows as fast as 256, but their scores and softmax (128 MB each, not 64) raise an image
# question's peak memory, which REPORT.md bounds; as one Scan (below) the chunk size no longer
# changes the node count. `python -m benchmarks.bench_encoder` measures the file the export makes.
CHUNK_ROWS = 256


def _chunks(tokens: int, rows: int = CHUNK_ROWS) -> int:
    """How many equal query chunks: about `rows` rows each, dividing `tokens` exactly."""
    want = max(1, round(tokens / rows))
    return next(c for c in range(want, tokens + 1) if tokens % c == 0)


def tokens_of(graph) -> int:
    """Patch tokens of the vision graph: (image side / patch side)², from its input and patch Conv."""
    side = graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    inits = {i.name: i for i in graph.initializer}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    patch = inits[conv.input[1]].dims[-1]
    if not side or not patch:
        raise ValueError("the vision graph has no fixed image size or patch embedding")
    return (side // patch) ** 2


def quantize_attention(model, tokens: int | None = None, rows: int = CHUNK_ROWS) -> int:
    """Replace every com.microsoft MultiHeadAttention node of `model` (onnx ModelProto, changed in
    place) by int8 products; returns how many nodes were replaced."""
    from onnx import helper

    graph = model.graph
    tokens = tokens or tokens_of(graph)
    chunks = _chunks(tokens, rows)
    consts = _constants(graph, tokens)
    new_nodes, done = [], 0
    for node in graph.node:
        if node.op_type != MHA or node.domain != "com.microsoft":
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        q, k, v = node.input[:3]
        if len(node.input) > 3 and any(node.input[3:]):
            raise ValueError(f"{node.name}: attention with bias or mask inputs is not rewritten")
        new_nodes += _int8_attention(f"{node.name or 'mha'}_{done}", q, k, v, node.output[0],
                                     int(attrs["num_heads"]), float(attrs["scale"]), tokens, chunks, consts)
        done += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _constants(graph, tokens: int) -> dict:
    """Scalar and shape initializers shared by every rewritten layer, added to `graph` once."""
    from onnx import numpy_helper

    values = {
        "c127": np.float32(127), "eps": np.float32(1e-12), "inv255": np.float32(1 / 255),
        "one": np.float32(1), "zp0": np.uint8(0),
        "keys2": np.array([-1, tokens], np.int64),
    }
    names = {}
    for key, val in values.items():
        name = f"int8_attn_{key}"
        graph.initializer.append(numpy_helper.from_array(np.asarray(val), name))
        names[key] = name
    return names


def _node(op: str, ins: list, outs: list, **attrs):
    """One node, named after its first output (outputs carry the layer's prefix)."""
    from onnx import helper

    return helper.make_node(op, ins, outs, name=outs[0], domain="com.microsoft" if op == "MatMulIntegerToFloat" else "", **attrs)


def _int8_attention(p: str, q: str, k: str, v: str, out: str, heads: int, scale: float, tokens: int,
                    chunks: int, c: dict) -> list:
    """Nodes computing MultiHeadAttention(q, k, v) of (1, N, heads*D) float inputs in int8."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    add = lambda op, ins, outs, **kw: nodes.append(_node(op, ins, outs, **kw))  # noqa: E731
    t = lambda name: f"{p}_{name}"  # noqa: E731
    shape = numpy_helper.from_array(np.array([0, 0, heads, -1], np.int64), t("shape4"))
    flat = numpy_helper.from_array(np.array([1, tokens, -1], np.int64), t("shape3"))
    attn_scale = numpy_helper.from_array(np.float32(scale), t("scale"))
    shape_p = numpy_helper.from_array(np.array([1, heads, -1, tokens], np.int64), t("shape_p"))
    shape_s = numpy_helper.from_array(np.array([1, heads, -1, 1], np.int64), t("shape_s"))
    chunked = numpy_helper.from_array(np.array([chunks, tokens // chunks, heads, -1], np.int64), t("chunked"))
    for const in (shape, flat, attn_scale, shape_p, shape_s, chunked):
        nodes.append(helper.make_node("Constant", [], [const.name], value=const))

    def symmetric(x: str, axis: int, name: str):  # s8 values of x (1, N, H, D), scales reduced over `axis`
        add("Abs", [x], [t(name + "_abs")])
        add("ReduceMax", [t(name + "_abs")], [t(name + "_max")], axes=[axis], keepdims=1)
        add("Max", [t(name + "_max"), c["eps"]], [t(name + "_max1")])
        add("Div", [t(name + "_max1"), c["c127"]], [t(name + "_s")])
        add("Div", [x, t(name + "_s")], [t(name + "_d")])
        add("Round", [t(name + "_d")], [t(name + "_r")])
        add("Cast", [t(name + "_r")], [t(name + "_q")], to=TensorProto.INT8)
        return t(name + "_q"), t(name + "_s")

    for x in (q, k, v):
        add("Reshape", [x, shape.name], [t(x.replace("/", "_") + "_4")])
    q4, k4, v4 = (t(x.replace("/", "_") + "_4") for x in (q, k, v))
    # Q: u8 with one scale and zero point (the attention scale joins its scale), split into the
    # chunks the Scan walks: (1, N, H, D) → (C, H, R, D)
    add("DynamicQuantizeLinear", [q4], [t("qu"), t("qu_s"), t("qu_zp")])
    add("Mul", [t("qu_s"), attn_scale.name], [t("qa_s")])
    add("Reshape", [t("qu"), chunked.name], [t("qc4")])
    add("Transpose", [t("qc4")], [t("qcs")], perm=[0, 2, 1, 3])
    # K: s8 per (head, key) → (1, H, D, N) with scales (1, H, 1, N)
    kq, ks = symmetric(k4, 3, "k")
    add("Transpose", [kq], [t("kt")], perm=[0, 2, 3, 1])
    add("Transpose", [ks], [t("kt_s")], perm=[0, 2, 3, 1])
    # V: s8 per (head, channel) → (1, H, N, D) with scales (1, H, 1, D)
    vq, vs = symmetric(v4, 1, "v")
    add("Transpose", [vq], [t("vh")], perm=[0, 2, 1, 3])
    add("Transpose", [vs], [t("vh_s")], perm=[0, 2, 1, 3])
    # one chunk of queries (H, R, D) against every key; K, V and the constants come from the outer graph
    body, b = [], lambda name: f"{p}_chunk_{name}"  # noqa: E731
    step = lambda op, ins, outs, **kw: body.append(_node(op, ins, outs, **kw))  # noqa: E731
    step("MatMulIntegerToFloat", [b("q"), t("kt"), t("qa_s"), t("kt_s"), t("qu_zp")], [b("s")])  # (1, H, R, N)
    step("Softmax", [b("s")], [b("p")], axis=-1)
    # per-row u8 scales (the row's largest weight / 255): QuantizeLinear per axis 0 of a (rows, keys) view
    step("Reshape", [b("p"), c["keys2"]], [b("pf")])
    step("ReduceMax", [b("pf")], [b("pm")], axes=[1], keepdims=0)
    step("Mul", [b("pm"), c["inv255"]], [b("ps")])
    step("QuantizeLinear", [b("pf"), b("ps")], [b("pqf")], axis=0)
    step("Reshape", [b("pqf"), shape_p.name], [b("pq")])
    step("MatMulIntegerToFloat", [b("pq"), t("vh"), c["one"], t("vh_s"), c["zp0"]], [b("ox")])  # (1, H, R, D)
    step("Reshape", [b("ps"), shape_s.name], [b("ps4")])
    step("Mul", [b("ox"), b("ps4")], [b("o")])
    info = lambda name, typ: helper.make_tensor_value_info(name, typ, None)  # noqa: E731
    graph = helper.make_graph(body, f"{p}_chunk", [info(b("q"), TensorProto.UINT8)], [info(b("o"), TensorProto.FLOAT)])
    nodes.append(helper.make_node("Scan", [t("qcs")], [t("os")], name=f"{p}_scan", body=graph, num_scan_inputs=1))
    # (C, 1, H, R, D) → (1, C, R, H, D) → (1, N, H*D)
    add("Transpose", [t("os")], [t("ot")], perm=[1, 0, 3, 2, 4])
    add("Reshape", [t("ot"), flat.name], [out])
    return nodes
