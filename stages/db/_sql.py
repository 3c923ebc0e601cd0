"""SQL text: ``?`` placeholders for either dialect, identifier quoting, keyset-paged queries.

SQL given to this package uses ``?`` placeholders for MySQL and SQLite alike;
:func:`_translate_sql` turns them into ``%s`` for MySQL, outside string literals and comments.
Identifiers (table and column names) are spliced into SQL text, so :func:`_quote` refuses
anything but a plain identifier, whoever calls it: the engine checks the options that name
them, and this is the last line for a name that comes from anywhere else.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any, Literal

from pipeline import ConfigError

__all__: list[str] = []

Dialect = Literal["mysql", "sqlite"]
Params = Sequence[Any]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _check_identifier(value: str, what: str = "identifier") -> str:
    """Return ``value`` if it is a plain SQL identifier, else raise a ConfigError naming ``what``."""
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise ConfigError(
            f"{what} must be a plain SQL identifier (letters, digits and _, not starting with a "
            f"digit), got {value!r}"
        )
    return value


def _quote(dialect: Dialect, identifier: str) -> str:
    """Quote a plain identifier for ``dialect``; refuse anything else (no escaping is needed)."""
    _check_identifier(identifier)
    return f"`{identifier}`" if dialect == "mysql" else f'"{identifier}"'


@functools.lru_cache(maxsize=256)
def _translate_sql(sql: str, dialect: Dialect) -> tuple[str, int]:
    """Return ``sql`` ready for the driver, and how many ``?`` placeholders it has.

    For MySQL, ``?`` becomes ``%s`` and ``%`` becomes ``%%`` (pymysql applies ``%`` formatting
    to the whole statement), except that ``?`` inside string literals, quoted identifiers and
    comments is left alone.
    """
    mysql = dialect == "mysql"
    out: list[str] = []
    count = 0
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\" and mysql and c != "`":
                    j += 2
                elif sql[j] == c and j + 1 < n and sql[j + 1] == c:
                    j += 2  # a doubled quote stands for itself
                elif sql[j] == c:
                    break
                else:
                    j += 1
            end = min(j + 1, n)
        elif sql.startswith("--", i) or (mysql and c == "#"):
            end = sql.find("\n", i)
            end = n if end < 0 else end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
        else:
            if c == "?":
                count += 1
                out.append("%s" if mysql else "?")
            elif c == "%" and mysql:
                out.append("%%")
            else:
                out.append(c)
            i += 1
            continue
        chunk = sql[i:end]
        out.append(chunk.replace("%", "%%") if mysql else chunk)
        i = end
    return "".join(out), count


def _shard_condition(dialect: Dialect, key_column: str, index: int, count: int) -> str:
    """The SQL test that a row of the wrapped query (``q``) belongs to shard ``index`` of ``count``.

    ``CRC32(<key as text>) % count = index``: for an integer key (or NULL), the text is
    :func:`pipeline.encode_key`'s, so this is exactly :meth:`pipeline.Shard.owns`. MySQL and
    MariaDB have ``CRC32``; the SQLite connections of this package register a ``crc32`` function
    that computes the same (:func:`zlib.crc32` of the UTF-8 text). No index serves it.
    """
    if type(index) is not int or type(count) is not int or not 0 <= index < count:
        raise ConfigError(f"shard {index!r}/{count!r} is not a shard; shards are K/N with 0 <= K < N")
    text = "CHAR" if dialect == "mysql" else "TEXT"
    # A NULL key encodes as "null": the shard that owns that text gets the row, and fails it.
    return f"CRC32(COALESCE(CAST(q.{_quote(dialect, key_column)} AS {text}), 'null')) % {count} = {index}"


def _keyset_queries(
    dialect: Dialect,
    query: str,
    key_column: str,
    watermark_column: str | None = None,
    condition: str | None = None,
) -> tuple[str, str]:
    """Return the first-chunk and next-chunk statements (``?`` placeholders) for ``query``.

    Without ``watermark_column`` their parameters are ``(limit)`` and ``(last key, limit)``; with
    it, ``(since, limit)`` and ``(since, last key, limit)``. ``condition`` (SQL text without
    placeholders, such as :func:`_shard_condition`'s) is a further test on the rows of ``q``.

    Raises:
        ConfigError: ``key_column`` or ``watermark_column`` is not a plain identifier.
    """
    inner, tests = _wrapped(dialect, query, watermark_column, condition)
    key = f"q.{_quote(dialect, key_column)}"
    first = f"{inner}{_where(tests)} ORDER BY {key} LIMIT ?"
    following = f"{inner}{_where([*tests, f'{key} > ?'])} ORDER BY {key} LIMIT ?"
    return first, following


def _same_key_query(
    dialect: Dialect,
    query: str,
    key_column: str,
    watermark_column: str | None = None,
    condition: str | None = None,
) -> str:
    """Return the statement for every row of ``query`` whose key equals a given one.

    Its parameters are ``(key)``, or ``(since, key)`` with ``watermark_column``.
    """
    inner, tests = _wrapped(dialect, query, watermark_column, condition)
    return f"{inner}{_where([*tests, f'q.{_quote(dialect, key_column)} = ?'])}"


def _wrapped(
    dialect: Dialect, query: str, watermark_column: str | None, condition: str | None
) -> tuple[str, list[str]]:
    body = query.strip().rstrip(";").rstrip()
    # The newlines keep a trailing `-- comment` in the user's query from eating the wrapper.
    inner = f"SELECT * FROM (\n{body}\n) AS q"
    tests = [] if watermark_column is None else [f"q.{_quote(dialect, watermark_column)} > ?"]
    if condition is not None:
        tests.append(condition)
    return inner, tests


def _where(tests: Sequence[str]) -> str:
    return f" WHERE {' AND '.join(tests)}" if tests else ""
