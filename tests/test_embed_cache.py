"""The image-embedding cache: memory LRU, optional bounded disk folder, same answers as without it."""

import os
import stat

import numpy as np
import pytest
from PIL import Image

from medgemma_edge.runtime.embed_cache import EmbeddingCache, pixel_digest

SHAPE = (4, 8)


def _emb(seed):
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


def test_memory_lru_keeps_the_most_recent(tmp_path):
    cache = EmbeddingCache(SHAPE, "m" * 64, memory_items=2)
    for i in range(3):
        cache.put(f"d{i}", _emb(i))
    assert cache.get("d0") == (None, None)
    got, where = cache.get("d2")
    assert where == "memory" and np.array_equal(got, _emb(2))


def test_disk_round_trip_is_exact_and_private(tmp_path):
    a = EmbeddingCache(SHAPE, "a" * 64, disk_dir=tmp_path / "cache")
    a.put("d1", _emb(1))
    b = EmbeddingCache(SHAPE, "a" * 64, disk_dir=tmp_path / "cache")  # a new process, same bundle
    got, where = b.get("d1")
    assert where == "disk" and got.dtype == np.float32 and np.array_equal(got, _emb(1))
    assert stat.S_IMODE(os.stat(b.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    other = EmbeddingCache(SHAPE, "b" * 64, disk_dir=tmp_path / "cache")  # another vision file
    assert other.get("d1") == (None, None)
    assert not list(b.dir.glob("*.part"))


def test_an_open_folder_is_closed_and_stale_parts_removed(tmp_path):
    cache = EmbeddingCache(SHAPE, "f" * 64, disk_dir=tmp_path)
    os.chmod(cache.dir, 0o777)
    # Names as the cache makes them (an earlier version's mkstemp named them tmp????????.part).
    stale = cache.dir / f"{'1' * 32}.{'2' * 16}.part"
    stale_old_version = cache.dir / "tmpab_c1234.part"
    fresh = cache.dir / f"{'3' * 32}.{'4' * 16}.part"
    for path in (stale, stale_old_version, fresh):
        path.write_bytes(b"half an embedding")
    os.utime(stale, (1000, 1000))
    os.utime(stale_old_version, (1000, 1000))
    again = EmbeddingCache(SHAPE, "f" * 64, disk_dir=tmp_path)
    assert stat.S_IMODE(os.stat(again.dir).st_mode) == 0o700
    assert not stale.exists() and not stale_old_version.exists() and fresh.exists()


def test_disk_is_bounded_least_recently_used_first(tmp_path):
    one = _emb(0).nbytes + 128  # .npy header
    cache = EmbeddingCache(SHAPE, "c" * 64, memory_items=0, disk_dir=tmp_path, disk_mb=2.5 * one / 2**20)
    for i in range(2):
        cache.put(f"d{i}", _emb(i))
        os.utime(cache._path(f"d{i}"), (1000 + i, 1000 + i))
    assert cache.get("d0")[1] == "disk"  # touched: now the most recent
    cache.put("d2", _emb(2))
    files, size = cache.disk_usage()
    print(f"{files} files, {size} bytes, limit {cache.disk_limit}")
    assert files == 2 and size <= cache.disk_limit
    assert cache.get("d1") == (None, None)
    assert cache.get("d0")[1] == "disk" and cache.get("d2")[1] == "disk"


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape", "not_npy", "nan"])
def test_a_damaged_file_is_a_miss_and_is_removed(tmp_path, damage):
    cache = EmbeddingCache(SHAPE, "d" * 64, memory_items=0, disk_dir=tmp_path)
    cache.put("d1", _emb(1))
    path = cache._path("d1")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    elif damage == "wrong_shape":
        np.save(path, np.zeros((3, 8), np.float32))
    elif damage == "not_npy":
        path.write_bytes(b"PatientName=DOE^JANE")
    else:
        bad = _emb(1)
        bad[0, 0] = np.nan
        np.save(path, bad)
    assert cache.get("d1") == (None, None)
    assert not path.exists()


@pytest.mark.parametrize("where", ["open", "save", "replace"])
def test_a_full_disk_costs_speed_not_the_answer(tmp_path, monkeypatch, where):
    import errno

    import medgemma_edge.runtime.embed_cache as ec

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = EmbeddingCache(SHAPE, "e" * 64, disk_dir=tmp_path)
    monkeypatch.setattr(ec.np if where == "save" else ec.os, where, full)
    cache.put("d1", _emb(1))  # must not raise
    monkeypatch.undo()
    assert cache.get("d1")[1] == "memory"
    assert cache.disk_usage() == (0, 0) and not list(cache.dir.iterdir()), "no partial file left behind"


def test_digest_depends_on_every_pixel_and_the_shape():
    px = np.zeros((8, 8, 3), np.uint8)
    other = px.copy()
    other[7, 7, 2] = 1
    assert pixel_digest(px) != pixel_digest(other)
    assert pixel_digest(px) != pixel_digest(px.reshape(4, 16, 3))
    assert pixel_digest(px) == pixel_digest(px.copy())


def _chat(seed):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    return [{"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": "Any findings?"}]}]


def test_disk_cache_gives_the_same_logits_without_loading_the_encoder(tiny_bundle_f32, tmp_path):
    import medgemma_edge

    msgs = _chat(21)
    plain = medgemma_edge.load(tiny_bundle_f32, threads=2, context=1024)
    want = plain.next_token_logits(msgs)
    first = medgemma_edge.load(tiny_bundle_f32, threads=2, context=1024, image_cache_dir=tmp_path)
    reply = first.chat(msgs, max_new_tokens=1)
    # the image's embeddings, and the evaluated prefix up to its end (runtime/prefill.py)
    assert reply.stats.images_from_cache == 0 and first.image_cache.disk_usage()[0] == 2
    again = medgemma_edge.load(tiny_bundle_f32, threads=2, context=1024, image_cache_dir=tmp_path)
    got = again.next_token_logits(msgs)
    worst = float(np.abs(got - want).max())
    print(f"disk-cached vs plain: worst |d| {worst:.2e}")
    assert worst <= 1e-5, f"worst |d| {worst:.2e}"
    assert again._vision is None, "a cached image should not load the vision file"


def test_cli_ask_image_cache_option(tiny_bundle_f32, tmp_path):
    from click.testing import CliRunner

    from medgemma_edge.cli import main

    picture = tmp_path / "p.png"
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(picture)
    cache = tmp_path / "emb"
    args = ["ask", "What is this?", "-m", str(tiny_bundle_f32), "--image", str(picture),
            "--max-tokens", "2", "--threads", "2", "--image-cache", str(cache)]
    for _ in range(2):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    assert len(list(cache.rglob("*.npy"))) == 2  # the image's embeddings and its evaluated prefix


def test_cli_refuses_an_image_cache_others_can_write_in_one_line(tiny_bundle_f32, tmp_path):
    from click.testing import CliRunner

    from medgemma_edge.cli import main

    picture = tmp_path / "p.png"
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(picture)
    cache = tmp_path / "emb"
    cache.mkdir()
    os.chmod(cache, 0o777)
    args = ["ask", "What is this?", "-m", str(tiny_bundle_f32), "--image", str(picture),
            "--max-tokens", "2", "--threads", "2", "--image-cache", str(cache)]
    result = CliRunner().invoke(main, args)
    print(result.output)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.count("\n") == 1 and "written by other users" in result.output
