"""The errors of the SQL stages, and where they sit among the engine's::

    pipeline.ResourceError
        DatabaseError        a database refused an operation in a way a retry will not fix
    LookupError
        RowNotFoundError     lookup found no row for an item (missing = "fail")

Driver errors that a retry may fix become the engine's :class:`~pipeline.TransientError` (or
:class:`~pipeline.Overloaded` for "too many connections") instead; the one place that decides
is ``Database._driver_errors`` in :mod:`stages.db._database`.
"""

from __future__ import annotations

from pipeline import ResourceError

__all__ = ["DatabaseError", "RowNotFoundError"]


class DatabaseError(ResourceError):
    """A database operation failed in a way a retry will not fix.

    The message names the database, its redacted DSN, what was being done and the fix; the
    driver's exception is chained as ``__cause__``. A :class:`~pipeline.ResourceError`, so a
    database refused when the run opens it (a wrong password, an unknown database) fails the run
    with this message, not as an unexpected error with a traceback.

    Attributes:
        database: The ``[databases.<name>]`` name.
        dsn: The DSN with any password replaced by ``***``.
        action: What was being done, for example ``"looking up a row"``.
        code: The server's error code, when it gave one.
        row_data: The statement failed on one row's values (too long, out of range, not
            encodable), not on the SQL or the database: the other rows of a batch are fine.
    """

    # Public as stages.db.DatabaseError: dead letters and tracebacks name it so.
    __module__ = "stages.db"

    def __init__(
        self,
        message: str,
        *,
        database: str,
        dsn: str,
        action: str,
        code: int | None = None,
        row_data: bool = False,
    ):
        self.database = database
        self.dsn = dsn
        self.action = action
        self.code = code
        self.row_data = row_data
        super().__init__(message)


class RowNotFoundError(LookupError):
    """:func:`~stages.db.lookup` found no row for an item and its ``missing`` option is ``"fail"``."""

    __module__ = "stages.db"
