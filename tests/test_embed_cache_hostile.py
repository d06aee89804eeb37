"""The disk image cache against a hostile or broken folder (issue 12): it refuses or ignores what
another user planted, never follows a symbolic link, never deletes a file it did not name, never
hangs, and says in one line what to do when the folder cannot be used.

These tests usually run as root, which ignores permission bits: "another user" is a chown to
`NOBODY`, and "cannot write" is an error injected where the cache meets the operating system.
"""

import errno
import os
import stat
import threading

import numpy as np
import pytest

import medgemma_edge.runtime.embed_cache as ec
from medgemma_edge.runtime.embed_cache import EmbeddingCache
from medgemma_edge.runtime.errors import InputError

SHAPE = (4, 8)
VISION_ID = "5" * 64
NOBODY = 65534


def _emb(seed):
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


def _bundle_folder_name(tmp_path):
    """The subfolder name the cache uses for VISION_ID, learned from a cache in a scratch root."""
    return EmbeddingCache(SHAPE, VISION_ID, disk_dir=tmp_path / "probe").dir.name


def _private_dir(path, mode=0o700):
    path.mkdir()
    os.chmod(path, mode)
    return path


def _victim(tmp_path):
    """Another folder of the same user with .npy files the cache must never touch; one of them
    even has the cache's shape, so reading through a link would return it as an embedding."""
    victim = _private_dir(tmp_path / "victim", 0o755)
    np.save(victim / "study_0001.npy", _emb(7))
    np.save(victim / "notes.npy", np.arange(5))
    return victim, _snapshot(victim)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}, stat.S_IMODE(os.lstat(folder).st_mode)


def _give_to_nobody(path):
    try:
        os.lchown(path, NOBODY, NOBODY)
    except PermissionError:
        pytest.skip("needs root to create another user's files")


def _refused(disk_dir, match):
    with pytest.raises(InputError, match=match) as caught:
        EmbeddingCache(SHAPE, VISION_ID, disk_dir=disk_dir)
    message = str(caught.value)
    print(message)
    assert "\n" not in message and "--image-cache" in message, "one line that says what to do"
    return message


# -- the root and the bundle's subfolder -----------------------------------------------------------
@pytest.mark.parametrize("root_mode", [0o700, 0o1777], ids=oct)
def test_a_symlinked_subfolder_is_refused_and_the_victims_files_survive(tmp_path, root_mode):
    # 0o1777: the case, a shared sticky folder where another user planted the link.
    victim, before = _victim(tmp_path)
    root = _private_dir(tmp_path / "shared", root_mode)
    link = root / _bundle_folder_name(tmp_path)
    link.symlink_to(victim, target_is_directory=True)
    if root_mode & 0o002:
        _give_to_nobody(link)
    _refused(root, "symbolic link" if root_mode == 0o700 else "written by other users")
    assert _snapshot(victim) == before, "the victim's folder was changed (files or mode)"


@pytest.mark.parametrize("target", ["existing", "dangling"])
def test_a_symlinked_root_is_refused(tmp_path, target):
    victim, before = _victim(tmp_path)
    link = tmp_path / "cache"
    link.symlink_to(victim if target == "existing" else tmp_path / "nowhere", target_is_directory=True)
    _refused(link, "symbolic link")
    assert _snapshot(victim) == before
    assert not (tmp_path / "nowhere").exists(), "a dangling link's target must not be created"


def test_a_root_of_another_user_is_refused(tmp_path):
    root = _private_dir(tmp_path / "theirs")
    _give_to_nobody(root)
    _refused(root, "belongs to another user")
    assert not list(root.iterdir()) and os.lstat(root).st_uid == NOBODY


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770], ids=oct)
def test_a_root_writable_by_others_is_refused(tmp_path, mode):
    # Sticky or not: whoever can write the root can create the bundle's subfolder before us.
    root = _private_dir(tmp_path / "open", mode)
    _refused(root, "written by other users")
    assert not list(root.iterdir()) and stat.S_IMODE(os.lstat(root).st_mode) == mode, "left as it was"


def test_a_subfolder_of_another_user_is_refused(tmp_path):
    root = _private_dir(tmp_path / "cache")
    sub = _private_dir(root / _bundle_folder_name(tmp_path), 0o777)
    _give_to_nobody(sub)
    _refused(root, "belongs to another user")
    assert stat.S_IMODE(os.lstat(sub).st_mode) == 0o777, "another user's folder is not chmodded"


def test_a_file_where_the_subfolder_should_be_is_refused(tmp_path):
    root = _private_dir(tmp_path / "cache")
    planted = root / _bundle_folder_name(tmp_path)
    planted.write_bytes(b"not a folder")
    _refused(root, "not a folder")
    assert planted.read_bytes() == b"not a folder"


def _fail(err_no):
    def fail(*args, **kwargs):
        raise OSError(err_no, os.strerror(err_no))
    return fail


@pytest.mark.parametrize("case", ["root_is_a_file", "under_a_file", "cannot_create_root",
                                  "cannot_create_subfolder", "read_only_disk", "cannot_open_root"])
def test_an_unusable_root_is_one_clear_error(tmp_path, monkeypatch, case):
    root = tmp_path / "cache"
    if case == "root_is_a_file":
        root.write_bytes(b"x")
    elif case == "under_a_file":
        (tmp_path / "file").write_bytes(b"x")
        root = tmp_path / "file" / "cache"
    elif case == "cannot_create_root":  # what a 0o500 parent does to a user who is not root
        monkeypatch.setattr(ec.os, "mkdir", _fail(errno.EACCES))
    elif case == "cannot_create_subfolder":  # a 0o500 root of our own
        _private_dir(root, 0o500)
        monkeypatch.setattr(ec.os, "mkdir", _fail(errno.EACCES))
    elif case == "read_only_disk":
        _private_dir(root)
        monkeypatch.setattr(ec.os, "mkdir", _fail(errno.EROFS))
    else:
        _private_dir(root)
        monkeypatch.setattr(ec.os, "open", _fail(errno.EACCES))
    _refused(root, "cannot use .* for the image cache")


def test_a_swapped_subfolder_does_not_redirect_later_writes(tmp_path):
    # The check happens once, on the open descriptor; a path swapped afterwards is never used.
    victim, before = _victim(tmp_path)
    cache = EmbeddingCache(SHAPE, VISION_ID, memory_items=0, disk_dir=tmp_path / "cache", disk_mb=0)
    moved = tmp_path / "moved"
    cache.dir.rename(moved)
    cache.dir.symlink_to(victim, target_is_directory=True)
    cache.put("d1", _emb(1))  # disk_mb=0: written, then evicted at once
    cache.put("d2", _emb(2))
    assert _snapshot(victim) == before
    assert cache.get("d9") == (None, None)


# -- entries -------------------------------------------------------------------------------------
def test_a_fifo_entry_is_dropped_without_hanging(tmp_path):
    cache = EmbeddingCache(SHAPE, VISION_ID, memory_items=0, disk_dir=tmp_path)
    cache.put("d1", _emb(1))
    path = cache._path("d1")
    path.unlink()
    os.mkfifo(path)  # nobody ever writes to it: a blocking open or read would wait forever
    got = []
    reader = threading.Thread(target=lambda: got.append(cache.get("d1")), daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "get() hung on a FIFO"
    assert got == [(None, None)] and not os.path.lexists(path), "treated as damaged and dropped"
    cache.put("d1", _emb(1))
    assert cache.get("d1")[1] == "disk", "recomputed and cached again"


def test_a_symlinked_entry_is_not_followed(tmp_path):
    victim, before = _victim(tmp_path)
    cache = EmbeddingCache(SHAPE, VISION_ID, memory_items=0, disk_dir=tmp_path / "cache")
    cache._path("d1").symlink_to(victim / "study_0001.npy")  # right shape: a followed link would be a hit
    assert cache.get("d1")[1] is None
    assert not os.path.lexists(cache._path("d1")), "the link itself is dropped"
    assert _snapshot(victim) == before


def test_an_unreadable_entry_costs_speed_not_the_answer(tmp_path, monkeypatch):
    cache = EmbeddingCache(SHAPE, VISION_ID, memory_items=0, disk_dir=tmp_path)
    cache.put("d1", _emb(1))
    monkeypatch.setattr(ec.os, "open", _fail(errno.EACCES))
    assert cache.get("d1")[1] is None
    cache.put("d2", _emb(2))  # must not raise


def test_a_key_never_becomes_a_path(tmp_path):
    cache = EmbeddingCache(SHAPE, VISION_ID, memory_items=0, disk_dir=tmp_path / "cache")
    cache.put("../../escaped", _emb(3))
    assert not list(tmp_path.glob("escaped*")) and not list((tmp_path / "cache").glob("escaped*"))
    again = EmbeddingCache(SHAPE, VISION_ID, disk_dir=tmp_path / "cache")
    got, where = again.get("../../escaped")
    assert where == "disk" and np.array_equal(got, _emb(3))


def test_foreign_files_are_never_evicted_counted_or_cleaned(tmp_path):
    one = _emb(0).nbytes + 128  # .npy header
    cache = EmbeddingCache(SHAPE, VISION_ID, memory_items=0, disk_dir=tmp_path, disk_mb=1.5 * one / 2**20)
    foreign = {
        "study_0001.npy": None,  # a user's own array, the cache's shape
        "A" * 32 + ".npy": None,  # almost the cache's form, but upper case
        "0" * 31 + ".npy": None,  # one digit short
        "x.part": b"someone's partial download",
        "README": b"do not delete",
    }
    for name, data in foreign.items():
        path = cache.dir / name
        np.save(path, _emb(9)) if data is None else path.write_bytes(data)
        os.utime(path, (1000, 1000))  # the oldest files here: first in line if they were candidates
    before = _snapshot(cache.dir)[0]
    for i in range(3):
        cache.put(f"d{i}", _emb(i))
    EmbeddingCache(SHAPE, VISION_ID, disk_dir=tmp_path)  # removes stale .part files of its own
    after = _snapshot(cache.dir)[0]
    assert {n: after.get(n) for n in foreign} == {n: before[n] for n in foreign}
    assert cache.disk_usage() == (1, one), "only the cache's own entries count toward the limit"
    assert cache.get("d2")[1] == "disk"
