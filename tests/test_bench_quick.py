"""The benchmark harness end to end on the tiny model (`python -m benchmarks.run --quick`).

Slow (a few minutes: six backends, each in its own process, transformers among them), so it is
excluded from the default run; `make test-all` or `pytest -m slow` runs it.
"""

import json

import pytest

from benchmarks.alternate import MIN_ROUNDS, MIN_TOKENS


@pytest.mark.slow
def test_quick_benchmark_writes_a_complete_report(tmp_path):
    from benchmarks.run import main

    assert main(["--quick", "--out", str(tmp_path), "--decode-tokens", "4"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert not data["errors"], data["errors"]
    for name, res in data["results"].items():
        stats = res.get("first") or res.get("text")
        assert stats and stats.get("decode_tok_s"), f"{name}: no decode rate in {res}"
        assert res["peak_rss_mb"] > 0 and res["load_s"] > 0, name
    ours = data["results"]["ours q4_k_m"]
    assert ours["follow_up"]["images_from_cache"] == 1, "the follow-up encoded the image again"
    assert ours["vision"], "the default bundle's auto vision choice was not recorded"
    prepared = data["results"]["ours q4_k_m, pre-encoded study"]["first"]
    assert prepared["reused_tokens"] > 0 and not prepared["image_encode_s"], \
        f"the pre-encoded study was encoded again in the new process: {prepared}"
    assert set(data["busy"]["rates"]) >= {"quiet, runtime's choice", "busy, runtime's choice"}
    assert all(len(v) == MIN_ROUNDS for v in data["busy"]["rounds"].values()), data["busy"]
    assert set(data["alternating"]["q4_k_m"]) == {"ours q4_k_m", "ours q4_k_m, repacked weights", "llama.cpp q4_k_m"}
    assert data["alternating_tokens"] >= MIN_TOKENS
    for quant, pair in data["alternating"].items():
        assert all(len(v["rounds"]) == MIN_ROUNDS for v in pair.values()), (quant, pair)
    decode = [g for g in data["goals"] if g["name"].startswith("decode vs llama.cpp direct")]
    assert len(decode) == 2 and all(g["paired"] and g["paired"]["n"] == MIN_ROUNDS for g in decode), decode
    assert all(g["status"] in ("met", "missed", "within noise") for g in decode), decode
    assert data["preprocess"]["ours q4_k_m"]["ct_series"]["best_ms"] > 0
    report = (tmp_path / "REPORT.md").read_text()
    for goal in ("pre-encoded study", "decode vs llama.cpp direct", "busy process", "every default path",
                 "IQR"):
        assert goal in report, goal
    retired = [g["name"] for g in data["goals"] if "file-decode floor" in g["name"] or "vs cold first" in g["name"]]
    assert not retired, retired
    assert '"/' not in (tmp_path / "results.json").read_text(), "results.json records an absolute path"
    assert (tmp_path / "chart.png").stat().st_size > 1000


@pytest.mark.slow
def test_quick_onnx_text_benchmark(tmp_path):
    """benchmarks.bench_onnx_text on tiny: ONNX int4/int8 bundles, GGUF q4_k_m/q8_0 and
    onnxruntime-genai's Generator each measured, the three decode pairs alternated, the report written."""
    from benchmarks.bench_onnx_text import PAIRS, main

    data = main(["--quick", "--out", str(tmp_path), "--tokens", "4", "--rounds", "1"])
    assert set(data["results"]) == {"ours onnx-int4", "ours onnx-int8", "ours gguf q4_k_m", "ours gguf q8_0",
                                    "genai Generator int8"}
    for name, res in data["results"].items():
        assert "error" not in res, f"{name}: {res['error']}"
        assert res["text"]["decode_tok_s"] and res["text"]["prefill_tok_s"] and res["peak_rss_mb"] > 0, name
    assert len(data["goals"]) == sum(1 for *_, target in PAIRS if target), data["goals"]
    assert all(g["paired"] and g["value"] for g in data["goals"]), data["goals"]
    assert "genai Generator int8" in (tmp_path / "ONNX_TEXT.md").read_text()
    assert '"/' not in (tmp_path / "onnx_text.json").read_text(), "onnx_text.json records an absolute path"


@pytest.mark.slow
def test_quick_node_benchmark(tmp_path):
    """benchmarks.bench_node on tiny: one receive round into the node's spool and into Orthanc, then an
    X-ray and a small CT through `medgemma-edge serve --dicom-port`, each prepared before its question."""
    from benchmarks.bench_node import main

    data = main(["--quick", "--rounds", "1", "--stable-s", "0.5", "--idle-s", "0.5", "--out", str(tmp_path)])
    rec = data["receive"]
    assert rec["counts"] == {"node": rec["expected"], "orthanc": rec["expected"]}, rec
    assert rec["paired"]["n"] == 1 and rec["paired"]["median"] > 0, rec
    for kind in ("xray", "ct"):
        q = data["questions"][kind]
        s = q["server"]
        assert q["ttft_s"] > 0 and q["ready_after_s"] >= 0.5, (kind, q)
        assert s["reused_tokens"] > 0 and not s["image_encode_s"], f"{kind}: asked before it was prepared: {s}"
    assert [g["status"] for g in data["goals"]] and all(g["value"] for g in data["goals"]), data["goals"]
    assert "## Receive throughput" in (tmp_path / "NODE.md").read_text()
    assert '"/' not in (tmp_path / "node.json").read_text(), "node.json records an absolute path"
