"""load(vision="auto"): the fastest faithful vision file for this machine, by measurement where
there is one, else by the CPU's kind (mocked flags here); an unfaithful file is never picked."""

import json

import numpy as np
import pytest

from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.vision_choice import choose_vision, cpu_kind

F16 = {"role": "vision", "path": "m-mmproj-f16.gguf", "quant": "f16", "fidelity": 0.99998}
INT8 = {"role": "vision", "path": "m-vision-int8.onnx", "quant": "onnx-int8", "fidelity": 0.9995}
INT8_BAD = {**INT8, "fidelity": 0.98}  # 8-bit weights overflowing AVX2's int16 sums: measured 0.98
Q8 = {"role": "vision", "path": "m-mmproj-q8_0.gguf", "quant": "q8_0", "fidelity": None}  # not measured
F32 = {"role": "vision", "path": "m-mmproj-f32.gguf", "quant": "f32", "fidelity": 1.0}

VNNI = {"avx2", "avx512f", "avx512_vnni"}
AVX2 = {"avx2", "fma"}
NEON = {"asimd"}


@pytest.mark.parametrize("flags,gpu,kind", [(VNNI, False, "vnni"), (AVX2, False, "avx2"), (NEON, False, "other"),
                                            (VNNI, True, "gpu")])
def test_cpu_kind(flags, gpu, kind):
    assert cpu_kind(flags, gpu) == kind


def test_int8_on_cpus_where_it_was_measured_fastest():
    assert choose_vision([F16, INT8], flags=VNNI) is INT8
    assert choose_vision([F16, INT8], flags=AVX2) is INT8


def test_float_where_int8_was_not_measured_and_on_a_gpu():
    assert choose_vision([F16, INT8], flags=NEON) is F16
    assert choose_vision([INT8, F16], flags=VNNI, gpu=True) is F16


def test_never_an_unfaithful_or_unmeasured_file():
    assert choose_vision([F16, INT8_BAD], flags=VNNI) is F16
    assert choose_vision([F16, Q8], flags=VNNI) is F16
    assert choose_vision([Q8], flags=VNNI) is Q8  # the only one there is: the primary
    assert choose_vision([F32, INT8_BAD], flags=VNNI) is F32


def test_this_machines_measurements_win():
    times = {"f16": 20.0, "onnx-int8": 30.0}
    assert choose_vision([F16, INT8], flags=VNNI, measured=lambda e: times[e["quant"]]) is F16
    partly = {"f16": 20.0, "onnx-int8": None}  # not every candidate timed: the ranking decides
    assert choose_vision([F16, INT8], flags=VNNI, measured=lambda e: partly[e["quant"]]) is INT8


def test_an_explicit_choice_and_a_missing_one():
    assert choose_vision([F16, INT8], "f16", flags=VNNI) is F16
    with pytest.raises(InputError, match="no 'q8_0' vision file"):
        choose_vision([F16, INT8], "q8_0", flags=VNNI)


def test_a_bundle_with_two_vision_files(tiny_dir, tmp_path, monkeypatch):
    """Export writes every --vision-quant with its fidelity; the runtime runs the one chosen, and
    both give the same image embeddings within the recorded fidelity."""
    import medgemma_edge
    from medgemma_edge.export.bundle import export_gguf
    from medgemma_edge.runtime import vision_choice

    res = export_gguf(tiny_dir, tmp_path / "b", "f32", ("f16", "onnx-int8"), threads=2)
    vision = [f for f in res.manifest["files"] if f["role"] == "vision"]
    print(json.dumps(vision, indent=1))
    assert [f["quant"] for f in vision] == ["f16", "onnx-int8"] and res.manifest["quantization"]["vision"] == "f16"
    assert all(f["fidelity"] is not None and f["fidelity"] >= 0.999 for f in vision)
    assert [v["quant"] for v in res.manifest["quality"]["vision_files"]] == ["f16", "onnx-int8"]
    monkeypatch.setattr(vision_choice, "cpu_flags", lambda: VNNI)
    monkeypatch.setenv("MEDGEMMA_EDGE_CACHE", str(tmp_path / "cache"))  # no encode times measured yet
    auto = medgemma_edge.load(res.bundle, threads=2, context=1024)
    f16 = medgemma_edge.load(res.bundle, threads=2, context=1024, vision="f16")
    assert auto.vision_path.suffix == ".onnx" and f16.vision_path.suffix == ".gguf"
    pixels = np.random.default_rng(0).integers(0, 256, (896, 896, 3), dtype=np.uint8)
    a, b = auto.image_embeddings(pixels)[1], f16.image_embeddings(pixels)[1]
    cos = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
    print(f"onnx-int8 vs f16 embeddings: cosine {cos:.6f}")
    assert cos >= 0.998


def test_int8_below_the_fidelity_bar_is_not_picked():
    """At 4B shape with random weights onnx-int8 measured 0.9987: under 0.999, so f16 runs."""
    assert choose_vision([F16, {**INT8, "fidelity": 0.9987}], flags=VNNI) is F16


VNNI8 = {"role": "vision", "path": "m-vision-int8-vnni.onnx", "quant": "onnx-int8-vnni", "fidelity": 0.9996}


def test_full_8bit_int8_runs_only_where_vnni_is():
    assert choose_vision([F16, INT8, VNNI8], flags=VNNI) is VNNI8
    assert choose_vision([F16, INT8, VNNI8], flags=AVX2) is INT8  # it would overflow there
    assert choose_vision([VNNI8, F16], flags=AVX2) is F16  # even when it is the primary
    assert choose_vision([{**VNNI8, "fidelity": None}, Q8], flags=AVX2) is Q8  # even unmeasured beside it
    assert choose_vision([F16, VNNI8], flags=VNNI, gpu=True) is F16
    assert choose_vision([VNNI8], flags=VNNI, gpu=True) is VNNI8  # its int8 operators run on this CPU


ATTN8 = {"role": "vision", "path": "m-vision-int8-vnni-attn.onnx", "quant": "onnx-int8-vnni-attn", "fidelity": 0.9996}


def test_int8_attention_leads_where_vnni_is_and_nowhere_else():
    """Measured faster at 4B shape on VNNI (benchmarks/bench_encoder.py); never picked without VNNI,
    where its full-range int8 products would overflow and no time was measured."""
    assert choose_vision([F16, INT8, VNNI8, ATTN8], flags=VNNI) is ATTN8
    assert choose_vision([F16, INT8, VNNI8, ATTN8], flags=AVX2) is INT8
    assert choose_vision([ATTN8, F16], flags=AVX2) is F16
    assert choose_vision([F16, VNNI8, {**ATTN8, "fidelity": 0.998}], flags=VNNI) is VNNI8  # under the bar
    assert choose_vision([F16, VNNI8, ATTN8], flags=VNNI, gpu=True) is F16
    with pytest.raises(InputError, match="needs a CPU with vnni"):
        choose_vision([ATTN8, INT8], "onnx-int8-vnni-attn", flags=AVX2)


@pytest.mark.parametrize("flags", [AVX2, NEON, set()])
def test_full_8bit_int8_by_name_without_vnni_is_one_line(flags):
    """Asked for by name where it would overflow: refused, naming what the bundle holds instead."""
    with pytest.raises(InputError) as err:
        choose_vision([VNNI8, INT8, F16, INT8_BAD], "onnx-int8-vnni", flags=flags)
    line = str(err.value)
    print(line)
    assert "\n" not in line and "needs a CPU with vnni" in line and "also holds onnx-int8, f16:" in line
    assert choose_vision([VNNI8, F16], "onnx-int8-vnni", flags=VNNI) is VNNI8
    with pytest.raises(InputError, match="holds no other — re-export the bundle with --vision-quant onnx-int8"):
        choose_vision([VNNI8], "onnx-int8-vnni", flags=flags)


def test_auto_refuses_when_only_the_full_8bit_file_is_there():
    """auto never falls back to a file that would overflow: the refusal Model keeps for images."""
    with pytest.raises(InputError, match="--vision-quant onnx-int8 \\(or f16\\), or ask without images"):
        choose_vision([VNNI8], flags=AVX2)
    with pytest.raises(InputError, match="needs a CPU with vnni"):
        choose_vision([VNNI8], flags=AVX2, gpu=True)


def test_the_exporting_machine_is_recorded_and_shown():
    from medgemma_edge.runtime.vision_choice import export_machine, measured_on

    machine = export_machine(VNNI | {"sse4_2", "avx512_bf16"})
    assert machine == {"cpu_kind": "vnni", "cpu_flags": ["avx2", "avx512_bf16", "avx512_vnni", "avx512f"]}
    manifest = {"files": [F16, INT8], "export_machine": export_machine(AVX2)}
    assert measured_on(manifest) == "vision fidelity measured on the exporting machine, CPU kind avx2 (avx2, fma)"
    assert measured_on({"files": [F16, INT8]}) is None  # an older bundle: nothing recorded
    assert measured_on({"files": [F32], "export_machine": export_machine(AVX2)}) is None  # nothing measured


BF16 = {"role": "vision", "path": "m-mmproj-bf16.gguf", "quant": "bf16", "fidelity": 0.9999}


def test_bf16_mmproj_ranks_by_the_cpus_bf16_support():
    assert choose_vision([BF16, Q8], flags=VNNI | {"avx512_bf16"}) is BF16
    assert choose_vision([BF16, {**Q8, "fidelity": 0.9995}], flags=VNNI) is not BF16  # widened in software
    assert choose_vision([F16, BF16], flags=VNNI | {"avx512_bf16"}) is BF16  # measured faster there
    assert choose_vision([BF16, F16], flags=VNNI) is F16
    assert choose_vision([BF16, INT8, VNNI8], flags=VNNI | {"avx512_bf16"}) is VNNI8


def test_one_encode_beside_other_work_does_not_hide_the_fastest_path(tmp_path):
    """Paths are compared by their best remembered encode (runtime/budget.EncodeSpeed.best): the 4B
    int8 file once timed 117 s and 129 s beside other jobs and 20 s quiet; f16 took ~50 s each time.
    The mean (55 s) would have picked f16 for good; the best picks int8."""
    from medgemma_edge.runtime.budget import EncodeSpeed

    speeds = {q: EncodeSpeed(tmp_path, q, 2) for q in ("f16", "onnx-int8")}
    for q, times in (("f16", (51.9, 49.7, 50.4)), ("onnx-int8", (117.2, 128.8, 20.0))):
        for t in times:
            speeds[q].record(t)
    assert speeds["onnx-int8"].seconds() > speeds["f16"].seconds()  # the mean still serves --budget
    chosen = choose_vision([F16, INT8], flags=VNNI, measured=lambda e: speeds[e["quant"]].best())
    assert chosen is INT8, f"picked {chosen['quant']}: best f16 {speeds['f16'].best()}, int8 {speeds['onnx-int8'].best()}"
