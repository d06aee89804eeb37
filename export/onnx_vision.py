"""The vision tower + projector as one ONNX graph, for onnxruntime: the faster CPU image path.

On x86 CPUs its int8 files encode an image faster than llama.cpp's f16 mmproj, within the
fidelity `auto` asks for; `python -m benchmarks.bench_vision` times every file, and
benchmarks/results/REPORT.md holds the default export's numbers.

One trace per export: `trace_vision_onnx` writes the float graph once (into the export's
intermediate folder), and `derive_vision_onnx` makes onnx-f32 (the same file) and the int8 files
(dynamic quantization of its weight matmuls) from it. Tracing the 4B tower takes minutes, and
three traced files would cost three times that.

Attention is one com.microsoft MultiHeadAttention node per layer, not transformers' eager
MatMul → Softmax → MatMul: onnxruntime runs that node as a tiled (flash) kernel on the CPU, so the
16 × 4096 × 4096 f32 score matrix (1.07 GB, twice with the softmax output) never exists. Against
eager attention, tried at 4B shape, the fused node was faster and held a small fraction of the
memory with the same output to float rounding, for one layer and for the whole tower in an image
question; the opset-23 Attention op is materialized, and was slower. The CUDA provider runs the
same node. onnx-int8-vnni-attn replaces these nodes by int8 products (export/onnx_attention.py),
for VNNI CPUs, where float attention is most of an encode.

The MLP's activation (SigLIP's gelu_pytorch_tanh) is one com.microsoft FastGelu node, the same
formula, instead of the nine elementwise nodes (Mul, Tanh, Add …) it traces to at opset 17, which
onnxruntime does not fuse: at 4B shape each of those passes reads and writes 4096 × 4304 floats,
27 layers. Against the unfused graph it encodes faster with less peak memory, its image embeddings
within float rounding (benchmarks/results/ENCODER.md profiles the tower per operator).

Graph: pixel_values float32 (1, 3, S, S), normalized as the manifest says → image_embeds float32
(1, tokens, text hidden). Built with transformers' own SiglipVisionModel and
Gemma3MultiModalProjector (the reference code; only the attention kernel is swapped, through
transformers' AttentionInterface), weights read from the checkpoint through export.checkpoint
(either name spelling, bf16 widened exactly). The projector's matmul stays float: a quantized
projector has broken Gemma 3 images before.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from medgemma_edge.export.checkpoint import Checkpoint, read_rows
from medgemma_edge.export.quants import ONNX_VISION_QUANTS
from medgemma_edge.runtime.errors import ExportError

OPSET = 17
CONTRIB = {"com.microsoft": 1}  # the domain of onnxruntime's fused MultiHeadAttention
INPUT, OUTPUT = "pixel_values", "image_embeds"
ATTENTION = "medgemma_onnx_mha"  # our name in transformers' AttentionInterface
INT8_ATTENTION = "onnx-int8-vnni-attn"  # int8-vnni weights + int8 attention products (export/onnx_attention.py)


def _fused_attention():
    """A transformers attention function that traces to one MultiHeadAttention node."""
    import torch

    class MultiHeadAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, heads: int, scale: float):  # (B, S, H*D) each → (B, S, H*D)
            split = lambda x: x.unflatten(2, (heads, -1)).transpose(1, 2)  # (B, H, S, D)
            out = torch.softmax(split(q) @ split(k).transpose(-1, -2) * scale, -1) @ split(v)
            return out.transpose(1, 2).flatten(2)

        @staticmethod
        def symbolic(g, q, k, v, heads: int, scale: float):
            out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads, scale_f=scale)
            out.setType(q.type())  # same shape and type as the query
            return out

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if attention_mask is not None:
            raise ExportError("the fused vision attention takes no mask; SigLIP's tower has none")
        # plain Python numbers from the module: traced shapes would become graph values
        heads, d = int(module.num_heads), int(module.head_dim)
        scale = float(scaling if scaling is not None else d ** -0.5)
        merge = lambda x: x.transpose(1, 2).flatten(2)  # (B, H, S, D) → (B, S, H*D)
        out = MultiHeadAttention.apply(merge(query), merge(key), merge(value), heads, scale)
        return out.unflatten(2, (heads, d)), None  # the caller reshapes (B, S, H, D) to (B, S, H*D)

    return attention


FAST_GELU = ("gelu_pytorch_tanh",)  # activations that are FastGelu's formula: x/2 · (1 + tanh(√(2/π)(x + 0.044715x³)))


def _fast_gelu():
    """A module that computes GELU (tanh approximation) and traces to one FastGelu node."""
    import torch

    class FastGelu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.nn.functional.gelu(x, approximate="tanh")

        @staticmethod
        def symbolic(g, x):
            out = g.op("com.microsoft::FastGelu", x)
            out.setType(x.type())
            return out

    class Act(torch.nn.Module):
        def forward(self, x):
            return FastGelu.apply(x)

    return Act()


def _tower(ckpt: Checkpoint):
    import torch
    from transformers import AttentionInterface, AutoConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
    from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipMLP, SiglipVisionModel

    cfg = AutoConfig.from_pretrained(ckpt.path)
    cfg.vision_config._attn_implementation = "eager"

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = SiglipVisionModel(cfg.vision_config)
            self.multi_modal_projector = Gemma3MultiModalProjector(cfg)

        def forward(self, pixel_values):
            return self.multi_modal_projector(self.vision_tower(pixel_values=pixel_values).last_hidden_state)

    with torch.device("meta"):
        tower = Tower()
    AttentionInterface.register(ATTENTION, _fused_attention())
    for module in tower.modules():
        if isinstance(module, SiglipAttention):
            module.config._attn_implementation = ATTENTION
        if isinstance(module, SiglipMLP) and cfg.vision_config.hidden_act in FAST_GELU:
            module.activation_fn = _fast_gelu()
    state = {}
    for (part, name), ref in ckpt.tensors.items():
        if part == "vision":
            state[f"vision_tower.vision_model.{name}"] = torch.from_numpy(read_rows(ref))
        elif part == "projector":
            state[f"multi_modal_projector.{name}"] = torch.from_numpy(read_rows(ref))
    missing, unexpected = tower.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not m.startswith("vision_tower.vision_model.head.")]
    if missing or unexpected:
        raise ExportError(f"the vision weights do not fit the config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]} — the checkpoint is incomplete or mismatched")
    # buffers (position ids) were left on the meta device: rebuild them for real
    for module in tower.modules():
        for key, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module.register_buffer(key, torch.arange(buf.shape[-1]).expand(buf.shape).clone(),
                                       persistent=False)
    return tower.eval(), cfg.vision_config.image_size


def trace_vision_onnx(ckpt: Checkpoint, out: Path, say=print) -> Path:
    """Trace the tower + projector once into the float graph `out` (.onnx, one file)."""
    import torch

    t0 = time.perf_counter()
    say("vision onnx: reading the tower ...")
    tower, size = _tower(ckpt)
    say(f"vision onnx: tracing at {size}x{size} (MedGemma: minutes, and several GB of memory) ...")
    with torch.no_grad():
        for p in tower.parameters():
            p.requires_grad_(False)
        torch.onnx.export(tower, (torch.zeros(1, 3, size, size),), str(out), input_names=[INPUT],
                          output_names=[OUTPUT], opset_version=OPSET, custom_opsets=CONTRIB,
                          dynamo=False, dynamic_axes=None)
    say(f"vision onnx: traced in {time.perf_counter() - t0:.0f} s")
    return out


def derive_vision_onnx(traced: Path, out: Path, quant: str, say=print) -> Path:
    """onnx-f32 (the traced graph itself) or an int8 file made from it, written to `out`."""
    if quant not in ONNX_VISION_QUANTS:
        raise ExportError(f"unknown ONNX vision type {quant!r}; use one of {', '.join(ONNX_VISION_QUANTS)}")
    t0 = time.perf_counter()
    out.unlink(missing_ok=True)
    if quant == "onnx-f32":
        try:
            os.link(traced, out)  # same bytes; the intermediate copy goes with its folder
        except OSError:
            shutil.copyfile(traced, out)
    else:
        say(f"vision onnx: {quant} weights (dynamic quantization) ...")
        _quantize_int8(traced, out, full_range=quant in ("onnx-int8-vnni", INT8_ATTENTION))
        if quant == INT8_ATTENTION:
            int8_attention_file(out)
    say(f"vision onnx: {out.name} written in {time.perf_counter() - t0:.0f} s")
    return out


def write_vision_onnx(ckpt: Checkpoint, out: Path, quant: str, say=print, traced: Path | None = None) -> Path:
    """Export one ONNX vision file; `traced`: the float graph already traced from `ckpt`, else
    it is traced here into a temporary folder next to `out`."""
    if traced is not None:
        return derive_vision_onnx(traced, out, quant, say)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        return derive_vision_onnx(trace_vision_onnx(ckpt, Path(tmp) / "vision-f32.onnx", say), out, quant, say)


def int8_attention_file(path: Path) -> None:
    """onnx-int8-vnni-attn: the int8-vnni graph at `path` with its attention nodes in int8 too
    (export/onnx_attention.py says how and why; VNNI only, as the 8-bit weights are)."""
    import onnx

    from medgemma_edge.export.onnx_attention import quantize_attention

    model = onnx.load(str(path))
    if not quantize_attention(model):
        raise ExportError("the traced vision graph has no fused attention node to quantize")
    onnx.save(model, str(path))


def _quantize_int8(src: Path, dst: Path, full_range: bool = False) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    projector = [n.name for n in graph.node if n.op_type == "MatMul" and "multi_modal_projector" in n.name]
    # onnx-int8: unsigned 8-bit weights, one scale and zero point per output channel. onnxruntime
    # multiplies u8 activations by u8 weights in 16-bit lanes summed in int32 on every x86 CPU, so
    # nothing saturates. Signed weights would take its u8 x s8 kernels, whose AVX2 pair sums are
    # saturating int16: full 8 bits overflow there (tiny's image embeddings lose their fidelity,
    # tests/test_export_onnx_vision), and 7 bits (what this file held before), exact but coarser,
    # fell below vision_choice.FIDELITY_MIN at MedGemma-4B shape on AVX2, so `auto` encoded with
    # the f16 mmproj there; u8 weights keep the fidelity, for an encode as fast or slightly slower
    # in alternating rounds (the note of issue 26; benchmarks/results/avx2/ENCODER.md times the file
    # the export makes). Per-channel scales beat one scale per tensor at 4B
    # shape in both encode time and fidelity; `python -m benchmarks.bench_vision` measures the files.
    # full_range (onnx-int8-vnni): signed 8-bit weights per channel, for CPUs whose VNNI
    # instructions sum u8 x s8 products in int32, faster than u8 x u8; the runtime never runs it
    # elsewhere. The attention nodes (activation x activation) stay float: only MatMuls with a
    # constant B are quantized (quantize_dynamic's default).
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run "pre-processing" first is for calibrated (static) quantization
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8 if full_range else QuantType.QUInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=projector, per_channel=True,
                         reduce_range=False)
    finally:
        root.setLevel(level)
