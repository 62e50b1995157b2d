"""What the serving benchmarks share: `python serve.py` started on a free localhost port, and a process's RSS."""
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(flags: list[str]) -> tuple[subprocess.Popen, int]:
    """(process, port) of `python serve.py FLAGS --port=P` once it announces its URL (it has warmed up and its
    socket listens); SystemExit with the end of its stderr if it does not start."""
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    err = tempfile.TemporaryFile(mode="w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "serve.py", *flags, f"--port={port}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        err.seek(0)
        raise SystemExit(f"serve.py did not start: {line!r} {err.read()[-2000:]}")
    print(f"  server ready in {time.perf_counter() - t0:.0f}s (warm-up included): {line.strip()}", flush=True)
    return proc, port


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
