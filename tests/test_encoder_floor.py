"""benchmarks/encoder_floor.py: the multiply-adds it divides by a measured rate are the tower's own
(cross-checked with the roofline's independent FLOP count), and the floor's verdict turns on the goal."""

from types import SimpleNamespace

import pytest

from benchmarks import encoder_floor, roofline

# MedGemma 4B's SigLIP tower (config.json's vision_config) at 896 px
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=896, patch_size=14)


def test_work_matches_the_roofline_count():
    w = encoder_floor.work(SimpleNamespace(**SIGLIP))
    assert w["tokens"] == 4096
    # the roofline counts FLOPs (2 per multiply-add) of everything; without patch embedding and projector
    t, d, p = 4096, SIGLIP["hidden_size"], SIGLIP["patch_size"]
    total = roofline.image_encoder_flops(SIGLIP, text_hidden=2560, tokens_per_image=256)
    rest = 2 * t * 3 * p * p * d + 2 * 256 * d * 2560
    mine = 2 * (w["attention"] + w["linear"])
    assert abs(mine - (total - rest)) / total < 1e-12, (mine, total - rest)
    assert w["attention"] == pytest.approx(1.04368e12, rel=1e-5)  # 27 layers x 2 x 4096^2 x 1152


def test_floor_and_its_verdict():
    w = {"tokens": 4096, "attention": 1.0e12, "linear": 2.0e12}
    rates = {"shape": [4096, 1152, 4304], "threads": 2, "float_gmac_s": 100.0, "int8_gmac_s": 200.0}
    took = {"attention": 20.0, "linear layers": 16.0, "rest": 0.5}
    f = encoder_floor.floor(w, rates, took, int8_attention=False)
    assert (f["attention_s"], f["linear_s"], f["floor_s"]) == (10.0, 10.0, 20.5)
    assert (f["attention_gmac_s"], f["linear_gmac_s"]) == (50.0, 125.0)
    assert encoder_floor.floor(w, rates, took, int8_attention=True)["attention_s"] == 5.0
    assert "above the goal's 14 s" in encoder_floor.explain(f, 14.0)
    assert "under the goal's 28 s" in encoder_floor.explain(f, 28.0)


@pytest.mark.parametrize("signed", [False, True])
def test_gemm_rates_measure_both_kernels(signed):
    r = encoder_floor.gemm_rates(256, 128, 256, threads=1, signed_weights=signed, repeat=2)
    assert r["shape"] == [256, 128, 256] and r["signed_weights"] is signed
    # a 256 x 128 x 256 product runs well over 0.05 G multiply-adds/s on any CPU this runs on
    assert r["float_gmac_s"] > 0.05 and r["int8_gmac_s"] > 0.05, r
