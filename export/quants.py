"""The quantization names `export` accepts: one list, read by the writers and by the CLI.

Plain data with no imports, so `medgemma-edge --help` lists them without the export extras.
"""

TEXT_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
K_QUANTS = ("q6_k", "q5_k_m", "q4_k_m")  # made by llama.cpp's own quantizer (export/quantize.py)
# export/onnx_vision.py. onnx-int8: unsigned 8-bit weights, exact on every x86 CPU; onnx-int8-vnni: signed
# 8-bit weights, for CPUs with VNNI only (AVX2's int16 pair sums overflow on them; vision_choice enforces it);
# onnx-int8-vnni-attn: those weights and int8 attention products too (export/onnx_attention.py), VNNI only.
ONNX_VISION_QUANTS = ("onnx-f32", "onnx-int8", "onnx-int8-vnni", "onnx-int8-vnni-attn")
GGUF_VISION_QUANTS = ("f32", "f16", "bf16", "q8_0")  # mmproj files, run by llama.cpp
VISION_QUANTS = GGUF_VISION_QUANTS + ONNX_VISION_QUANTS
# bf16: an mmproj with BF16 matrices (patch embedding / positions F32 and projector F16, as
# llama.cpp's converter writes them); as faithful as f16. Not a default: the int8 ONNX files
# encode faster on CPUs with avx512_bf16 too, f16 is the float file every device runs well, and
# a CPU without avx512_bf16 widens every bf16 weight in software.
# What `export` writes by default: an f16 mmproj (llama.cpp, any device; Q8_0 projectors have
# misbehaved before) and two int8 ONNX towers: unsigned 8-bit weights for any x86 CPU, and for CPUs with
# VNNI signed 8-bit weights with the attention products in int8 too (onnx-int8-vnni-attn). That file
# replaced onnx-int8-vnni (same weights, float attention) in the default: as faithful, the same size,
# and faster in alternating rounds on a quiet machine (benchmarks/results/ENCODER.md).
# `load(vision="auto")` picks the fastest faithful one (vision_choice FIDELITY_MIN) on the machine
# that runs it. onnx-int8-vnni is still written on request (`--vision-quant`).
# Encode time and fidelity of each file: `python -m benchmarks.bench_vision`; the default export's,
# with peak memory: benchmarks/results/REPORT.md.
DEFAULT_VISION_QUANTS = ("f16", "onnx-int8", "onnx-int8-vnni-attn")
# --format onnx: the text decoder through onnxruntime-genai's model builder (export/onnx_decoder.py).
# int8 / int4: MatMulNBits weights (block 32), int8 activations; int4 loses far more than int8
# (export/onnx_decoder.py says how it was compared; benchmarks/results/ONNX_TEXT.md has the speeds).
ONNX_TEXT_QUANTS = ("fp32", "int8", "int4")
FORMATS = ("gguf", "onnx")
DEFAULT_TEXT_QUANT = {"gguf": "q4_k_m", "onnx": "int8"}
