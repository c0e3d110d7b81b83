"""gunicorn settings for papertag (read by `gunicorn -c gunicorn.conf.py wsgi:app`).

gthread workers: the model runs in onnxruntime (which releases the GIL), so a few threads per process keep
the CPU busy while others wait on the database. No preload_app: each worker imports the app after the fork
and creates its own onnxruntime sessions (never share a live session across fork).
"""

import ctypes
import os

# Loopback by default (a laptop); Render sets HOST=0.0.0.0 and PORT.
bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
# Processes: WEB_CONCURRENCY (each worker's onnxruntime may use every core: ORT_THREADS, README "Configuration").
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
# Two threads: the model runs one request at a time per session anyway, and each thread may hold a request's
# transient memory (about 35 MiB for a 64-abstract batch or an explanation), so two bound what is in flight.
# bench/memory.py under 8 clients: worker peaks 262-310 MiB with 2 threads, 274-310 with 4 (noisy; measured with
# one onnxruntime thread per worker, the default before 2026-11-30).
threads = int(os.environ.get("GUNICORN_THREADS", "2"))
preload_app = False
# A 64-abstract batch on a busy 2-core machine takes a few seconds; 60 s leaves room without hiding hangs.
timeout = 60
graceful_timeout = 30
keepalive = 5
# No control socket: papertag is run by signals and its CLI, and the default path (~/.gunicorn/gunicorn.ctl) is
# one per user, so several instances on one machine (or the tests' servers) would take it from each other.
control_socket_disable = True
# Logs to stdout/stderr (Render and systemd collect them).
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (Linux, Render); None elsewhere (macOS, musl): the tuning below is glibc's."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()
if _LIBC is not None:
    # glibc gives each thread its own malloc arena, which multiplies a threaded worker's RSS; two per process keep
    # a worker near its single-threaded footprint. Set here, in the master, so forked workers inherit it.
    _LIBC.mallopt(-8, 2)  # -8 is M_ARENA_MAX


def post_request(worker, req, environ, resp):  # noqa: ANN001, ANN201, ARG001 - gunicorn's hook signature
    """Give the pages glibc keeps free after a request back to the system: without it a worker's RSS stays at the
    peak of its largest request (bench/memory.py: a 64-abstract batch, an explanation). Costs microseconds."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def post_worker_init(worker):  # noqa: ANN001, ANN201 - gunicorn's hook signature
    """Load the active models and start the model watcher as soon as the worker has the app (after fork),
    so the first request does not pay for the load."""
    live = worker.wsgi.extensions.get("papertag.live_models")
    if live is not None:
        live.ensure_started()
