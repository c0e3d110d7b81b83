"""What the input hardening of issue 11 (points 5 and 9) costs, each against its baseline measured in the same run:

- CSV cells: ``csv_cells.csv_lines`` (every cell through ``safe_cell``) against a plain ``csv.writer`` on the same
  export-shaped rows (a third of the titles hostile);
- JSON bodies: the app's JSON provider (parse + ``check_json``) against ``json.loads`` on the largest predict body
  (64 abstracts of 20,000 characters) and on 2 MB bodies of many small values, and how long refusing a 2 MB body of
  ``[`` takes beside parsing the predict body.

No server, no model: pure functions, best of ``--rounds`` so a busy machine skews both sides alike.

    python bench/hostile_input.py [--rounds 5] [--rows 20000]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.timing import best  # noqa: E402
from webapp import create_app  # noqa: E402
from webapp.csv_cells import csv_lines  # noqa: E402


def plain_lines(rows: list[list[object]]) -> list[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    out = []
    for row in rows:
        writer.writerow(row)
        out.append(buffer.getvalue())
        buffer.seek(0)
        buffer.truncate()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()

    abstract = "We detect objects in aerial images with transformers. " * 20
    titles = ['=HYPERLINK("http://x")', "A plain title", "-0.5"]
    rows = [
        [n, "2026-01-01T00:00:00Z", "api", "", titles[n % 3], abstract, "Object Detection|Segmentation", ""]
        for n in range(args.rows)
    ]
    plain = best(args.rounds, lambda: plain_lines(rows))
    safe = best(args.rounds, lambda: list(csv_lines(rows)))
    print(f"CSV, {args.rows} rows: plain csv.writer {plain:.3f} s, csv_lines {safe:.3f} s, ratio {safe / plain:.2f}x")

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app({"DATA_DIR": tmp, "SECRET_KEY": "bench", "TESTING": True})
        body = json.dumps({"abstracts": [{"title": "t", "abstract": "x" * 20_000} for _ in range(64)]})
        deep = "[" * (2 * 1024 * 1024)
        with app.app_context():
            raw = best(args.rounds, lambda: json.loads(body))
            bounded = best(args.rounds, lambda: app.json.loads(body))

            def refuse() -> None:
                try:
                    app.json.loads(deep)
                except ValueError:
                    return
                raise AssertionError("a 2 MB body of [ was accepted")

            refused = best(args.rounds, refuse)
            shapes = {  # bodies up to MAX_CONTENT_LENGTH (2 MB) that are valid and storable, and one hostile shape
                "100,000 small objects": json.dumps({"x": [{"a": "bcdefg"} for _ in range(100_000)]}),
                "180,000 integers": json.dumps({"ids": list(range(10**6, 10**6 + 180_000))}),
                "one 2 MB string": json.dumps({"abstract": "a" * 2_000_000}),
                "a 1 MB key over 450,000 zeros": '{"' + "k" * 1_000_000 + '": [' + ",".join(["0"] * 450_000) + "]}",
            }
            walks = {
                name: (
                    best(args.rounds, lambda b=shape: json.loads(b)),
                    best(args.rounds, lambda b=shape: app.json.loads(b)),
                )
                for name, shape in shapes.items()
            }
    print(
        f"JSON, 64 x 20,000-character predict body ({len(body) / 1e6:.1f} MB): json.loads {raw * 1e3:.2f} ms, "
        f"app provider {bounded * 1e3:.2f} ms, ratio {bounded / raw:.2f}x"
    )
    print(f"JSON, 2 MB of '[' refused in {refused * 1e3:.2f} ms, {refused / raw:.2f}x the largest valid body's parse")
    for name, (plain_parse, checked) in walks.items():
        print(
            f"JSON, {name}: json.loads {plain_parse * 1e3:.1f} ms, app provider (parse + check_json) "
            f"{checked * 1e3:.1f} ms, ratio {checked / plain_parse:.1f}x"
        )


if __name__ == "__main__":
    main()
