"""``make test`` runs the SQLite pass, the PostgreSQL pass and the pgvector pass whatever the ones before did, and its
exit status and summary say which failed (issue 11, point 14). The passes are stand-in scripts: the real suite is not
rerun here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def run_passes(
    tmp_path: Path,
    *,
    sqlite_rc: int,
    postgres_rc: int,
    pgvector_rc: int = 0,
    postgres_starts: bool = True,
    pgvector_starts: bool = True,
) -> tuple[int, str, str]:
    """``make test-passes`` with a pytest stand-in that exits with the given status per pass and a PostgreSQL
    stand-in (its server chosen by PAPERTAG_PG_SERVER, as postgres.sh's is); returns make's exit status, its output
    and the stand-ins' log of what ran."""
    log = tmp_path / "log"
    fake_pytest = tmp_path / "pytest.sh"
    fake_pytest.write_text(
        f'echo "pytest ${{TEST_DATABASE_URL:-sqlite}}${{TEST_PGVECTOR:+ (pgvector $TEST_PGVECTOR)}}" "$@" >> {log}\n'
        f'case "${{TEST_DATABASE_URL:-}}" in\n'
        f"  '') exit {sqlite_rc} ;;\n"
        f"  *pgvector*) exit {pgvector_rc} ;;\n"
        f"  *) exit {postgres_rc} ;;\n"
        f"esac\n"
    )
    fake_postgres = tmp_path / "postgres.sh"
    fake_postgres.write_text(
        f'server=${{PAPERTAG_PG_SERVER:-debian}}\necho "postgres $server $1" >> {log}\n'
        f'if [ "$1" = start ] && [ "$server" = debian ]; then '
        f"{'echo postgresql://stand-in' if postgres_starts else 'exit 1'}; fi\n"
        f'if [ "$1" = start ] && [ "$server" = pgvector ]; then '
        f"{'echo postgresql://pgvector-stand-in' if pgvector_starts else 'exit 1'}; fi\n"
    )
    done = subprocess.run(
        ["make", "-s", "test-passes", f"PYTEST=sh {fake_pytest}", f"POSTGRES=sh {fake_postgres}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return done.returncode, done.stdout + done.stderr, log.read_text()


def test_a_failed_sqlite_pass_still_runs_the_postgresql_and_pgvector_passes(tmp_path: Path) -> None:
    rc, output, ran = run_passes(tmp_path, sqlite_rc=1, postgres_rc=0)
    assert ran.splitlines() == [
        "pytest sqlite",
        "postgres debian start",
        "pytest postgresql://stand-in -m not trainer",
        "postgres debian stop",
        "postgres pgvector start",
        "pytest postgresql://pgvector-stand-in (pgvector required) tests/test_similar_index.py tests/test_similar.py "
        "tests/test_storage.py tests/test_migrations.py",
        "postgres pgvector stop",
    ]
    assert rc != 0
    assert "SQLite pass FAILED (exit 1), PostgreSQL pass passed, pgvector pass passed" in output


def test_a_failed_postgresql_pass_fails_make_test(tmp_path: Path) -> None:
    rc, output, ran = run_passes(tmp_path, sqlite_rc=0, postgres_rc=2)
    assert "postgres debian stop" in ran.splitlines()  # the server is stopped after a failed pass too
    assert rc != 0
    assert "SQLite pass passed, PostgreSQL pass FAILED (exit 2), pgvector pass passed" in output


def test_a_failed_pgvector_pass_fails_make_test(tmp_path: Path) -> None:
    rc, output, ran = run_passes(tmp_path, sqlite_rc=0, postgres_rc=0, pgvector_rc=3)
    assert "postgres pgvector stop" in ran.splitlines()
    assert rc != 0
    assert "SQLite pass passed, PostgreSQL pass passed, pgvector pass FAILED (exit 3)" in output


def test_a_postgresql_server_that_does_not_start_fails_make_test(tmp_path: Path) -> None:
    rc, output, ran = run_passes(tmp_path, sqlite_rc=0, postgres_rc=0, postgres_starts=False)
    assert rc != 0
    assert "the PostgreSQL server did not start" in output
    assert "PostgreSQL pass FAILED" in output
    assert "postgres pgvector start" in ran.splitlines()  # the next pass still runs


def test_a_pgvector_server_that_does_not_start_fails_make_test(tmp_path: Path) -> None:
    rc, output, _ = run_passes(tmp_path, sqlite_rc=0, postgres_rc=0, pgvector_starts=False)
    assert rc != 0
    assert "the pgvector server did not start" in output
    assert "pgvector pass FAILED" in output


def test_every_pass_passing_is_success(tmp_path: Path) -> None:
    rc, output, _ = run_passes(tmp_path, sqlite_rc=0, postgres_rc=0)
    assert rc == 0, output
    assert "SQLite pass passed, PostgreSQL pass passed, pgvector pass passed" in output
