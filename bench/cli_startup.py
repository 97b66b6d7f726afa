"""How long the command line takes before it does anything: ``modcache --help`` and ``modcache sync --help``.

Each command runs as a fresh process through the installed console script, alternating with the naive way in the
same run: importing every command module up front (what ``modcache.cli.main`` did before commands were loaded
lazily), which pulls in kopf, kubernetes-asyncio, SQLAlchemy, redis-py and aio-pika for any command at all.

    ./dev bench cli_startup [--runs 20]

Target: ``modcache --help`` <= 0.3 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = str(Path(sys.executable).with_name("modcache"))
EAGER = (
    "import modcache.cli.core, modcache_operator.cli, modcache_consumer.cli\nfrom modcache.cli.main import main\nmain()"
)
CASES = {
    "modcache --help": [SCRIPT, "--help"],
    "modcache sync --help": [SCRIPT, "sync", "--help"],
    "naive: every command module imported, then --help": [sys.executable, "-c", EAGER, "--help"],
}


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench cli_startup")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(sys.argv[1:])
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.runs} runs each")
    for argv in CASES.values():
        timed(argv)  # warm the page cache and the bytecode of both paths
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.runs):  # interleaved, so load changes hit every case alike
        for name, argv in CASES.items():
            samples[name].append(timed(argv))
    for name, times in samples.items():
        ordered = sorted(times)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        print(f"{name:<52} median {statistics.median(times) * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms")
