"""The self-check (runtime/selfcheck.py): `verify --run` passes on a good bundle and names the damage
on one whose mmproj was swapped for another model's and on one whose text weights were perturbed —
both with their manifest's sha256 made to match, so the checksums pass and only the probe can tell;
a bundle without a probe (imported, opened directly, exported before probes) records at its first
run and compares afterwards; `serve` refuses a damaged bundle (exit 2, one error line) unless
--no-self-check. Every check prints its measured numbers.

Damaged bundles are built once, in temporary folders, from tiny_bundle_f32: hard links for the files kept, copies
of what changes (the mmproj, the text GGUF, the manifest).
"""

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import medgemma_edge
from medgemma_edge.cli import main
from medgemma_edge.runtime import selfcheck
from medgemma_edge.runtime.errors import BundleError
from medgemma_edge.runtime.manifest import file_entry, read_manifest, write_manifest

PERTURBED = "blk.0.ffn_down.weight"  # given noise of half its own spread


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """First-run records and hashed-file stamps in a cache folder of this module's own (each bundle
    here has its own manifest, so its own record)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDGEMMA_EDGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _copy(bundle, dst, *, changed=()):
    """A copy of `bundle` in `dst`: hard links, except copies of `changed` files and the manifest."""
    dst.mkdir()
    for f in bundle.iterdir():
        if f.is_file():
            (shutil.copy2 if f.name in (*changed, "manifest.json") else os.link)(f, dst / f.name)
    return dst


def _rehash(bundle, name):
    """Make the manifest's size and sha256 of file `name` match it again (what checksums see)."""
    manifest = read_manifest(bundle)
    for i, f in enumerate(manifest["files"]):
        if f["path"] == name:
            manifest["files"][i] = {**f, **file_entry(bundle, f["role"], name)}
    write_manifest(bundle, manifest)


def _files(bundle, role):
    return [f["path"] for f in read_manifest(bundle)["files"] if f["role"] == role]


def _verify(*args):
    res = CliRunner().invoke(main, ["verify", *map(str, args)])
    print(res.output)
    return res


@pytest.fixture(scope="module")
def other_mmproj(tmp_path_factory, tiny_dir):
    """An mmproj of another model of the same shape: tiny's vision and projector weights shuffled
    (same statistics, other places), written by the exporter as the f32 mmproj."""
    from safetensors.numpy import load_file, save_file

    from medgemma_edge.export.bundle import ExportPlan

    src = tmp_path_factory.mktemp("other-ckpt")
    for f in tiny_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            os.symlink(f, src / f.name)
    weights = load_file(str(tiny_dir / "model.safetensors"))
    rng = np.random.default_rng(99)
    for name, w in weights.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            weights[name] = rng.permutation(w.ravel()).reshape(w.shape)
    save_file(weights, str(src / "model.safetensors"))
    return ExportPlan.read(src).write_vision(tmp_path_factory.mktemp("other") / "other-mmproj-f32.gguf", "f32")


@pytest.fixture(scope="module")
def swapped(tiny_bundle_f32, other_mmproj, tmp_path_factory):
    """tiny_bundle_f32 with its mmproj replaced by `other_mmproj`, the manifest rehashed."""
    dst = tmp_path_factory.mktemp("swapped") / "bundle"
    name = _files(tiny_bundle_f32, "vision")[0]
    bundle = _copy(tiny_bundle_f32, dst, changed=(name,))
    shutil.copy(other_mmproj, bundle / name)
    _rehash(bundle, name)
    return bundle


@pytest.fixture(scope="module")
def perturbed(tiny_bundle_f32, tmp_path_factory):
    """tiny_bundle_f32 with noise on one f32 text weight matrix, the manifest rehashed."""
    import gguf

    dst = tmp_path_factory.mktemp("perturbed") / "bundle"
    name = _files(tiny_bundle_f32, "text")[0]
    bundle = _copy(tiny_bundle_f32, dst, changed=(name,))
    tensor = next(t for t in gguf.GGUFReader(bundle / name).tensors if t.name == PERTURBED)
    w = np.array(tensor.data, dtype=np.float32)  # an f32 bundle: the tensor's bytes are its values
    w += np.random.default_rng(5).standard_normal(w.shape).astype(np.float32) * 0.5 * w.std()
    with open(bundle / name, "r+b") as f:
        f.seek(tensor.data_offset)
        f.write(w.astype("<f4").tobytes())
    _rehash(bundle, name)
    return bundle


def test_a_good_bundle_passes(tiny_bundle_f32):
    manifest = read_manifest(tiny_bundle_f32)
    assert manifest["selfcheck"]["path"] == selfcheck.PROBE_FILE  # pinned by sha256 like the files
    res = _verify("--run", tiny_bundle_f32)
    assert res.exit_code == 0, res.output
    checks = [ln.split(":")[1].split(maxsplit=1) for ln in res.output.splitlines() if ln.startswith("self-check: ")]
    assert checks[:-1] == [["ok", "image embedding"], ["ok", "next token, text prompt"],
                           ["ok", "next token, picture prompt"]] and checks[-1][0] == "passed"


def test_the_manifest_pins_the_probe_inside_the_bundle(tiny_bundle_f32, tmp_path):
    bundle = _copy(tiny_bundle_f32, tmp_path / "b", changed=(selfcheck.PROBE_FILE,))
    manifest = read_manifest(bundle)
    for path in ("../selfcheck.json", "/etc/selfcheck.json", "sub/selfcheck.json", ""):
        (bundle / "manifest.json").write_text(json.dumps({**manifest, "selfcheck": {**manifest["selfcheck"],
                                                                                  "path": path}}))
        with pytest.raises(BundleError, match="selfcheck"):
            read_manifest(bundle)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with open(bundle / selfcheck.PROBE_FILE, "r+b") as f:  # the probe is hashed like the model files
        f.seek(40)
        f.write(b"#")
    res = _verify(bundle)
    assert res.exit_code == 2 and f"bundle file {selfcheck.PROBE_FILE} does not match its sha256" in res.output


def test_a_text_only_bundle_checks_its_text(gemma270m_bundle_f32):
    res = _verify("--run", gemma270m_bundle_f32)
    assert res.exit_code == 0 and "ok   next token, text prompt" in res.output, res.output
    assert "image embedding" not in res.output


def test_a_swapped_vision_file_is_named(swapped):
    assert _verify(swapped).exit_code == 0  # the checksums cannot tell
    res = _verify("--run", swapped)
    error = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2 and error.startswith("error: the image embedding does not match the export's"), error
    assert _files(swapped, "vision")[0] in error and "not the one exported with this text model" in error
    assert "ok   next token, text prompt" in res.output  # the text model is untouched
    cosine = float(error.split("cosine ")[1].split()[0])
    print(f"swapped mmproj: cosine {cosine}")
    assert cosine < 0.5


def test_perturbed_text_weights_are_named(perturbed):
    assert _verify(perturbed).exit_code == 0
    res = _verify("--run", perturbed)
    error = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2 and error.startswith("error: next-token logits of the text prompt differ"), error
    assert "the text weights changed" in error
    assert "ok   image embedding" in res.output  # the vision file is untouched
    delta = float(error.split("max |Δ log-prob| ")[1].split()[0])
    tol = selfcheck.TEXT_TOLERANCE["f32"][0]
    print(f"{PERTURBED} + noise: max |Δ log-prob| {delta:.3f} nats, tolerance {tol}")
    assert delta > 2 * tol


@pytest.mark.parametrize("kind", ["opened gguf", "bundle without probe"])
def test_without_a_probe_the_first_run_records_and_later_runs_compare(tiny_bundle_f32, tmp_path, kind):
    if kind == "opened gguf":
        folder = tiny_bundle_f32
        text, vision = (folder / _files(folder, r)[0] for r in ("text", "vision"))
        model = medgemma_edge.load(text, mmproj=vision, device="cpu", threads=2)
    else:  # as exported before probes: no "selfcheck" in the manifest, no selfcheck.json
        folder = _copy(tiny_bundle_f32, tmp_path / "old")
        (folder / selfcheck.PROBE_FILE).unlink()
        manifest = read_manifest(folder)
        del manifest["selfcheck"]
        write_manifest(folder, manifest)
        model = medgemma_edge.load(folder, device="cpu", threads=2)
    before = sorted(os.listdir(folder))
    first = selfcheck.run(model)
    print("\n".join(first.lines()))
    assert first.ok and first.checks == [] and len(first.recorded) == 2
    assert selfcheck.summary(first).startswith("recorded")
    # the bundle folder may be read-only or the user's: the record goes to the cache folder
    assert sorted(os.listdir(folder)) == before
    second = selfcheck.run(model)  # a later run: the same load serves, the record is on disk
    print("\n".join(second.lines()))
    assert second.ok and len(second.checks) == 3 and second.recorded == []
    # what the record catches: anything that changes here afterwards (a library upgrade, other kernels)
    path = selfcheck.record_path(model)
    record = json.loads(path.read_text())
    entry = next(iter(record["vision"].values()))
    entry["fingerprint"] = selfcheck._encode_floats(-selfcheck._decode_floats(entry["fingerprint"]))
    path.write_text(json.dumps(record))
    with pytest.raises(BundleError, match="does not match the record of this bundle's first run"):
        selfcheck.check_or_raise(model)


def test_a_failed_first_run_records_nothing(tiny_bundle_f32, monkeypatch):
    text = tiny_bundle_f32 / _files(tiny_bundle_f32, "text")[0]
    model = medgemma_edge.load(text, device="cpu", threads=2)
    monkeypatch.setattr(model.engine, "logits", lambda: np.full(model.engine.n_vocab, np.nan, np.float32))
    result = selfcheck.run(model)
    print("\n".join(result.lines()))
    assert not result.ok and "NaN" in result.failure and result.recorded == []
    assert not selfcheck.record_path(model).exists()


def test_serve_refuses_a_damaged_bundle_unless_told_not_to_check(perturbed, monkeypatch, capsys):
    from tests.test_serve_cli import Served

    served = Served(monkeypatch, ["-m", str(perturbed), "--threads", "2"])
    served.thread.join(120)
    err = capsys.readouterr().err
    print(err)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert served.code == 2 and len(errors) == 1 and "the text weights changed" in errors[0]
    served = Served(monkeypatch, ["-m", str(perturbed), "--threads", "2", "--no-self-check"])
    try:
        for _ in range(1200):
            if (status := served.health()["status"]) != "loading":
                break
            served.thread.join(0.05)
        assert status == "ready"
    finally:
        served.stop()
    assert "self-check" not in capsys.readouterr().err
