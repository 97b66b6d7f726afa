"""Which PostgreSQL errors the consumer retries (issue 11: restarts and failovers): the server saying it cannot
take work now is transient (the message is requeued), a statement that is wrong is not."""

from __future__ import annotations

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import asyncpg as dialect

from modcache import errors
from modcache_consumer import database


def _dbapi_error(error: Exception) -> sa.exc.DBAPIError:
    dbapi = dialect.AsyncAdapt_asyncpg_dbapi(asyncpg)
    try:
        dialect.AsyncAdapt_asyncpg_connection._handle_exception_no_connection(dbapi, error)
    except Exception as adapted:  # what SQLAlchemy's pool raises on a failed connect
        return sa.exc.DBAPIError.instance(None, None, adapted, dbapi.Error)  # type: ignore[return-value]
    raise AssertionError("not translated")


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.exceptions.ReadOnlySQLTransactionError("cannot execute UPDATE in a read-only transaction"),
        asyncpg.exceptions.ConnectionFailureError("connection failure"),
    ],
    ids=["starting-up", "admin-shutdown", "too-many", "demoted-primary", "connection-failure"],
)
def test_a_server_that_cannot_take_work_now_is_transient(error: Exception) -> None:
    assert isinstance(database._translate(_dbapi_error(error)), errors.SourceUnavailable)


def test_a_wrong_statement_is_not_transient() -> None:
    wrong = _dbapi_error(asyncpg.exceptions.UndefinedTableError('relation "nope" does not exist'))
    assert database._translate(wrong) is wrong
