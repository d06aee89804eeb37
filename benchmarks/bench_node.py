"""The DICOM node (issue 22): receive throughput against Orthanc, and the first question about a
study that arrived while the node was idle, by the node's own flow.

    python -m benchmarks.bench_node              # 4B shape: the cached q4_k_m bundle (benchmarks/bundles.py);
                                                 # writes benchmarks/results/node.json and NODE.md
    python -m benchmarks.bench_node --quick      # tiny test model: checks the harness (results in the cache)
    python -m benchmarks.bench_node --dry-run    # the 4B run's setup: one receive round, serve loads, no question
    python -m benchmarks.bench_node --from benchmarks/results/node.json   # re-render NODE.md, no rerun

Receive: the same instances (a CT series and an X-ray, with fresh UIDs every round so that no store
skips a duplicate) sent by the same dcmtk storescu, one association a send, alternately to the
node's listener (node.scp.DicomListener + node.spool.Spool in a process of their own: fsync before
each acknowledgement) and to Orthanc (medgemma_edge/testing/pacs.py, its default storage); the order flips every
round. MB/s per round, the per-round ratio node / Orthanc, its median and IQR (benchmarks.alternate).
Goal: ≥ 0.5×.

First question: `medgemma-edge serve -m BUNDLE --dicom-port …` in a subprocess. Once it is ready
and idle, storescu sends an X-ray study; the node waits --stable-s, prepares it in the background
(timed: from the send's end to `preparing` and to `ready` in GET /v1/studies), then one streamed
question names `medgemma-edge:study/UID`; TTFT is timed at the client (request sent → first
content). Then the same for a 24-slice CT. Goals: X-ray ≤ 3 s, CT ≤ 10 s.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.alternate import MIN_ROUNDS, paired, summary
from benchmarks.backends import say
from benchmarks.node_report import CT_SLICES, write
from benchmarks.tables import num
from medgemma_edge.runtime.cache import cache_root
from medgemma_edge.testing.serve import ServeProcess

RESULTS = Path(__file__).parent / "results"
BUNDLE_4B = ("bench", "bundles", "medgemma-4b-shaped-q4_k_m-default")  # benchmarks/bundles.py's name for it
QUICK_CT_SLICES = 4  # --quick checks the harness only
QUESTION = "Describe the findings."
AE = "MGE"
NODE_FLAGS = ("--dicom-port", "--spool", "--stable-s")  # what `serve` needs for this benchmark


# -- inputs ----------------------------------------------------------------------------------------
def node_inputs(quick: bool) -> dict[str, list[Path]]:
    """{"xray": [one DX file], "ct": [CT_SLICES slices]} written once into the cache (quick: fewer,
    smaller CT slices); benchmarks/inputs.py's generators, in a folder of their own."""
    from benchmarks.inputs import synthetic_xray, write_ct_series, write_dx

    folder = cache_root() / "bench" / ("node-inputs-quick" if quick else "node-inputs")
    xray, ct = folder / "xray16.dcm", folder / "ct"
    if not xray.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_dx(xray, synthetic_xray(12))
    slices = QUICK_CT_SLICES if quick else CT_SLICES
    if len(list(ct.glob("*.dcm"))) != slices:
        for old in ct.glob("*.dcm"):
            old.unlink()  # one series per folder
        write_ct_series(ct, slices, size=128 if quick else 512)
    return {"xray": [xray], "ct": sorted(ct.glob("*.dcm"))}


def fresh_copy(files: list[Path], folder: Path) -> tuple[list[Path], str]:
    """The files again with new study, series and SOP instance UIDs (one new UID per old one), so a
    store sees new instances; (paths, the study UID of the first)."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    new: dict[str, str] = {}
    out = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            old = getattr(ds, keyword)
            setattr(ds, keyword, new.setdefault(old, generate_uid()))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(folder / f"{i:04d}.dcm")
        ds.save_as(out[-1])
    return out, pydicom.dcmread(out[0], stop_before_pixels=True).StudyInstanceUID


# -- receive: the node's listener and spool against Orthanc -------------------------------------------
def listener_main(spool_dir: str) -> None:
    """`--listener DIR`: the node's DIMSE listener and spool alone; prints the port, runs until stdin closes."""
    from medgemma_edge.node.config import NodeConfig
    from medgemma_edge.node.scp import DicomListener
    from medgemma_edge.node.spool import Spool

    config = NodeConfig(port=0, ae_title=AE, spool=Path(spool_dir)).check()
    listener = DicomListener(config, Spool(config.spool_dir, config.spool_bytes), lambda inst: None).start()
    print(listener.port, flush=True)
    try:
        sys.stdin.read()
    finally:
        listener.stop()


class Listener:
    """`python -m benchmarks.bench_node --listener DIR` as a context: `.port`."""

    def __init__(self, spool: Path):
        self.spool = spool

    def __enter__(self) -> "Listener":
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_node", "--listener", str(self.spool)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__()
            raise RuntimeError(f"the node's listener did not start (exit code {self.proc.poll()})")
        self.port = int(line)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def count(self) -> int:
        return sum(1 for _ in (self.spool / "instances").glob("*/*.dcm"))


def receive(files: list[Path], rounds: int, tmp: Path) -> dict:
    """MB/s of the node and of Orthanc over `rounds` alternating rounds (after one warm-up round
    each), and their paired per-round ratios node / Orthanc."""
    from medgemma_edge.testing.pacs import Orthanc, storescu

    size = sum(p.stat().st_size for p in files)
    rates: dict[str, list] = {"node": [], "orthanc": []}
    counts = {"node": 0, "orthanc": 0}
    with Orthanc(tmp / "orthanc") as pacs, Listener(tmp / "spool") as node:
        targets = {"node": (node.port, AE), "orthanc": (pacs.port, pacs.aet)}
        for r in range(rounds + 1):  # round 0 warms both up (first association, imports, page cache)
            batch, _ = fresh_copy(files, tmp / f"round-{r}")
            for name in (["node", "orthanc"] if r % 2 else ["orthanc", "node"]):
                port, aec = targets[name]
                t0 = time.perf_counter()
                storescu(batch, port, aec)
                seconds = time.perf_counter() - t0
                if r:
                    rates[name].append(size / 1e6 / seconds)
            counts = {"node": node.count(), "orthanc": pacs.get("/statistics")["CountInstances"]}
            say(f"  [receive] round {r}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f} MB/s" for k, v in rates.items() if v))
            for path in batch:
                path.unlink()
    expected = len(files) * (rounds + 1)
    return {"instances": len(files), "bytes": size, "rounds": rounds, "counts": counts, "expected": expected,
            "mb_s": {k: summary(v) for k, v in rates.items()}, "paired": paired(rates["node"], rates["orthanc"])}


# -- the first question, through `medgemma-edge serve --dicom-port` ------------------------------------
class Serve(ServeProcess):
    """The real server with its node, in a subprocess: `.url`, `.dicom_port`."""

    def __init__(self, bundle: Path, tmp: Path, stable_s: float, threads: int | None):
        from medgemma_edge.testing.pacs import free_port

        http_port, self.dicom_port = free_port(), free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        super().__init__(["-m", bundle, "--port", http_port, "--dicom-port", self.dicom_port, "--dicom-ae", AE,
                          "--spool", tmp / "node-spool", "--stable-s", f"{stable_s:g}",
                          *(["--threads", threads] if threads else [])], tmp / "serve.log", http_port)

    def study(self, uid: str) -> dict | None:
        import httpx

        response = httpx.get(f"{self.url}/v1/studies/{uid}", timeout=10)
        return response.json() if response.status_code == 200 else None


def arrive_and_prepare(srv: Serve, files: list[Path], tmp: Path, timeout_s: float) -> dict:
    """Send a fresh copy of `files` to the node; wait for `ready`. Seconds from the send's end to
    `preparing` and to `ready` (both include --stable-s), and the study UID."""
    from medgemma_edge.testing.pacs import storescu

    batch, uid = fresh_copy(files, tmp)
    t0 = time.perf_counter()
    storescu(batch, srv.dicom_port, AE)
    sent = time.perf_counter()
    preparing = None
    while True:
        entry = srv.study(uid) or {}
        state = entry.get("state")
        if state == "preparing" and preparing is None:
            preparing = time.perf_counter() - sent
        if state == "ready":
            return {"uid": uid, "send_s": sent - t0, "preparing_after_s": preparing,
                    "ready_after_s": time.perf_counter() - sent, "instances": entry.get("instances")}
        if state == "failed":
            raise RuntimeError(f"the node could not prepare the study: {entry.get('why')}")
        if time.perf_counter() - sent > timeout_s:
            raise RuntimeError(f"the study was not ready in {timeout_s:.0f} s (state {state})")
        time.sleep(0.05)


def ask_study(srv: Serve, uid: str, max_tokens: int) -> dict:
    """One streamed question about the node's study: TTFT at the client, the server's stats."""
    import httpx

    body = {"model": "medgemma", "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"medgemma-edge:study/{uid}"}},
                {"type": "text", "text": QUESTION}]}]}
    t0, ttft, stats = time.perf_counter(), None, None
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the question was refused: HTTP {response.status_code} {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
            if ttft is None and delta.get("content"):
                ttft = time.perf_counter() - t0
            stats = ((chunk.get("medgemma_edge") or {}).get("stats")) or stats
    keep = ("ttft_s", "image_encode_s", "images", "images_from_cache", "prompt_tokens", "reused_tokens",
            "restored_tokens")
    return {"ttft_s": ttft, "server": {k: (stats or {}).get(k) for k in keep}}


def questions(bundle: Path, inputs: dict, args, tmp: Path) -> dict:
    """Per study kind: its arrival and background preparation, then the first question's TTFT."""
    out = {}
    with Serve(bundle, tmp, args.stable_s, args.threads) as srv:
        say(f"  [serve] ready in {srv.load_s:.1f} s")
        for kind in ("xray", "ct"):
            time.sleep(args.idle_s)  # the node idle when the study arrives
            arrived = arrive_and_prepare(srv, inputs[kind], tmp / kind, args.prepare_timeout)
            asked = ask_study(srv, arrived.pop("uid"), args.tokens)
            out[kind] = {**arrived, **asked}
            say(f"  [{kind}] ready {arrived['ready_after_s']:.1f} s after arrival; TTFT {num(asked['ttft_s'], 's')}")
        out["serve_ready_s"] = round(srv.load_s, 2)
    return out


# -- the run ------------------------------------------------------------------------------------------
def bundle_for(args) -> Path:
    if args.bundle:
        return args.bundle
    if args.quick:
        from benchmarks import bundles
        from medgemma_edge.testing.models import build_tiny

        return bundles.bundle(build_tiny(), "q4_k_m")
    return cache_root().joinpath(*BUNDLE_4B)


def check_setup(bundle: Path) -> None:
    """Everything the run needs, checked before anything is measured (one line each)."""
    from click.testing import CliRunner

    from medgemma_edge.cli import main as cli
    from medgemma_edge.runtime.engines import check_backend
    from medgemma_edge.runtime.manifest import verify_bundle
    from medgemma_edge.testing.pacs import need

    if not (bundle / "manifest.json").is_file():
        raise SystemExit(f"no bundle at {bundle}: build it with `python -m benchmarks.bundles` (or pass --bundle)")
    check_backend(bundle, verify_bundle(bundle, hashes=False))
    for program in ("storescu", "Orthanc"):
        need(program)
    helptext = CliRunner().invoke(cli, ["serve", "--help"]).output
    missing = [f for f in NODE_FLAGS if f not in helptext]
    if missing:
        raise SystemExit(f"`medgemma-edge serve` has no {', '.join(missing)} yet")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny test model (checks the harness)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the setup: one receive round, serve started with the bundle; no question")
    p.add_argument("--bundle", type=Path, help="bundle to serve (default: the 4B-shaped q4_k_m, or tiny with --quick)")
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS, help="alternating receive rounds")
    p.add_argument("--threads", type=int, default=None, help="serve --threads (default: the server's choice)")
    p.add_argument("--stable-s", type=float, default=2.0, help="serve --stable-s: quiet time before preparing")
    p.add_argument("--idle-s", type=float, default=2.0, help="idle time before each study arrives")
    p.add_argument("--tokens", type=int, default=8, help="tokens per answer (TTFT needs the first)")
    p.add_argument("--prepare-timeout", type=float, default=1800, help="seconds a study may take to be ready")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each part, wait up to S seconds for other processes to go quiet")
    p.add_argument("--out", type=Path, help="report folder (default: benchmarks/results, or the cache for --quick)")
    p.add_argument("--from", dest="source", type=Path, metavar="NODE_JSON", help="re-render a node.json, no rerun")
    p.add_argument("--listener", metavar="SPOOL", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    from benchmarks.run import machine, wait_for_quiet

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.listener:
        return listener_main(args.listener)
    if args.source:
        data = json.loads(args.source.read_text())
        print(write(args.out or args.source.parent, data))
        return data
    t_start, info = time.perf_counter(), machine()
    say(f"[node] {info['cpu']}, CPU flags {' '.join(info['simd']) or 'unknown'}, {info['physical_cores']} cores")
    bundle = bundle_for(args)
    check_setup(bundle)
    inputs = node_inputs(args.quick)
    say(f"[node] bundle {bundle.name}; {len(inputs['ct'])} CT slices + 1 X-ray")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.dry_run:  # the setup of a full run: receive once, start serve with the bundle, ask nothing
            rec = receive(inputs["ct"][:2] + inputs["xray"], 1, tmp / "receive")
            with Serve(bundle, tmp / "serve", args.stable_s, args.threads) as srv:
                say(f"[node] dry run: one receive round stored {rec['counts']}; `serve {shlex.join(srv.args[1:])}` "
                    f"ready in {srv.load_s:.1f} s")
            return None
        if args.wait_idle:
            wait_for_quiet(args.wait_idle)
        rounds = args.rounds if not args.quick else min(args.rounds, 3)
        say(f"[node] receive: {rounds} alternating rounds, node vs Orthanc ...")
        rec = receive(inputs["ct"] + inputs["xray"], rounds, tmp / "receive")
        if args.wait_idle:
            wait_for_quiet(args.wait_idle)
        say("[node] first questions through `medgemma-edge serve --dicom-port` ...")
        asked = questions(bundle, inputs, args, tmp / "serve")
    out_dir = args.out or (cache_root() / "bench" / "results-quick" if args.quick else RESULTS)
    data = {"title": "DICOM node", "command": shlex.join(["python", "-m", "benchmarks.bench_node", *argv]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": bundle.name,
            "bundle": str(bundle), "machine": info, "threads": args.threads, "stable_s": args.stable_s,
            "ct_slices": len(inputs["ct"]), "receive": rec, "questions": asked,
            "seconds": round(time.perf_counter() - t_start, 1)}
    print(write(out_dir, data))
    return data


if __name__ == "__main__":
    main()
