"""--vision-quant bf16: a BF16 mmproj that llama.cpp's clip loader runs, close to the f32 mmproj.

BF16 keeps 8 bits of mantissa (f16: 11), so its image embeddings sit a little further from f32
than f16's: tiny measured cosine 0.999995 (f16 0.9999999). The bound sits an order of magnitude
under 1 - cosine, far above what a wrong tensor gives (cosine ~0 to 0.9). The patch embedding and
position table stay F32 and the projector F16, as llama.cpp's own converter writes them
(llama.cpp issue 13025).
"""

import numpy as np
import pytest

from tests import reference as ref
from tests.gguf_read import read_gguf
from tests.test_export_gguf import _encode, _pixels

BF16_COS_MIN = 0.9999


@pytest.fixture(scope="module")
def bf16_mmproj(tmp_path_factory, tiny_dir):
    from medgemma_edge.export.bundle import ExportPlan

    plan = ExportPlan.read(tiny_dir)
    return plan.write_vision(tmp_path_factory.mktemp("bf16") / plan.vision_name("bf16"), "bf16")


def test_bf16_mmproj_types(bf16_mmproj):
    types = {name: t[0] for name, t in read_gguf(bf16_mmproj)[1].items()}
    assert types["v.patch_embd.weight"] == "F32" and types["v.position_embd.weight"] == "F32"
    assert types["mm.input_projection.weight"] == "F16"
    assert types["v.blk.0.attn_q.weight"] == "BF16" and types["v.blk.0.ffn_down.weight"] == "BF16"


def test_bf16_mmproj_embeddings_match_f32(bf16_mmproj, tiny_bundle_f32):
    from llama_cpp import Llama

    _, files = ref.manifest_files(tiny_bundle_f32)
    llm = Llama(str(files["text"]), n_ctx=512, n_threads=2, verbose=False)
    pixels = _pixels(3)
    ours, f32 = _encode(bf16_mmproj, llm, pixels), _encode(files["vision"], llm, pixels)
    cos = ref.cosine(ours, f32)
    print(f"bf16 mmproj vs f32 mmproj: cosine {cos:.7f}, worst |d| {np.abs(ours - f32).max():.2e}")
    assert ours.shape == f32.shape == (256, 256)
    assert cos >= BF16_COS_MIN, f"cosine {cos:.7f} < {BF16_COS_MIN}"
