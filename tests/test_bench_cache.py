"""benchmarks' cached vision files (bench_vision.vision_file): made again when the export code changes,
and the int8-attention shortcut (the int8-vnni file rewritten) equal to the export's own file."""

import hashlib


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cached_vision_files_follow_the_export_code(tiny_dir, tmp_path):
    from benchmarks.bench_vision import vision_file
    from benchmarks.bundles import export_digest
    from medgemma_edge.export.bundle import ExportPlan

    plan = ExportPlan.read(tiny_dir)
    f32 = vision_file(plan, tmp_path, "onnx-f32")
    stamp = f32.with_name(f32.name + ".stamp")
    assert stamp.read_text() == export_digest()
    made = f32.stat().st_mtime_ns
    assert vision_file(ExportPlan.read(tiny_dir), tmp_path, "onnx-f32").stat().st_mtime_ns == made  # cached
    stamp.write_text("made by other export code")
    assert vision_file(ExportPlan.read(tiny_dir), tmp_path, "onnx-f32").stat().st_mtime_ns != made  # made again
    assert stamp.read_text() == export_digest()

    plan = ExportPlan.read(tiny_dir)
    vision_file(plan, tmp_path, "onnx-int8-vnni")
    shortcut = vision_file(plan, tmp_path, "onnx-int8-vnni-attn")  # from the int8-vnni file
    (tmp_path / "own").mkdir()
    own = tmp_path / "own" / "attn.onnx"
    ExportPlan.read(tiny_dir).write_vision(own, "onnx-int8-vnni-attn", scratch=tmp_path / "own")
    assert _sha(shortcut) == _sha(own), "the rewritten int8-vnni file differs from the export's int8-attention file"


def test_the_export_digest_follows_code_not_prose():
    from benchmarks.bundles import code_digest

    src = '"""Module."""\nX = 1  # one\n\n\ndef f():\n    """Doc."""\n    return X\n'
    prose = '"""Module, reworded."""\nX = 1  # a different comment\n\n\ndef f():\n    """Other doc."""\n    return X\n'
    code = src.replace("X = 1", "X = 2")
    assert code_digest(src) == code_digest(prose)
    assert code_digest(src) != code_digest(code)


def test_the_bench_warms_every_file_a_load_may_read(tmp_path):
    """Loads are measured from the page cache: every vision file is read first, not only the
    bundle's first one (vision="auto" opened onnx-int8 on AVX2, the bench had warmed the f16 mmproj)."""
    import json

    from benchmarks.backends import Spec
    from benchmarks.run import _files_of

    files = [{"role": "text", "path": "t.gguf"}, {"role": "vision", "path": "mmproj-f16.gguf", "quant": "f16"},
             {"role": "vision", "path": "vision-int8.onnx", "quant": "onnx-int8"},
             {"role": "vision", "path": "vision-int8-vnni.onnx", "quant": "onnx-int8-vnni"},
             {"role": "tokenizer", "path": "tokenizer.json"}]
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files}))
    spec = Spec("ours q4_k_m", "ours", {"bundle": str(tmp_path)})
    assert [p.name for p in _files_of(spec)] == ["t.gguf", "mmproj-f16.gguf", "vision-int8.onnx",
                                                 "vision-int8-vnni.onnx"]
