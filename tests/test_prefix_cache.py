"""Prepared studies: the prompt prefix up to the end of a study's images is saved (llama.cpp's
sequence state) in the image cache and restored by a later question in a new Model or process.
Restored logits must equal fresh ones; another system prompt or another text model never reuses it."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

RADIOLOGIST = "You are an expert radiologist."


def _picture(seed, size=(300, 240)):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    base = np.stack([np.sin(9 * x + 3 * y), np.cos(7 * y - 2 * x), np.sin(5 * (x + y))], -1)
    return (127.5 + 100 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)


def _study(seed, system=RADIOLOGIST, question=None):
    content = [{"type": "image", "image": _picture(seed)}]
    if question:
        content.append({"type": "text", "text": question})
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def _load(bundle, cache=None):
    import medgemma_edge

    return medgemma_edge.load(bundle, threads=2, context=1024, image_cache_dir=cache)


def _restored_logits_match_fresh(bundle, tmp_path, seed):
    prepared = _load(bundle, tmp_path / "cache").prepare(_study(seed))
    assert prepared.restored_tokens == 0 and prepared.images == 1 and prepared.image_encode_s > 0
    asked = _load(bundle, tmp_path / "cache")  # a new Model: nothing in memory
    question = _study(seed, question="Is there a fracture?")
    got = asked.next_token_logits(question)
    reply = _load(bundle, tmp_path / "cache").chat(question, max_new_tokens=1)
    want = _load(bundle).next_token_logits(question)
    worst = float(np.abs(got - want).max())
    st = reply.stats
    print(f"restored {st.restored_tokens} of {st.prompt_tokens} positions, encode {st.image_encode_s} s; "
          f"worst |d| vs fresh {worst:.2e}, same top-1: {got.argmax() == want.argmax()}")
    assert st.restored_tokens >= 256 and st.images_from_cache == st.images == 1
    assert got.argmax() == want.argmax() and worst <= 1e-4, f"worst |d| {worst:.2e}"
    return asked


def test_restored_prefix_gives_fresh_logits_tiny(tiny_bundle_f32, tmp_path):
    asked = _restored_logits_match_fresh(tiny_bundle_f32, tmp_path, seed=1)
    assert asked._vision is None, "a prepared study must not load the vision encoder"


def test_restored_prefix_gives_fresh_logits_270m(tmp_path):
    """Real Gemma 3 270M weights (the demo bundle: 270M + a random vision tower, q8_0)."""
    from medgemma_edge.demo import demo_bundle

    _restored_logits_match_fresh(demo_bundle(progress=lambda m: None), tmp_path, seed=2)


def test_another_system_prompt_is_not_restored(tiny_bundle_f32, tmp_path):
    _load(tiny_bundle_f32, tmp_path).prepare(_study(3))
    reply = _load(tiny_bundle_f32, tmp_path).chat(_study(3, system="Be brief.", question="Q?"), max_new_tokens=1)
    assert reply.stats.restored_tokens == 0
    assert reply.stats.images_from_cache == 1  # the embeddings still serve


def test_another_text_model_is_not_restored(tiny_bundle_f32, tiny_dir, tmp_path):
    """Same vision file (so the same cache folder), other text weights: the key differs."""
    from medgemma_edge.export.bundle import export_gguf

    other = export_gguf(tiny_dir, tmp_path / "f16", "f16", "f32", quality=False).bundle
    vision = lambda b: next(f["sha256"] for f in json.loads((b / "manifest.json").read_text())["files"]
                            if f["role"] == "vision")
    assert vision(other) == vision(tiny_bundle_f32)
    _load(tiny_bundle_f32, tmp_path / "c").prepare(_study(4))
    reply = _load(other, tmp_path / "c").chat(_study(4, question="Q?"), max_new_tokens=1)
    assert reply.stats.restored_tokens == 0 and reply.stats.images_from_cache == 1


def test_a_damaged_prefix_is_recomputed(tiny_bundle_f32, tmp_path):
    model = _load(tiny_bundle_f32, tmp_path)
    model.prepare(_study(5))
    for f in model.image_cache.dir.glob("*.npy"):
        if f.stat().st_size > 4 << 20:  # the prefix (the embeddings are 256 KB)
            data = bytearray(f.read_bytes())
            data[len(data) // 2:len(data) // 2 + 4096] = b"\xff" * 4096
            f.write_bytes(bytes(data[: len(data) - 100]))  # and cut short
    fresh = _load(tiny_bundle_f32).next_token_logits(_study(5, question="Q?"))
    got = _load(tiny_bundle_f32, tmp_path).next_token_logits(_study(5, question="Q?"))
    assert np.abs(got - fresh).max() <= 1e-4


def test_encode_then_ask_in_a_new_process_skips_the_encoder(tiny_bundle_f32, tmp_path):
    pictures = []
    for seed in (6, 7):
        pictures.append(tmp_path / f"p{seed}.png")
        Image.fromarray(_picture(seed)).save(pictures[-1])
    worklist = tmp_path / "worklist.txt"
    worklist.write_text("# today\np7.png\n\n")
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    cache = tmp_path / "cache"
    cli = [sys.executable, "-c", "from medgemma_edge.cli import main; main()"]
    run = subprocess.run(cli + ["encode", str(pictures[0]), str(worklist), str(bad), "-m", str(tiny_bundle_f32),
                                "--image-cache", str(cache), "--threads", "2"], capture_output=True, text=True,
                         timeout=300)
    print(run.stdout, run.stderr)
    assert run.returncode == 2 and "prepared 2, already prepared 0, failed 1" in run.stdout
    assert sum(ln.count("error:") for ln in run.stderr.splitlines()) == 1
    again = subprocess.run(cli + ["encode", str(pictures[0]), "-m", str(tiny_bundle_f32), "--image-cache", str(cache)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already prepared 1" in again.stdout, again.stdout + again.stderr
    ask = subprocess.run(cli + ["ask", "Is there a fracture?", "-m", str(tiny_bundle_f32), "--image", str(pictures[1]),
                                "--image-cache", str(cache), "--max-tokens", "2", "--stats", "--threads", "2"],
                         capture_output=True, text=True, timeout=300)
    assert ask.returncode == 0, ask.stderr
    stats = json.loads(next(ln for ln in ask.stderr.splitlines() if ln.startswith("stats "))[6:])
    print(stats)
    assert stats["restored_tokens"] >= 256 and stats["images_from_cache"] == 1 and stats["image_encode_s"] < 0.05


def test_prefix_bytes_per_image(tiny_bundle_f32, tmp_path):
    """What one prepared image costs on disk (tiny here; the benchmark reports the 4B shape)."""
    model = _load(tiny_bundle_f32, tmp_path)
    model.prepare(_study(8))
    files, size = model.image_cache.disk_usage()
    print(f"{files} files, {size / 1e6:.2f} MB for one image (embeddings + prefix)")
    assert files == 2 and size > 256 * 256 * 4


def test_budget_picks_a_count_that_fits_a_slow_encoder(tiny_bundle_f32, tmp_path, monkeypatch):
    """A fake encoder that 'takes' 10 s per slice: a 35 s budget gets 3 slices of a 12-slice series,
    with the recipe's sampling rule; cached slices cost nothing, so a second plan gets more."""
    from medgemma_edge.runtime import budget as budget_mod
    from medgemma_edge.runtime.dicom.series import select_indices
    from tests.dicom_helpers import write_series

    folder = tmp_path / "ct"
    write_series(folder, 12)
    monkeypatch.setenv("MEDGEMMA_EDGE_CACHE", str(tmp_path / "home"))
    model = _load(tiny_bundle_f32, tmp_path / "cache")
    monkeypatch.setattr(model.encode_speed, "seconds", lambda: 10.0)  # a slow machine
    plan = budget_mod.plan_slices(model, folder, 35.0)
    print(plan.describe(35.0))
    assert (plan.slices, plan.total, plan.to_encode) == (3, 12, 3) and plan.expected_s == 30.0
    reply = model.chat([{"role": "user", "content": [{"type": "image", "image": str(folder)},
                                                     {"type": "text", "text": "Q?"}]}],
                       max_new_tokens=1, max_slices=plan.slices)
    assert reply.stats.images == 3
    again = budget_mod.plan_slices(model, folder, 35.0)  # the 3 encoded slices are cached now
    missing = [i for i in select_indices(12, again.slices) if i not in select_indices(12, 3)]
    print(again.describe(35.0))
    assert again.slices > plan.slices and again.to_encode == len(missing) and again.to_encode * 10.0 <= 35.0
