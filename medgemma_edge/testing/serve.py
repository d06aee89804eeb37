"""`medgemma-edge serve` as a plain subprocess for tests and benchmarks: started with the CLI's own
entry, ready when /health says so, stopped by its pid (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from pathlib import Path

SERVE = "import sys; from medgemma_edge.cli import main; main(sys.argv[1:], prog_name='medgemma-edge')"


def stop_process(proc: subprocess.Popen, wait_s: float = 30.0) -> None:
    """Terminate `proc` and wait for it; kill it when it does not go in `wait_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServeProcess:
    """`with ServeProcess(["-m", BUNDLE, "--port", P, …], log) as srv:` — `srv.url`, `srv.proc`,
    `srv.load_s` (seconds until /health said ready). ca: the CA file that signed the server's
    certificate, when ARGS serve HTTPS (--ssl-certfile); `srv.verify` is then its SSL context."""

    def __init__(self, args: list[str], log: Path, port: int, ready_s: float = 600.0, ca: Path | None = None):
        self.args, self.log, self.ready_s = ["serve", *map(str, args)], Path(log), ready_s
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{port}"
        self.verify = ssl.create_default_context(cafile=str(ca)) if ca else True

    def start(self) -> "ServeProcess":
        import httpx

        t0 = time.perf_counter()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVE, *self.args], stdout=out,
                                         stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2, verify=self.verify).json().get("status") == "ready":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.perf_counter() - t0 > self.ready_s:
                raise RuntimeError(f"serve not ready in {self.ready_s:g} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        self.load_s = time.perf_counter() - t0
        return self

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
