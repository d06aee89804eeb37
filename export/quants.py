"""The quantization names `export` accepts: one list, read by the writers and by the CLI.

Plain data with no imports, so `medgemma-edge --help` lists them without the export extras.
"""

TEXT_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
K_QUANTS = ("q6_k", "q5_k_m", "q4_k_m")  # made by llama.cpp's own quantizer (export/quantize.py)
ONNX_VISION_QUANTS = ("onnx-f32", "onnx-int8")  # export/onnx_vision.py
VISION_QUANTS = ("f32", "f16", "q8_0") + ONNX_VISION_QUANTS
# What `export` writes by default: an f16 mmproj (llama.cpp, any device, ~850 MB at 4B; Q8_0
# projectors have misbehaved before) and the int8 ONNX tower, the fastest faithful CPU encoder
# measured (4B shape, 2 threads: 40 s vs 55 s on AVX2, 26 s vs 64 s on AVX-512 VNNI);
# `load(vision="auto")` picks between them on the machine that runs the bundle.
DEFAULT_VISION_QUANTS = ("f16", "onnx-int8")
