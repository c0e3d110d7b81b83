"""Keyboard-first review (issue 12 point 3): run the browser test that reviews 50 queue items by keyboard alone
(tests/test_browser_keyboard.py) and print the seconds per item it recorded: from the first key of an item to the
next item open with its first label focused (server, page load and script; no human think time).

    .venv/bin/python bench/review_keyboard.py [--out FILE]

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
TEST = "tests/test_browser_keyboard.py::test_fifty_queue_items_by_keyboard_alone"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the per-item seconds (JSON) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "review_keyboard.json"
        env = {**os.environ, "PAPERTAG_BENCH_OUT": str(out)}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST]
        if subprocess.run(command, cwd=REPO, env=env, check=False).returncode:
            print("the keyboard review test failed; no figures", file=sys.stderr)
            return 1
        result = json.loads(out.read_text())
    seconds = sorted(result["seconds_per_item"])
    p95 = seconds[min(len(seconds) - 1, round(0.95 * (len(seconds) - 1)))]
    print(f"{result['items']} queue items reviewed by keyboard alone (keys per item, cycling: {result['script']})")
    print(
        f"seconds per item: median {statistics.median(seconds):.3f}, mean {statistics.fmean(seconds):.3f}, "
        f"p95 {p95:.3f}, total {sum(seconds):.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
