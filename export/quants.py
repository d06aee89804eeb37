"""The quantization names `export` accepts: one list, read by the writers and by the CLI.

Plain data with no imports, so `medgemma-edge --help` lists them without the export extras.
"""

TEXT_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
K_QUANTS = ("q6_k", "q5_k_m", "q4_k_m")  # made by llama.cpp's own quantizer (export/quantize.py)
# export/onnx_vision.py. onnx-int8: 7-bit weights, exact on every x86 CPU; onnx-int8-vnni: full 8-bit
# weights, for CPUs with VNNI only (AVX2's int16 pair sums overflow on them; vision_choice enforces it).
ONNX_VISION_QUANTS = ("onnx-f32", "onnx-int8", "onnx-int8-vnni")
VISION_QUANTS = ("f32", "f16", "bf16", "q8_0") + ONNX_VISION_QUANTS
# bf16: an mmproj with BF16 matrices (patch embedding / positions F32 and projector F16, as
# llama.cpp's converter writes them). Cosine vs f32: tiny 0.999995, 4B shape 0.999999. 4B, VNNI +
# avx512_bf16 EPYC, busy machine, one run: bf16 94 s, f16 149 s, onnx-int8-vnni 22 s. Not a
# default: onnx-int8-vnni is ~4x faster on such CPUs, f16 is the float file every device runs
# well, and a CPU without avx512_bf16 widens every bf16 weight in software.
# What `export` writes by default: an f16 mmproj (llama.cpp, any device, ~850 MB at 4B; Q8_0
# projectors have misbehaved before) and two int8 ONNX towers (448 MB each): 7-bit weights for any
# x86 CPU and full 8-bit weights for CPUs with VNNI. 4B shape, 2 threads, one X-ray, cosine vs f32
# (eager-attention ONNX graphs; the fused attention since measured ~11% faster back to back):
#   AVX-512 VNNI EPYC: onnx-int8-vnni 22.9 s / 0.99959, onnx-int8 25.3 s / 0.99870, onnx-f32 39.7 s,
#                      f16 50.9 s;   AVX2 EPYC: onnx-int8 40 s / 0.9987, f16 55 s, onnx-f32 54 s.
# Peak RSS of one image question beside the q4_k_m text GGUF: onnx-int8(-vnni) 4.22 GB (5.87 GB
# with eager attention), f16 mmproj 4.3-4.46 GB; onnx-f32 holds 1.7 GB of f32 weights.
# `load(vision="auto")` picks the fastest faithful (cosine >= 0.999) one on the machine that runs it.
DEFAULT_VISION_QUANTS = ("f16", "onnx-int8", "onnx-int8-vnni")
# --format onnx: the text decoder through onnxruntime-genai's model builder (export/onnx_decoder.py).
# int8 / int4: MatMulNBits weights (block 32), int8 activations; 270M measured perplexity +0.35 %
# at int8, +34..61 % at int4 (the project reference notes, "ONNX decoder").
ONNX_TEXT_QUANTS = ("fp32", "int8", "int4")
FORMATS = ("gguf", "onnx")
