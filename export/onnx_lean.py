"""A MedGemma 4B decoder build that fits a 24 GB machine: weights loaded in their stored width, and
weight quantization one MatMul at a time.

    load_lean(builder, input_path)  -> the torch model the builder walks
    quantize_streamed(builder)      -> the builder's graph with every eligible MatMul as MatMulNBits

onnxruntime-genai 0.18.0's builder, as published, loads the checkpoint in float32 (MedGemma 4B:
~17 GB with the vision tower) and quantizes by serializing the whole float graph into one
ModelProto (another ~15.5 GB for the text weights) before the quantizer starts: ~33 GB, which
does not fit. Here:

- `load_lean` loads the Linear and Embedding weights in the checkpoint's stored dtype (bf16 for
  MedGemma: half the bytes) and every other parameter in float32. The builder casts each weight to
  float32 as it writes or quantizes it, and bf16 → float32 is exact, so the graph is the same one a
  float32 load gives (tests/test_onnx_lean.py compares every initializer). Norms stay float32 from
  the start: the builder adds Gemma's +1 to them, which in bf16 would round.
- `quantize_streamed` hands the quantizer one MatMul at a time — a one-node model holding that
  node's weight — with the same options and the same per-node bits (`k_quant_last`: the LM head in
  int8) the builder's own pass uses, and splices the MatMulNBits node and its tensors back into the
  graph. Every quantizer we use works per weight (DEFAULT, RTN and k_quant choose scales per block
  of one matrix), so the result is the builder's, byte for byte (same test), while only one float
  weight is ever materialized; each float weight is dropped when its node is replaced. Large
  weights (the LM head) go through in column slices (CHUNK_BYTES), byte for byte the same.

On the MedGemma-4B-shaped checkpoint (`benchmarks.bundles.onnx_bundle`, which builds it) the int8
and the int4 (k_quant, LM head int8) bundles both build within 24 GB; the top is the LM head's
k_quant scratch. The builder's own path was not run at 4B (the ~33 GB above is its arithmetic); a
first version of this module, whose quantized tensors still referenced each one-node ModelProto
(float weight included), was killed by the kernel for its memory: hence `_detached`.
"""

from __future__ import annotations

from pathlib import Path

from medgemma_edge.export.checkpoint import open_checkpoint

# Torch dtypes the stored weights may keep; anything else loads as float32.
NARROW = {"bf16": "bfloat16", "f16": "float16"}
# A float weight above this is quantized in column slices: the quantizers' scratch is a multiple of
# the slice (k_quant most), and MedGemma's LM head alone is 2.7 GB in float32. Each output column
# is quantized on its own (blocks run along the input axis), so slicing changes no byte.
CHUNK_BYTES = 256 * 2**20
CHUNK_ALIGN = 64


def stored_dtype(input_path) -> str:
    """The checkpoint's dtype for its text weights: "bfloat16", "float16" or "float32"."""
    ckpt = open_checkpoint(Path(input_path))
    weight = ckpt.tensors.get(("text", "embed_tokens.weight"))
    return NARROW.get(getattr(weight, "dtype", "f32"), "float32")


def load_lean(builder, input_path: str):
    """The Hugging Face model the builder walks, with Linear/Embedding weights in the stored dtype
    and everything else float32 (see the module docstring)."""
    import torch
    import transformers

    dtype = getattr(torch, stored_dtype(input_path))
    cls = (transformers.Gemma3ForConditionalGeneration if builder.model_type == "gemma3_vl_text"
           else transformers.AutoModelForCausalLM)
    model = cls.from_pretrained(input_path, dtype=dtype, low_cpu_mem_usage=True)
    if dtype is not torch.float32:
        keep = (torch.nn.Linear, torch.nn.Embedding)
        for module in model.modules():
            if isinstance(module, keep):
                continue
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
            for name, b in list(module.named_buffers(recurse=False)):
                if b.is_floating_point() and b.dtype != torch.float32:
                    module.register_buffer(name, b.float(), persistent=name not in module._non_persistent_buffers_set)
    model.eval()
    return model


def _eligible(builder, node) -> int | None:
    """Index of the weight input of a node the builder's pass would quantize, else None."""
    attrs = builder.quant_attrs
    if node.op_type not in attrs["op_types_to_quantize"] or node.name in set(attrs["nodes_to_exclude"]):
        return None
    index = 0 if node.op_type == "Gather" else 1
    if node.op_type not in ("MatMul", "Gather") or len(node.inputs) <= index:
        return None
    weight = node.inputs[index]
    if weight is None or weight.const_value is None or len(weight.shape or ()) != 2:
        return None
    return index


def _one_node_model(builder, node, index: int, array):
    """A ModelProto with `node` alone, `array` as its weight (the one initializer)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    weight = node.inputs[index]
    names = [v.name for v in node.inputs]
    other = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT if node.op_type == "MatMul"
                                           else onnx.TensorProto.INT64, None)
             for i, n in enumerate(names) if i != index]
    out = helper.make_tensor_value_info(node.outputs[0].name, onnx.TensorProto.FLOAT, None)
    proto = helper.make_node(node.op_type, names, [node.outputs[0].name], name=node.name,
                             **{k: a.value for k, a in node.attributes.items()})
    init = numpy_helper.from_array(np.ascontiguousarray(array), weight.name)
    graph = helper.make_graph([proto], "one", other, [out], [init])
    opsets = [helper.make_opsetid(d, v) for d, v in builder.model.opset_imports.items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=builder.model.ir_version)


def _quantize_node(builder, node, index: int, bits: int):
    """The quantizer's one-node graph (onnx_ir) for `node`; a MatMul weight of more than
    CHUNK_BYTES is quantized in column slices and the slices' tensors joined (module docstring)."""
    import numpy as np
    import onnx_ir as ir

    array = node.inputs[index].const_value.numpy()
    cols = array.shape[1]
    step = cols if node.op_type != "MatMul" or array.nbytes <= CHUNK_BYTES else \
        max(CHUNK_ALIGN, CHUNK_BYTES // (array.shape[0] * 4) // CHUNK_ALIGN * CHUNK_ALIGN)
    parts = []
    for start in range(0, cols, step):
        quant = _quantizer(builder, _one_node_model(builder, node, index, array[:, start:start + step]), node, bits)
        quant.process()
        parts.append(_detached(ir.from_proto(quant.model.model).graph))
        del quant
    del array
    if len(parts) == 1:
        return parts[0]
    q = parts[0]
    (qn,) = list(q)
    if qn.op_type != "MatMulNBits":
        raise RuntimeError(f"{node.name}: column slices give {qn.op_type}, expected MatMulNBits")
    qn.attributes["N"] = ir.AttrInt64("N", cols)
    for name, value in q.initializers.items():
        joined = np.concatenate([p.initializers[name].const_value.numpy() for p in parts], axis=0)
        value.const_value = ir.tensor(joined, name=name)
        value.shape = ir.Shape(joined.shape)
    return q


def _detached(q):
    """The quantizer's one-node graph with its tensors copied out of the ModelProto it was read from
    (a tensor read from a protobuf message keeps the whole message, float weight included, alive)
    and without the float weight it leaves behind."""
    import numpy as np
    import onnx_ir as ir

    used = {v.name for qn in q for v in qn.inputs if v is not None}
    for name in list(q.initializers):
        value = q.initializers[name]
        if name not in used:
            del q.initializers[name]
            continue
        value.const_value = ir.tensor(np.array(value.const_value.numpy(), copy=True), name=name)
    return q


def _quantizer(builder, model, node, bits: int):
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    attrs = builder.quant_attrs
    method = getattr(builder, "quantization_algo", "default")
    algo = None if method == "default" else builder.make_algo_config(method, {node.name: {"bits": bits}})
    return MatMulNBitsQuantizer(
        model=model, bits=bits, block_size=attrs["matmul_block_size"], is_symmetric=attrs["is_symmetric"],
        accuracy_level=attrs["accuracy_level"], nodes_to_exclude=[],
        quant_format=QuantFormat.QDQ if attrs["use_qdq"] else QuantFormat.QOperator,
        op_types_to_quantize=attrs["op_types_to_quantize"], algo_config=algo)


def quantize_streamed(builder, progress=None):
    """The builder's `to_nbits`, one weight at a time (module docstring). Returns builder.model."""
    graph = builder.model.graph
    custom = getattr(builder, "int4_customized_weight_config", {}) or {}
    todo = [(node, i) for node in list(graph) if (i := _eligible(builder, node)) is not None]
    todo.reverse()
    total = len(todo)
    while todo:
        node, index = todo.pop()  # no list keeps a replaced node (and through it its float weight)
        bits = custom.get(node.name, {}).get("bits", builder.quant_attrs["bits"])
        if node.op_type == "Gather" and bits != 4:
            continue  # the quantizer turns only 4-bit Gathers into GatherBlockQuantized
        _splice(graph, node, index, _quantize_node(builder, node, index, bits))
        if progress:
            progress(total - len(todo), total, node.name)
        del node
    return builder.model


def release_memory() -> None:
    """Give freed memory back to the system after a build (glibc keeps freed heap otherwise: a 4B
    build left gigabytes resident), so the vision export that follows has it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _splice(graph, node, index: int, q) -> None:
    """Replace `node` in `graph` by the nodes of the one-node graph `q` (the quantizer's output)."""
    import onnx_ir as ir

    if all(qn.op_type == node.op_type and qn.domain == node.domain for qn in q):
        return  # the quantizer left it as it was (e.g. an embedding Gather at 8 bits)
    weight = node.inputs[index]
    outer = {v.name: v for i, v in enumerate(node.inputs) if i != index}
    mapping = {}
    for name, value in q.initializers.items():  # tensors of their own (_detached)
        new = ir.Value(name=name, shape=value.shape, type=value.type, const_value=value.const_value)
        graph.register_initializer(new)
        mapping[name] = new
    new_nodes = []
    for qn in q:
        inputs = [None if v is None else mapping.get(v.name) or outer.get(v.name) for v in qn.inputs]
        if any(v is None and qv is not None for v, qv in zip(inputs, qn.inputs)):
            raise RuntimeError(f"quantized {node.name}: an input of {qn.name} is neither weight nor activation")
        made = ir.Node(qn.domain, qn.op_type, inputs, attributes=list(qn.attributes.values()),
                       num_outputs=len(qn.outputs), name=qn.name)
        for o, qo in zip(made.outputs, qn.outputs):
            o.name, o.shape, o.type = qo.name, node.outputs[0].shape, node.outputs[0].type
            mapping[qo.name] = o
        new_nodes.append(made)
    final = mapping[q.outputs[0].name]
    old = node.outputs[0]
    graph.insert_after(node, new_nodes)
    ir.convenience.replace_all_uses_with(old, final, replace_graph_outputs=True)
    name = old.name
    graph.remove(node, safe=True)
    final.name = name
    if not weight.uses() and graph.initializers.get(weight.name) is weight:
        del graph.initializers[weight.name]

