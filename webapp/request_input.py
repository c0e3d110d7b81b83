"""What every request may send, checked once for all routes, each refusal a 400 naming the problem (never a 500):

- JSON bodies that cannot be stored and answered again (:func:`webapp.json_values.check_json`);
- a NUL character in the URL, the query string, a form field or a file name (PostgreSQL refuses NUL in any text);
- ids in URLs past the database's integer (a larger one is no page, a 404, not an overflow);

and whole numbers read from query strings and forms."""

from __future__ import annotations

from typing import Any

from flask import Flask, Request, abort, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.datastructures import ImmutableMultiDict, MultiDict
from werkzeug.exceptions import BadRequest
from werkzeug.routing import IntegerConverter

from .json_values import UnstorableJSON, check_json

ID_MAX = 2**31 - 1  # PostgreSQL's integer, the type of every id column
PAGE_MAX = 10**9 - 1


class BoundedJSONProvider(DefaultJSONProvider):
    """Every request body parsed as JSON: what cannot be stored and answered again (too deep a nesting, a NUL
    character, an unpaired surrogate, NaN, a number past 64 bits) is a ValueError, so a 400 naming where it is, not
    Python's RecursionError or the database's refusal (a 500)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        limit = self._app.config["JSON_MAX_DEPTH"]
        try:
            value = super().loads(s, **kwargs)
        except RecursionError as exc:
            raise ValueError(f"it nests deeper than {limit} levels") from exc
        check_json(value, limit)
        return value


class CheckedRequest(Request):
    """A body is checked when a view first reads it (with that view's size limit): JSON that is not valid is a
    400 saying why, whoever calls ``get_json``, and so is a form field or file name holding a NUL character."""

    def on_json_loading_failed(self, e: ValueError | None) -> Any:
        if e is None:
            return super().on_json_loading_failed(e)
        if isinstance(e, UnstorableJSON):
            raise BadRequest(f"the body cannot be stored: {e}")
        raise BadRequest(f"the body is not valid JSON: {e}")

    def _load_form_data(self) -> None:
        super()._load_form_data()
        problem = _nul_in("the form's", self.form) or _nul_in("the name of the file in", self.files, names=True)
        if problem:  # nothing of it stays readable, should a caller catch the 400
            self.__dict__["form"], self.__dict__["files"] = ImmutableMultiDict(), ImmutableMultiDict()
            raise BadRequest(problem)


class IdConverter(IntegerConverter):
    """``<int:...>`` in every route: 0 to ``ID_MAX`` unless the route says otherwise."""

    def __init__(self, map, *args, **kwargs) -> None:  # noqa: A002, ANN001, ANN002, ANN003 - werkzeug's signature
        kwargs.setdefault("max", ID_MAX)
        super().__init__(map, *args, **kwargs)


def whole_number(raw: str, high: int = ID_MAX) -> int | None:
    """``raw`` as a number from 0 to ``high`` when it is written in ASCII digits, else None (``str.isdigit`` also
    passes "²", which ``int`` refuses)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw.lstrip("0")) > len(str(high)):
        return None
    value = int(raw)
    return value if value <= high else None


def page_number() -> int:
    """The ``page`` query parameter (1 when absent); a 400 naming it when it is not a page number."""
    raw = request.args.get("page", "1").strip()
    page = whole_number(raw, PAGE_MAX)
    if not page:
        abort(400, description=f"page must be a whole number from 1 up, not {raw[:20]!r}")
    return page


def _nul_in(place: str, fields: MultiDict, names: bool = False) -> str | None:
    """``<place> <field> holds a NUL character`` for the first field (every value of it, or its file's name) that
    does, or None."""
    for key, value in fields.items(multi=True):
        text = (value.filename or "") if names else value
        if "\x00" in key or "\x00" in text:
            return f"{place} {key[:40].replace(chr(0), '?')!r} holds a NUL character"
    return None


def _refuse_nul_in_url() -> None:
    if "\x00" in request.path:
        abort(400, description="the URL holds a NUL character")
    problem = _nul_in("the query string's", request.args)
    if problem:
        abort(400, description=problem)


def register(app: Flask) -> None:
    """Before any route is added (its ids take the bounded converter) and before the extensions' own checks."""
    app.json = BoundedJSONProvider(app)
    app.request_class = CheckedRequest
    app.url_map.converters["int"] = IdConverter
    app.before_request(_refuse_nul_in_url)
