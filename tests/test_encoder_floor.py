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
    # the int8 GEMM is faster than the float one the attention ran: the floor at its rate is said too
    assert (f["best_kernel"], f["best_floor_s"]) == ("onnxruntime int8", 15.5)
    assert encoder_floor.explain(f, 14.0).endswith("the floor is 15.5 s, still above the goal: no kernel measured on "
                                                   "this CPU reaches it"), encoder_floor.explain(f, 14.0)


def test_floor_with_the_fastest_kernel_measured():
    w = {"tokens": 4096, "attention": 1.0e12, "linear": 2.0e12}
    rates = {"shape": [4096, 1152, 4304], "threads": 2, "float_gmac_s": 50.0, "int8_gmac_s": 100.0,
             "int8_s8_gmac_s": 125.0, "blas_float_gmac_s": 80.0}
    took = {"attention": 20.0, "linear layers": 25.0, "rest": 0.5}
    f = encoder_floor.floor(w, rates, took, int8_attention=False)
    assert (f["floor_s"], f["best_kernel"], f["best_attention_s"], f["best_floor_s"]) == \
        (40.5, "onnxruntime u8 × s8 int8", 8.0, 28.5)
    under = encoder_floor.explain(f, 30.0)
    assert "the floor is 28.5 s, under the goal" in under and "numpy BLAS float 80 G/s" in under, under
    assert "still above the goal" in encoder_floor.explain(f, 28.0)
    # BLAS faster than any int8 product: the float attention at BLAS's rate is the best
    g = encoder_floor.floor(w, {**rates, "blas_float_gmac_s": 250.0}, took, int8_attention=False)
    assert (g["best_kernel"], g["best_attention_s"]) == ("numpy BLAS float", 4.0)
    # an attention already in int8 at a rate no other kernel beats keeps its floor
    h = encoder_floor.floor(w, {**rates, "int8_gmac_s": 300.0}, took, int8_attention=True)
    assert h["best_floor_s"] == h["floor_s"] and "fastest rate" not in encoder_floor.explain(h, 1.0)


@pytest.mark.parametrize("signed", [False, True])
def test_gemm_rates_measure_both_kernels(signed):
    r = encoder_floor.gemm_rates(256, 128, 256, threads=1, signed_weights=signed, repeat=2)
    assert r["shape"] == [256, 128, 256] and r["signed_weights"] is signed
    # a 256 x 128 x 256 product runs well over 0.05 G multiply-adds/s on any CPU this runs on
    assert r["float_gmac_s"] > 0.05 and r["int8_gmac_s"] > 0.05 and r["int8_s8_gmac_s"] > 0.05, r
    assert r["blas_float_gmac_s"] and r["blas_float_gmac_s"] > 0.05, r
    if signed:  # the file's weights are s8 already: one measurement serves both
        assert r["int8_s8_gmac_s"] == r["int8_gmac_s"]


def test_report_says_the_floor_of_a_met_goal():
    from benchmarks.bench_encoder import report

    f = {"floor_s": 12.0, "best_floor_s": 9.5, "best_kernel": "onnxruntime u8 × s8 int8"}
    data = {"model": "m", "image": 896, "threads": 2, "command": "c", "date": "d", "cpu_kind": "avx512_vnni",
            "cpu_flags": ["avx512_vnni"], "rounds": 3, "files": {}, "floor": f,
            "goal": {"s": 14.0, "cos_min": 0.999, "file": "onnx-int8", "median_s": 13.0, "met": True}}
    md = report(data)
    assert "on this CPU (benchmarks/encoder_floor.py): 12.0 s; with the attention's products at the fastest rate " \
           "measured here (onnxruntime u8 × s8 int8): 9.5 s." in md, md
    del f["best_floor_s"]  # a json from before the faster kernels were measured
    assert "encoder_floor.py): 12.0 s.\n" in report(data)
