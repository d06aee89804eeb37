"""The quantization names `export` accepts: one list, read by the writers and by the CLI.

Plain data with no imports, so `medgemma-edge --help` lists them without the export extras.
"""

TEXT_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
K_QUANTS = ("q6_k", "q5_k_m", "q4_k_m")  # made by llama.cpp's own quantizer (export/quantize.py)
# export/onnx_vision.py. onnx-int8: 7-bit weights, exact on every x86 CPU; onnx-int8-vnni: full 8-bit
# weights, for CPUs with VNNI only (AVX2's int16 pair sums overflow on them; vision_choice enforces it).
ONNX_VISION_QUANTS = ("onnx-f32", "onnx-int8", "onnx-int8-vnni")
VISION_QUANTS = ("f32", "f16", "q8_0") + ONNX_VISION_QUANTS
# What `export` writes by default: an f16 mmproj (llama.cpp, any device, ~850 MB at 4B; Q8_0
# projectors have misbehaved before) and two int8 ONNX towers (448 MB each): 7-bit weights for any
# x86 CPU and full 8-bit weights for CPUs with VNNI. 4B shape, 2 threads, one X-ray, cosine vs f32:
#   AVX-512 VNNI EPYC: onnx-int8-vnni 22.9 s / 0.99959, onnx-int8 25.3 s / 0.99870, onnx-f32 39.7 s,
#                      f16 50.9 s;   AVX2 EPYC: onnx-int8 40 s / 0.9987, f16 55 s, onnx-f32 54 s.
# `load(vision="auto")` picks the fastest faithful (cosine >= 0.999) one on the machine that runs it.
DEFAULT_VISION_QUANTS = ("f16", "onnx-int8", "onnx-int8-vnni")
