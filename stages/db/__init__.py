"""SQL stages: stream rows out of a database, look rows up per item, record results.

For MySQL/MariaDB (``mysql://``, through aiomysql) and SQLite (``sqlite:///``, through
aiosqlite). The public names live here; the modules behind them, bottom up (each imports only
those above it)::

    _errors     DatabaseError, RowNotFoundError
    _sql        ? placeholders for either dialect, identifier quoting, keyset-paged queries
    _dsn        DSN parsing, redact(), the PIPELINE_DB_<NAME>_PASSWORD variable
    _database   Database: the run's pool and limiter per database, the one driver-error boundary,
                shared_database(), execute_script()
    _read       the read_rows source
    _lookup     the lookup stage
    _results    the write_results stage and its job columns
    _ledger     mysql_ledger: the run ledger (the engine's layout) in a database's tables

A password never appears in a log line, an exception message or a ``repr``.
"""

from ._database import Database, execute_script, shared_database
from ._dsn import redact
from ._errors import DatabaseError, RowNotFoundError
from ._ledger import TableLedger, mysql_ledger
from ._lookup import MissingPolicy, lookup
from ._read import read_rows
from ._results import ResultColumn, write_results

__all__ = [
    "Database",
    "DatabaseError",
    "MissingPolicy",
    "ResultColumn",
    "RowNotFoundError",
    "TableLedger",
    "execute_script",
    "lookup",
    "mysql_ledger",
    "read_rows",
    "redact",
    "shared_database",
    "write_results",
]

# Show the public names as stages.db's (in reprs, engine messages, dead letters), not as the
# private module that happens to define them. ResultColumn keeps its own: pydantic resolves
# its annotations in its module.
for _obj in (
    Database,
    TableLedger,
    execute_script,
    lookup,
    mysql_ledger,
    read_rows,
    redact,
    shared_database,
    write_results,
):
    _obj.__module__ = __name__
del _obj
