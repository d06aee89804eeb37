"""The quantization names `export` accepts: one list, read by the writers and by the CLI.

Plain data with no imports, so `medgemma-edge --help` lists them without the export extras.
"""

TEXT_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
K_QUANTS = ("q6_k", "q5_k_m", "q4_k_m")  # made by llama.cpp's own quantizer (export/quantize.py)
ONNX_VISION_QUANTS = ("onnx-f32", "onnx-int8")  # export/onnx_vision.py
VISION_QUANTS = ("f32", "f16", "q8_0") + ONNX_VISION_QUANTS
