"""The test suite, a package so that pytest and the tests import one `tests.conftest` (its per-test database
registry is then the one the autouse fixture drops)."""
