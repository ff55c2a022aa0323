"""Compile time of the extension, from the Ninja log of the build pip ran.

`pip install .` builds in the tree (build/temp.*/cmake, see setup.py); its
wall time also counts installing torch and the other dependencies, so CI
prints the compile alone from this log: the wall time from the first job's
start to the last one's end, and the slowest objects. Meant for a clean build,
as in CI: after an incremental one the log still holds the older jobs.

    python scripts/build_times.py [BUILD_DIR] [--top N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def read_log(path: Path) -> dict[str, tuple[int, int]]:
    """Target -> (start ms, end ms) of its last build, from a .ninja_log."""
    jobs: dict[str, tuple[int, int]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        start, end, _mtime, target, *_ = line.split("\t")
        jobs[target] = (int(start), int(end))
    return jobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_dir", nargs="?", default="build", type=Path)
    parser.add_argument("--top", type=int, default=5, help="slowest objects to list")
    args = parser.parse_args()
    logs = sorted(args.build_dir.glob("**/.ninja_log"))
    if not logs:
        print(f"build_times: no .ninja_log under {args.build_dir}", file=sys.stderr)
        return 1
    for log in logs:
        jobs = read_log(log)
        if not jobs:
            continue
        wall = max(e for _, e in jobs.values()) - min(s for s, _ in jobs.values())
        print(f"compile: {wall / 1e3:.0f} s wall, {len(jobs)} jobs ({log})")
        slowest = sorted(jobs.items(), key=lambda kv: kv[1][1] - kv[1][0], reverse=True)[: args.top]
        for target, (s, e) in slowest:
            print(f"  {(e - s) / 1e3:6.1f} s  {target.removeprefix('CMakeFiles/')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
