"""Compare a benchmark row's per-round metrics between two stores, timing keys left out.

    python experiments/compare_rows.py runs/a/rows.json runs/b/rows.json --row identity

Prints every (round, key) whose value differs, and exits 1 if any does: "behaviour did
not change" means this prints nothing for the same row run by two versions of the code
on the same machine (CPU kernels of another machine may round the last bits apart).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TIMING = {"seconds", "train_seconds", "client_seconds_per_batch", "server_seconds_per_batch"}


def differences(a: list[dict], b: list[dict]) -> list[tuple]:
    out = []
    if len(a) != len(b):
        out.append(("rounds", len(a), len(b)))
    for ra, rb in zip(a, b):
        for key in sorted((set(ra) | set(rb)) - TIMING):
            if ra.get(key) != rb.get(key):
                out.append((ra.get("round"), key, ra.get(key), rb.get(key)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--row", required=True)
    args = parser.parse_args(argv)
    rows = [json.loads(Path(p).read_text())[args.row]["rounds"] for p in (args.first, args.second)]
    diff = differences(*rows)
    keys = sorted(set(rows[0][0]) - TIMING)
    print(f"{args.row}: {len(rows[0])} rounds, keys compared: {', '.join(keys)}")
    for d in diff:
        print(d)
    print(f"{len(diff)} differences")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
