"""What the read checks of issue 11 (points 8 and 12) cost a request: the revocable-session lookup plus the
read guard (webapp/access/read_access.py) against the same requests with the guard switched off, in one run.

Builds a tiny real bundle (tests/tiny_bundle.py), an app on SQLite in a temporary DATA_DIR with
READ_ACCESS=signed-in, signs a curator in, stores a prediction, then times GET /predictions/<id> and GET /history,
request by request guard on and guard off in turn (the session lookup runs in both), and prints the p50s and their
ratio.

    python bench/read_access.py [--rounds 10] [--requests 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import flask_migrate  # noqa: E402

from tests.tiny_bundle import build_bundle, build_tokenizer, fixture_abstracts  # noqa: E402
from webapp import create_app  # noqa: E402
from webapp.access.read_access import guard_reads  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.models import User  # noqa: E402
from webapp.serving.registry import import_bundle, live_models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=50, help="requests per URL per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = build_bundle(root / "bundle", build_tokenizer(root / "tokenizer.json"), seed=1)
        app = create_app(
            {
                "DATA_DIR": str(root / "data"),
                "SECRET_KEY": "bench-secret-long-enough-for-production",
                "WTF_CSRF_ENABLED": False,
                "RATELIMIT_ENABLED": False,
                "READ_ACCESS": "signed-in",
                "DEFAULT_BUNDLES_DIR": str(root / "none"),
                "ORT_THREADS": 1,
            }
        )
        with app.app_context():
            flask_migrate.upgrade()
            import_bundle(bundle, actor="bench")
            user = User(name="cora", role="curator")
            user.set_password("a bench password")
            db.session.add(user)
            db.session.commit()
        client = app.test_client()
        assert client.post("/login", data={"name": "cora", "password": "a bench password"}).status_code == 302
        abstract = fixture_abstracts()[0]
        predicted = client.post("/api/v1/predict", json={"title": abstract["title"], "abstract": abstract["abstract"]})
        urls = [f"/predictions/{predicted.get_json()['predictions'][0]['id']}", "/history"]
        hooks = app.before_request_funcs[None]
        hooks.remove(guard_reads)  # off between timed requests; each "on" request adds it back for itself
        times: dict[tuple[str, bool], list[float]] = {(url, on): [] for url in urls for on in (True, False)}
        for _ in range(args.rounds):
            for url in urls:
                for i in range(2 * args.requests):  # on and off in turn, so a change of load hits both alike
                    on = i % 2 == 0
                    if on:
                        hooks.append(guard_reads)
                    start = time.perf_counter()
                    response = client.get(url)
                    times[(url, on)].append(time.perf_counter() - start)
                    if on:
                        hooks.remove(guard_reads)
                    assert response.status_code == 200, (url, response.status_code)
        with app.app_context():
            live_models().stop()
        for url in urls:
            with_guard = statistics.median(times[(url, True)]) * 1000
            without = statistics.median(times[(url, False)]) * 1000
            print(f"{url:22} p50 guard on {with_guard:.2f} ms, off {without:.2f} ms, ratio {with_guard / without:.3f}")


if __name__ == "__main__":
    main()
