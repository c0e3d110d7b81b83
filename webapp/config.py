"""Every setting with its default and why. Layers (later wins): these defaults -> ``DATA_DIR/config.py``
-> environment variables -> the ``test_config`` mapping given to :func:`webapp.create_app`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from limits import parse_many

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigurationError(RuntimeError):
    """The app cannot start with this configuration (e.g. production without SECRET_KEY); the message names the
    setting and what it must be."""


class Defaults:
    # Where the SQLite database, the generated development secret and the model cache live (a Render disk).
    DATA_DIR = str(REPO_ROOT / "instance")
    # "production" refuses to start without SECRET_KEY; anything else generates one into DATA_DIR.
    PAPERTAG_ENV = "development"
    # Signs sessions and CSRF tokens; must be equal in every worker, so never random per process.
    SECRET_KEY: str | None = None
    # PostgreSQL for several instances (postgres:// is normalised); empty means SQLite in DATA_DIR.
    DATABASE_URL = ""
    # Bundle directories imported on first start when their taxonomy has no version yet.
    DEFAULT_BUNDLES_DIR = str(REPO_ROOT / "models")
    # gunicorn worker count (gunicorn.conf.py reads it; checked here so a bad value fails with a clear message).
    WEB_CONCURRENCY = 2
    # onnxruntime intra-op threads per worker; 0 means one per core (idle ones sleep, so busy workers share them).
    ORT_THREADS = 0
    # How often each worker's watcher polls the database for a change of active model version (seconds).
    MODEL_POLL_SECONDS = 1.0
    # After a version failed to load, wait this long before trying it again (seconds).
    MODEL_RETRY_SECONDS = 60.0
    # Seconds SQLite waits for a lock before failing: several workers write predictions at once.
    SQLITE_BUSY_TIMEOUT = 15.0
    # Largest request body (bytes): 64 abstracts of 20,000 characters fit; bundle uploads have their own.
    MAX_CONTENT_LENGTH = 2 * 1024 * 1024
    # Deepest nesting of lists and objects a JSON body may have (a 400 beyond): every API body nests a few levels,
    # while 100,000 "[" made Python's parser raise RecursionError, and a deep value could not be answered again.
    JSON_MAX_DEPTH = 32
    # Largest bundle upload (bytes) through the API; the int8 distilroberta-sized model is ~83 MB.
    MAX_BUNDLE_UPLOAD_BYTES = 200 * 1024 * 1024
    # What an uploaded bundle may unpack to (its members' declared sizes, summed, checked before a byte is
    # extracted; decompression stops there too), so a gzip bomb or a sparse member costs no memory or disk.
    MAX_BUNDLE_UNPACKED_BYTES = 512 * 1024 * 1024
    # Largest bundle.json (bytes): the shipped ones weigh 56-180 KB; every version's manifest is stored and shown.
    MAX_MANIFEST_BYTES = 1024 * 1024
    # Abstract length limits (characters): shorter is not an abstract, longer is not one either.
    ABSTRACT_MIN_CHARS = 20
    ABSTRACT_MAX_CHARS = 20_000
    # Titles are one line; longer ones are probably a pasted abstract.
    TITLE_MAX_CHARS = 500
    # Most abstracts in one API call (PRODUCT contract).
    MAX_BATCH = 64
    # CSV batch jobs: most rows per file, largest upload (5,000 long abstracts fit), rows tagged per commit.
    BATCH_MAX_ROWS = 5000
    BATCH_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
    BATCH_CHUNK_SIZE = 32
    # Background jobs (CSV batches, replays) go through Huey's queue to worker processes (`flask jobs worker`). The
    # queue is Redis at this URL (Render Key Value's internal URL) when workers run on several machines; empty means
    # Huey's SQLite storage in DATA_DIR/job-queue.db: one machine, nothing more to install.
    REDIS_URL = ""
    # How often each worker process queues again the jobs no task is pending for: a killed worker's (once its
    # heartbeat is stale) and queued ones whose task was lost with the queue (seconds; it also does so at start).
    BATCH_POLL_SECONDS = 10.0
    # Niceness a job worker process adds to itself at start (0-19; 0 keeps the default priority): on a machine it
    # shares with the web processes, the pages take the CPU first and a batch gets what they leave.
    JOB_WORKER_NICE = 10
    # A running job (batch or replay) whose heartbeat is older than this is taken over: its process died (seconds).
    BATCH_STALE_SECONDS = 120.0
    # Stored abstracts a replay re-scores with a candidate and the active model, reviewed ones first: 200 take
    # 11-26 s with the default model (bench/replay_time.py), so a replay is a background job (webapp/jobs/engine.py).
    REPLAY_SAMPLE_SIZE = 200
    # Rows per history page.
    HISTORY_PER_PAGE = 25
    # Matches a filtered history, a search or the review queue counts exactly; past it the page says "10,000+"
    # (counting every match of a frequent label costs seconds at a million predictions: webapp/history/paging.py).
    LIST_COUNT_CAP = 10_000
    # A full-text search of the history alone ranks its newest this many matches by relevance: ranking reads every
    # match it ranks, and a query matching more than this wants more words (webapp/history/search.py).
    SEARCH_RANK_POOL = 1_000
    # Most predictions one bulk action (accept, add or remove a label) changes: all of them are one transaction,
    # and the confirmation page lists what changes.
    BULK_MAX = 5000
    # Distinct curators who must review (accept or correct) an item before it leaves the review queue; above 1,
    # /agreement measures how often they agree and adjudicators resolve where they do not.
    REVIEWS_NEEDED = 1
    # Most rows of one likely-label-errors file (flask labels import-issues): the trainer writes 500 by default,
    # each a paper that may be added as a prediction, all in one commit.
    LABEL_ISSUES_MAX_ROWS = 5000
    # Largest issue file POSTed to /api/v1/label-issues: 500 rows with every label's score are about 3.5 MB.
    LABEL_ISSUES_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
    # Greyed "just missed" labels shown under each taxonomy's predictions (explanations cover them too): at most
    # NEAR_MISSES of them, each with a probability of at least NEAR_MISS_SHARE of its own threshold. A share, not a
    # fixed margin, because thresholds differ by model and label (0.225 and 0.35 shipped, others learned from
    # reviews): with 0.5 and a 22.5% threshold, a label at 0.1% is no near miss, one at 15% is. 0: no floor.
    NEAR_MISSES = 4
    NEAR_MISS_SHARE = 0.5
    # Most units (title, sentences) an explanation occludes: past it the trailing sentences are grouped into
    # EXPLAIN_MAX_UNITS // 4 spans. One explanation is then at most 1 + 32 texts through the model whatever the
    # abstract's length (a 20,000-character one was 150 runs, 11.5 CPU-seconds); 32 keeps every sentence of a
    # typical abstract (5-12) and of what a 128-512-token encoder window reads.
    EXPLAIN_MAX_UNITS = 32
    # Similar past abstracts shown on a prediction's page, and the most the API returns (?k=).
    SIMILAR_K = 5
    SIMILAR_MAX_K = 50
    # Live quality: a label is flagged once this many reviewed predictions involve it (TP + FP + FN), fewer
    # say little, and its live F1 is more than QUALITY_DROP_MARGIN below its offline test F1.
    QUALITY_MIN_EVIDENCE = 10
    QUALITY_DROP_MARGIN = 0.15
    # Reviewed positives a label needs before its threshold is re-tuned from reviews; others keep the trained one.
    THRESHOLD_MIN_EVIDENCE = 8
    # Anonymous prediction rate limit per client address (flask-limiter syntax).
    PREDICT_RATE_LIMIT = "120 per minute"
    # API token callers are counted per token, apart from anonymous callers on the same address (a lab's
    # scripts behind one NAT would otherwise share, and exhaust, the anonymous bucket).
    TOKEN_PREDICT_RATE_LIMIT = "600 per minute"
    # Reverse proxies in front of the app whose X-Forwarded-For/-Proto are trusted (Render: 1). 0 trusts none,
    # so a client cannot pick its own rate-limit bucket by sending the header; more than there are lets it.
    TRUSTED_PROXY_HOPS = 0
    # Turn rate limiting off for load tests and benchmarks (never in production).
    RATELIMIT_ENABLED = True
    # Failed sign-ins allowed per (client address, user name), and per client address whatever the names.
    # Never per name alone: a stranger who knows "admin" must not be able to lock the admin out.
    LOGIN_RATE_LIMIT = "5 per minute"
    LOGIN_ADDRESS_RATE_LIMIT = "20 per minute"
    # Shortest password accepted wherever one is set (site and CLI); all-whitespace ones are refused too.
    PASSWORD_MIN_LENGTH = 12
    # Who may read stored predictions: "public" (anyone reads abstracts, labels and scores) or "signed-in"
    # (anonymous visitors get the predict form and their own results only). People's names, notes, training
    # runs and batches are never public; the rule table is in webapp/access/read_access.py.
    READ_ACCESS = "public"
    # Per-process counters are enough for one machine; set a redis:// URI for several instances.
    RATELIMIT_STORAGE_URI = "memory://"
    RATELIMIT_HEADERS_ENABLED = True
    # Cookies: not readable by scripts, not sent cross-site; Secure in production (HTTPS on Render).
    SESSION_COOKIE_HTTPONLY = True
    SESSION_COOKIE_SAMESITE = "Lax"
    SQLALCHEMY_TRACK_MODIFICATIONS = False
    # CSRF tokens live as long as the session, so a form left open for an afternoon still submits.
    WTF_CSRF_TIME_LIMIT = None


# Environment variables read on top of the defaults (and the instance config file).
ENV_KEYS = (
    "PAPERTAG_ENV",
    "SECRET_KEY",
    "DATABASE_URL",
    "REDIS_URL",
    "DEFAULT_BUNDLES_DIR",
    "WEB_CONCURRENCY",
    "ORT_THREADS",
    "MODEL_POLL_SECONDS",
    "MODEL_RETRY_SECONDS",
    "SQLITE_BUSY_TIMEOUT",
    "MAX_CONTENT_LENGTH",
    "MAX_BUNDLE_UPLOAD_BYTES",
    "MAX_BUNDLE_UNPACKED_BYTES",
    "MAX_MANIFEST_BYTES",
    "PREDICT_RATE_LIMIT",
    "TOKEN_PREDICT_RATE_LIMIT",
    "TRUSTED_PROXY_HOPS",
    "LOGIN_RATE_LIMIT",
    "LOGIN_ADDRESS_RATE_LIMIT",
    "PASSWORD_MIN_LENGTH",
    "READ_ACCESS",
    "RATELIMIT_STORAGE_URI",
    "RATELIMIT_ENABLED",
    "REPLAY_SAMPLE_SIZE",
    "EXPLAIN_MAX_UNITS",
    "SIMILAR_K",
    "SIMILAR_MAX_K",
    "QUALITY_MIN_EVIDENCE",
    "QUALITY_DROP_MARGIN",
    "THRESHOLD_MIN_EVIDENCE",
    "BULK_MAX",
    "REVIEWS_NEEDED",
    "LIST_COUNT_CAP",
    "SEARCH_RANK_POOL",
    "JOB_WORKER_NICE",
)


# Counts, sizes and limits: whole numbers of at least 1.
COUNTS = (
    "WEB_CONCURRENCY",
    "MAX_CONTENT_LENGTH",
    "JSON_MAX_DEPTH",
    "MAX_BUNDLE_UPLOAD_BYTES",
    "MAX_BUNDLE_UNPACKED_BYTES",
    "MAX_MANIFEST_BYTES",
    "ABSTRACT_MIN_CHARS",
    "ABSTRACT_MAX_CHARS",
    "TITLE_MAX_CHARS",
    "MAX_BATCH",
    "BATCH_MAX_ROWS",
    "BATCH_MAX_UPLOAD_BYTES",
    "BATCH_CHUNK_SIZE",
    "REPLAY_SAMPLE_SIZE",
    "HISTORY_PER_PAGE",
    "LIST_COUNT_CAP",
    "SEARCH_RANK_POOL",
    "BULK_MAX",
    "REVIEWS_NEEDED",
    "LABEL_ISSUES_MAX_ROWS",
    "LABEL_ISSUES_MAX_UPLOAD_BYTES",
    "EXPLAIN_MAX_UNITS",
    "SIMILAR_K",
    "SIMILAR_MAX_K",
    "QUALITY_MIN_EVIDENCE",
    "THRESHOLD_MIN_EVIDENCE",
)
# The numeric settings' bounds (least, most or None, whole numbers only), checked at start: a wrong value stops the
# app with its name, rather than failing requests later (a page size of 0, a pool that never fills, a nice of 40).
BOUNDS: dict[str, tuple[float, float | None, bool]] = {
    **{name: (1, None, True) for name in COUNTS},
    "ORT_THREADS": (0, None, True),
    "MODEL_POLL_SECONDS": (0.01, None, False),
    "MODEL_RETRY_SECONDS": (0, None, False),
    "SQLITE_BUSY_TIMEOUT": (0, None, False),
    "BATCH_POLL_SECONDS": (0.01, None, False),
    "JOB_WORKER_NICE": (0, 19, True),
    "BATCH_STALE_SECONDS": (0.01, None, False),
    "NEAR_MISSES": (0, None, True),
    "NEAR_MISS_SHARE": (0, 1, False),
    "QUALITY_DROP_MARGIN": (0, 1, False),
    "TRUSTED_PROXY_HOPS": (0, None, True),
    "PASSWORD_MIN_LENGTH": (8, None, True),
}
# Settings that take one of a few words.
CHOICES = {"READ_ACCESS": ("public", "signed-in")}
RATE_LIMITS = ("PREDICT_RATE_LIMIT", "TOKEN_PREDICT_RATE_LIMIT", "LOGIN_RATE_LIMIT", "LOGIN_ADDRESS_RATE_LIMIT")


def check(settings: Mapping[str, Any]) -> None:
    """Refuse settings the app cannot run with, naming the first one and what it must be."""
    for name, (least, most, whole) in BOUNDS.items():
        value = settings[name]
        kind = "a whole number" if whole else "a number"
        fits = isinstance(value, int if whole else int | float) and not isinstance(value, bool)
        if not fits or value < least or (most is not None and value > most):
            bounds = f"from {least} to {most}" if most is not None else f"of at least {least}"
            raise ConfigurationError(f"{name} must be {kind} {bounds}, not {value!r}")
    for name, choices in CHOICES.items():
        if settings[name] not in choices:
            raise ConfigurationError(f"{name} must be one of {', '.join(choices)}, not {settings[name]!r}")
    for low, high in (("ABSTRACT_MIN_CHARS", "ABSTRACT_MAX_CHARS"), ("SIMILAR_K", "SIMILAR_MAX_K")):
        if settings[low] > settings[high]:
            raise ConfigurationError(f"{low} ({settings[low]}) must not exceed {high} ({settings[high]})")
    for name in RATE_LIMITS:
        try:
            parse_many(settings[name])
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"{name} must be a rate limit such as '120 per minute', not {settings[name]!r}"
            ) from None


def _coerce(key: str, raw: str, like: Any) -> Any:
    """Parse an environment string into the type of the current value."""
    if isinstance(like, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    try:
        if isinstance(like, int):
            return int(raw)
        if isinstance(like, float):
            return float(raw)
    except ValueError:
        kind = "a whole number" if isinstance(like, int) else "a number"
        raise ConfigurationError(f"environment variable {key} must be {kind}, not {raw[:40]!r}") from None
    return raw


def from_environment(current: dict[str, Any], environ: os._Environ[str] | dict[str, str]) -> dict[str, Any]:
    """The settings that environment variables override, typed like their defaults."""
    found: dict[str, Any] = {}
    for key in ENV_KEYS:
        if key in environ and environ[key] != "":
            found[key] = _coerce(key, environ[key], current.get(key, ""))
    return found


def database_uri(url: str, data_dir: str | os.PathLike[str]) -> str:
    """SQLAlchemy URI: ``DATABASE_URL`` normalised to psycopg 3, else SQLite inside ``DATA_DIR``."""
    if not url:
        return f"sqlite:///{Path(data_dir).resolve() / 'papertag.db'}"
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url
