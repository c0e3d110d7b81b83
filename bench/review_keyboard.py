"""Keyboard-first review (issue 12 point 3): run the browser tests that review 50 queue items by keyboard alone and
the same 50 by mouse on the page's buttons (tests/test_browser_keyboard.py, one run) and print the seconds per item
each recorded, from the first key or click of an item to the next item open with its first label focused (server,
page load and script; no human think time), and the keyboard's ratio to the mouse baseline.

    .venv/bin/python bench/review_keyboard.py [--out DIR]

Needs what the browser tests need (Debian's Chromium, the dev requirements)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/test_browser_keyboard.py::test_fifty_queue_items_by_keyboard_alone",
    "tests/test_browser_keyboard.py::test_the_same_fifty_items_by_mouse_as_the_baseline",
]


def summary(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"median {statistics.median(ordered):.3f}, mean {statistics.fmean(ordered):.3f}, p95 {p95:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help="keep the per-item seconds (review-keys.json, review-clicks.json) here"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        env = {**os.environ, "PAPERTAG_BENCH_OUT": str(out)}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
        if subprocess.run(command, cwd=REPO, env=env, check=False).returncode:
            print("the review tests failed; no figures", file=sys.stderr)
            return 1
        keys, clicks = (json.loads((out / f"review-{mode}.json").read_text()) for mode in ("keys", "clicks"))
    print(f"{keys['items']} queue items, the same script both ways (keys per item, cycling: {keys['script']})")
    print(f"keyboard: seconds per item {summary(keys['seconds_per_item'])}")
    print(f"mouse:    seconds per item {summary(clicks['seconds_per_item'])}")
    ratio = statistics.median(keys["seconds_per_item"]) / statistics.median(clicks["seconds_per_item"])
    print(f"keyboard / mouse (median): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
