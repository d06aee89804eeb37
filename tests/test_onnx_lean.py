"""The lean decoder build (export/onnx_lean.py: weights in their stored width, quantization one
weight at a time) against the builder's own path (float32 load, whole-graph quantization), on a
bf16 copy of `tiny`: every initializer must be byte-identical and the nodes the same, for fp32,
int8 (DEFAULT quantizer) and int4 (k_quant, LM head int8), with the LM head quantized in column
slices as MedGemma's is. The lean path is what lets MedGemma 4B
build in 24 GB; these tests prove it builds the same graph.
"""

import shutil

import numpy as np
import pytest

@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory, tiny_dir):
    """tiny with its weights stored as bf16, as MedGemma ships."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-bf16")
    for f in tiny_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _graph(folder):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "decoder.onnx"), load_external_data=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [(n.op_type, n.name, tuple(n.input), tuple(n.output),
              tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)))
             for n in model.graph.node]
    return inits, nodes, [o.name for o in model.graph.output]


def _build(src, out, quant, lean):
    from medgemma_edge.export.onnx_decoder import export_decoder

    export_decoder(src, out, quant, say=lambda s: None, lean=lean)
    return _graph(out)


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_lean_build_is_the_builders_graph(tmp_path, tiny_bf16, quant, monkeypatch):
    from medgemma_edge.export import onnx_lean

    # tiny's LM head (256 x 262208, 268 MB in float32) goes through in 33 column slices
    monkeypatch.setattr(onnx_lean, "CHUNK_BYTES", 8 * 2**20)
    lean_inits, lean_nodes, lean_out = _build(tiny_bf16, tmp_path / "lean", quant, True)
    plain_inits, plain_nodes, plain_out = _build(tiny_bf16, tmp_path / "plain", quant, False)
    assert lean_out == plain_out
    assert sorted(lean_inits) == sorted(plain_inits), set(lean_inits) ^ set(plain_inits)
    worst, where = 0.0, None
    for name, want in plain_inits.items():
        got = lean_inits[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        d = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if want.size else 0.0
        if d > worst or (d == worst and not np.array_equal(got, want)):
            worst, where = d, name
    assert where is None, f"initializer {where} differs, worst |d| {worst:g}"
    # the same nodes (the lean splice keeps graph order up to independent nodes)
    assert sorted(lean_nodes) == sorted(plain_nodes)
    if quant != "fp32":
        ops = {n[0] for n in lean_nodes}
        assert "MatMulNBits" in ops and "MatMul" not in ops, ops


def test_lean_load_keeps_linear_weights_narrow_and_norms_float32(tiny_bf16):
    import torch

    from medgemma_edge.export import onnx_lean

    class Builder:
        model_type = "gemma3_vl_text"

    model = onnx_lean.load_lean(Builder(), str(tiny_bf16))
    text = model.model.language_model
    assert text.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert text.embed_tokens.weight.dtype == torch.bfloat16
    assert text.layers[0].input_layernorm.weight.dtype == torch.float32
    assert text.norm.weight.dtype == torch.float32
    assert onnx_lean.stored_dtype(tiny_bf16) == "bfloat16"
