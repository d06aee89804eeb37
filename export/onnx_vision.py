"""The vision tower + projector as one ONNX graph, for onnxruntime: the faster CPU image path.

On a 2-core AVX2 CPU llama.cpp's mmproj encodes one 896² image of the 4B shape in about 55 s
(F16, flash attention; Q8_0 is slower there, 72 s). onnxruntime with int8 weights (dynamic
quantization: 7-bit weights per channel, activations quantized per call) takes about 40 s,
image-embedding cosine 0.9987 against F32 on random weights (python -m benchmarks.bench_vision;
the export's quality report measures it on the real weights). The runtime feeds
the ONNX graph the same normalized pixels and hands its output to llama.cpp as embeddings
(runtime/backends/onnx_vision.py).

Graph: pixel_values float32 (1, 3, S, S), normalized as the manifest says → image_embeds float32
(1, tokens, text hidden). Built with transformers' own SiglipVisionModel and
Gemma3MultiModalProjector (the reference code, so nothing is re-implemented), weights read
from the checkpoint through export.checkpoint (either name spelling, bf16 widened exactly).
The projector's matmul stays float: a quantized projector has broken Gemma 3 images before.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from medgemma_edge.export.checkpoint import Checkpoint, read_rows
from medgemma_edge.export.quants import ONNX_VISION_QUANTS
from medgemma_edge.runtime.errors import ExportError

OPSET = 17
INPUT, OUTPUT = "pixel_values", "image_embeds"


def _tower(ckpt: Checkpoint):
    import torch
    from transformers import AutoConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
    from transformers.models.siglip.modeling_siglip import SiglipVisionModel

    cfg = AutoConfig.from_pretrained(ckpt.path)
    cfg.vision_config._attn_implementation = "eager"  # plain MatMul/Softmax ops in the graph

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = SiglipVisionModel(cfg.vision_config)
            self.multi_modal_projector = Gemma3MultiModalProjector(cfg)

        def forward(self, pixel_values):
            return self.multi_modal_projector(self.vision_tower(pixel_values=pixel_values).last_hidden_state)

    with torch.device("meta"):
        tower = Tower()
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


def write_vision_onnx(ckpt: Checkpoint, out: Path, quant: str, say=print) -> Path:
    """Export the tower + projector to `out` (.onnx, one file) at onnx-f32 or onnx-int8."""
    import torch

    if quant not in ONNX_VISION_QUANTS:
        raise ExportError(f"unknown ONNX vision type {quant!r}; use one of {', '.join(ONNX_VISION_QUANTS)}")
    t0 = time.perf_counter()
    say("vision onnx: reading the tower ...")
    tower, size = _tower(ckpt)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        int8 = quant in ("onnx-int8", "onnx-int8-vnni")
        f32 = Path(tmp) / "vision-f32.onnx" if int8 else out
        say(f"vision onnx: tracing at {size}x{size} (MedGemma: about 3 min, 6 GB) ...")
        with torch.no_grad():
            for p in tower.parameters():
                p.requires_grad_(False)
            torch.onnx.export(tower, (torch.zeros(1, 3, size, size),), str(f32), input_names=[INPUT],
                              output_names=[OUTPUT], opset_version=OPSET, dynamo=False,
                              dynamic_axes=None)
        del tower
        if int8:
            say("vision onnx: int8 weights (dynamic quantization) ...")
            _quantize_int8(f32, out, full_range=quant == "onnx-int8-vnni")
    say(f"vision onnx: {out.name} written in {time.perf_counter() - t0:.0f} s")
    return out


def _quantize_int8(src: Path, dst: Path, full_range: bool = False) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    projector = [n.name for n in graph.node if n.op_type == "MatMul" and "multi_modal_projector" in n.name]
    # 7-bit weights, one scale per output channel. On AVX2 without VNNI onnxruntime multiplies
    # u8 x s8 pairs into saturating int16 sums, which full 8-bit weights can overflow: tiny's image
    # embeddings fell to cosine 0.98 against f32 that way (0.9999 with 7 bits). One-off runs of
    # the 4B-shape graph, 2 threads: 8-bit per tensor 40.2 s / cosine 0.99925, 7-bit per tensor
    # 43.1 s / 0.99774, 8-bit per channel 38.0 s / 0.99898, this 36.9 s / 0.99870 (tiny: 0.9999).
    # full_range (onnx-int8-vnni): 8-bit weights per channel, for CPUs whose VNNI instructions sum
    # u8 x s8 products in int32, where nothing saturates; the runtime never runs it elsewhere.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run "pre-processing" first is for calibrated (static) quantization
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=projector, per_channel=True, reduce_range=not full_range)
    finally:
        root.setLevel(level)
