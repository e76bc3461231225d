"""`make bench`: every benchmark, each comparing against its baseline in the same run; prints `NAME: R x BASELINE`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["retrieve.py", "read_series.py"]


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        start = time.perf_counter()
        print(f"# {name}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / name)], check=False)
        print(f"# {name}: {time.perf_counter() - start:.0f} s", flush=True)
        if proc.returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"results: {HERE / 'results'}/*.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
