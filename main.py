"""BookStore: a book catalogue, its stock and its orders, with FastAPI and SQLModel.

Run it with `uvicorn main:app` and open http://127.0.0.1:8000/docs.
README.md walks through this file from top to bottom.
"""

import asyncio
import hashlib
import logging
import os
import random
import re
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from functools import cache
from math import ceil
from typing import Annotated, Literal, TypeVar

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Path,
    Query,
    Response,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
    computed_field,
    field_validator,
)
from sqlalchemy import (
    DDL,
    BigInteger,
    CheckConstraint,
    DateTime,
    Engine,
    Numeric,
    Row,
    Select,
    String,
    bindparam,
    column,
    event,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator
from sqlmodel import (
    Field,
    Relationship,
    Session,
    SQLModel,
    col,
    create_engine,
    delete,
    func,
    select,
    update,
)
from starlette.routing import Match

# --- Settings -----------------------------------------------------------------

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite:///./bookstore.db")
SQL_ECHO = os.environ.get("SQL_ECHO", "").lower() in ("1", "true", "yes", "on")
ADMIN_TOKEN = os.environ.get("BOOKSTORE_ADMIN_TOKEN") or None
# Seconds a request may wait for the database in all (connecting, locks, statements).
DB_TIMEOUT = float(os.environ.get("DB_TIMEOUT", "10"))
# A transaction that meets a transient conflict runs again, this many times at most.
# A lock is waited for a third of DB_TIMEOUT, so that a second run still fits in it.
MAX_ATTEMPTS = 3
LOCK_TIMEOUT = DB_TIMEOUT / MAX_ATTEMPTS

MAX_ID = 2_147_483_647  # the largest key that every database's INTEGER holds
MAX_STOCK = 1_000_000_000
MAX_BODY_BYTES = 1024 * 1024
# Requests hold a worker thread only while they talk to the database (see
# in_transaction): a few threads are enough, and each keeps its own SQLite page cache.
WORKER_THREADS = 8

log = logging.getLogger("uvicorn.error")
T = TypeVar("T")


# --- The engine -----------------------------------------------------------------


def make_engine(url: str) -> Engine:
    """An engine for `url`, with every wait bounded by DB_TIMEOUT; on SQLite, set up
    so that several processes can share the file."""
    # As many pooled connections as threads that talk to the database (on SQLite,
    # sqlite_writer too): no thread waits for a connection, and none opens a
    # short-lived one of its own. No pre-ping: a connection found dead runs its
    # transaction again on a new one (see run_transaction).
    if url.startswith("postgresql"):
        statements, locks = round(DB_TIMEOUT * 1000), round(LOCK_TIMEOUT * 1000)
        timeouts = f"-c statement_timeout={statements} -c lock_timeout={locks}"
        connect_args = {
            "connect_timeout": max(2, ceil(DB_TIMEOUT)),
            "options": timeouts,
        }
    elif url.startswith(("mysql", "mariadb")):
        connect_args = {
            "connect_timeout": DB_TIMEOUT,
            "read_timeout": DB_TIMEOUT,  # also bounds a statement: a client-side timeout
            "write_timeout": DB_TIMEOUT,
            "init_command": f"SET innodb_lock_wait_timeout = {max(1, round(LOCK_TIMEOUT))}",
        }
    if not url.startswith("sqlite"):
        return create_engine(
            url,
            echo=SQL_ECHO,
            connect_args=connect_args,
            pool_size=WORKER_THREADS,
            max_overflow=0,
        )
    pool = {"pool_size": WORKER_THREADS + 1, "max_overflow": 0}
    if url == "sqlite://":  # in memory: the database lives in its one connection
        pool = {"poolclass": StaticPool}
    # isolation_level="IMMEDIATE" makes the driver open every write transaction
    # with BEGIN IMMEDIATE: the write lock is taken up front, where SQLite can
    # wait for it (timeout), instead of at the first write, where it answers "locked".
    connect_args = {
        "check_same_thread": False,
        "isolation_level": "IMMEDIATE",
        "timeout": LOCK_TIMEOUT,
    }
    engine = create_engine(url, echo=SQL_ECHO, connect_args=connect_args, **pool)

    @event.listens_for(engine, "connect")
    def set_sqlite_pragmas(dbapi_connection, _connection_record):
        # WAL: readers never wait for the writer, and NORMAL sync is safe with it.
        # foreign_keys: SQLite ignores REFERENCES unless asked.
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
            dbapi_connection.execute(f"PRAGMA {pragma}")

    return engine


engine = make_engine(DATABASE_URL)


class Money(TypeDecorator):
    """Exact money: NUMERIC(p, 2) where the database has it; integer cents on SQLite."""

    impl = Numeric
    cache_ok = True

    def __init__(self, precision: int):
        super().__init__(precision, 2)

    def load_dialect_impl(self, dialect):
        # SQLite's NUMERIC is a float in disguise: 32.97 would come back as 32.970000000000006.
        return BigInteger() if dialect.name == "sqlite" else self.impl_instance

    def process_bind_param(self, value, dialect):
        return int(value * 100) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        return Decimal(value).scaleb(-2) if dialect.name == "sqlite" else value


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC timestamps on every database, microseconds included."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        # MySQL's DATETIME drops microseconds unless asked for 6 digits.
        return (
            mysql.DATETIME(fsp=6)
            if dialect.name in ("mysql", "mariadb")
            else self.impl_instance
        )

    def process_bind_param(self, value, dialect):
        # SQLite and MySQL store no time zone: keep UTC there, without an offset.
        if dialect.name == "postgresql":
            return value
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return (
            value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        )


def utcnow() -> datetime:
    return datetime.now(UTC)


class ExactText(TypeDecorator):
    """VARCHAR that compares exactly on every database: MySQL's default collation
    ignores case, and its _bin collations ignore trailing spaces."""

    impl = String
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name not in ("mysql", "mariadb"):
            return self.impl_instance
        collation = "utf8mb4_nopad_bin" if dialect.is_mariadb else "utf8mb4_0900_bin"
        return mysql.VARCHAR(self.impl_instance.length, collation=collation)


# Full Unicode text on MySQL/MariaDB, whatever the database's default character set.
MYSQL_UTF8 = {"mysql_charset": "utf8mb4"}


# --- Field types shared by the models ---------------------------------------------


def isbn13_checksum(digits: str) -> int:
    """The ISBN-13 weighted sum: a valid ISBN-13 has it divisible by 10."""
    return sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(digits))


def normalize_isbn(value: str) -> str:
    """Check an ISBN-10 or ISBN-13 and return it as the 13 digits of ISBN-13."""
    digits = value.replace("-", "").replace(" ", "").upper()
    if (
        len(digits) == 10
        and digits[:9].isdigit()
        and (digits[9].isdigit() or digits[9] == "X")
    ):
        checksum = sum(
            (10 - i) * (10 if c == "X" else int(c)) for i, c in enumerate(digits)
        )
        if checksum % 11:
            raise ValueError("ISBN-10 check digit is wrong")
        digits = "978" + digits[:9]
        return digits + str(-isbn13_checksum(digits) % 10)
    if len(digits) == 13 and digits.isdigit():
        if isbn13_checksum(digits) % 10:
            raise ValueError("ISBN-13 check digit is wrong")
        return digits
    raise ValueError("must be an ISBN-10 or ISBN-13")


# PostgreSQL cannot store NUL characters in text.
Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
ISBN = Annotated[str, AfterValidator(normalize_isbn)]
# Decimal, written in JSON as a string with exactly two places: "10.99", "32.97".
Amount = Annotated[
    Decimal,
    PlainSerializer(lambda amount: f"{amount:.2f}", return_type=str, when_used="json"),
]
MONEY_STRING = r"^[0-9]{1,8}(\.[0-9]{1,2})?$"


def check_money_string(value):
    """Money comes as a JSON number or as a string that looks like one: "10.99"."""
    if isinstance(value, str) and not re.fullmatch(MONEY_STRING, value):
        raise ValueError('must look like "10.99": at most 8 digits, 2 decimal places')
    return value


Price = Annotated[
    Amount,
    BeforeValidator(check_money_string),
    Field(ge=0, lt=100_000_000, decimal_places=2),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "number",
                    "minimum": 0,
                    "exclusiveMaximum": 100_000_000,
                    "multipleOf": 0.01,
                },
                {"type": "string", "pattern": MONEY_STRING},
            ]
        },
        mode="validation",
    ),
]
# Integers in bodies are strict: true, 2.0 and "2" are not numbers of copies.
Stock = Annotated[StrictInt, Field(ge=0, le=MAX_STOCK)]
PathId = Annotated[int, Path(ge=1, le=MAX_ID)]


# --- Books ------------------------------------------------------------------------


class BookBase(SQLModel):
    title: Text = Field(min_length=1, max_length=200, index=True)
    author: Text = Field(min_length=1, max_length=200, index=True)
    year: StrictInt = Field(ge=0, le=2100, description="Year of publication")
    isbn: ISBN | None = Field(
        default=None, unique=True, description="ISBN-10 or ISBN-13, stored as ISBN-13"
    )
    price: Price = Field(sa_type=Money(10))
    description: Text | None = Field(default=None, max_length=2000)
    stock: Stock = Field(default=0, description="Copies on hand")


class Book(BookBase, table=True):
    __table_args__ = (
        CheckConstraint("stock >= 0", name="stock_not_negative"),
        MYSQL_UTF8,
    )

    # index=True on the key too: an index of ids alone is a fraction of the size of
    # the table, so counting, or skipping to page 4,500, reads a fraction of the pages.
    id: int | None = Field(default=None, primary_key=True, index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# On SQLite, a trigram index of titles and authors, kept current by triggers, lets a
# search read the matching books only; elsewhere (and for 1 or 2 characters) a
# search reads every title. See BOOK_CONDITIONS below.
for statement in (
    """CREATE VIRTUAL TABLE book_search USING fts5(
        title, author, content='book', content_rowid='id', tokenize='trigram')""",
    """CREATE TRIGGER book_search_insert AFTER INSERT ON book BEGIN
        INSERT INTO book_search(rowid, title, author)
        VALUES (new.id, new.title, new.author);
    END""",
    """CREATE TRIGGER book_search_delete AFTER DELETE ON book BEGIN
        INSERT INTO book_search(book_search, rowid, title, author)
        VALUES ('delete', old.id, old.title, old.author);
    END""",
    """CREATE TRIGGER book_search_update AFTER UPDATE OF title, author ON book BEGIN
        INSERT INTO book_search(book_search, rowid, title, author)
        VALUES ('delete', old.id, old.title, old.author);
        INSERT INTO book_search(rowid, title, author)
        VALUES (new.id, new.title, new.author);
    END""",
):
    event.listen(
        Book.__table__, "after_create", DDL(statement).execute_if(dialect="sqlite")
    )


class BookCreate(BookBase):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "title": "The Pragmatic Programmer",
                    "author": "David Thomas, Andrew Hunt",
                    "year": 2019,
                    "isbn": "978-0-13-595705-9",
                    "price": "49.99",
                    "description": "From journeyman to master.",
                    "stock": 10,
                }
            ]
        },
    )


class BookPublic(BaseModel):
    # BaseModel: SQLModel runs an __init__ of its own, in Python, for each book of a
    # page. Plain types: what the database holds passed the input rules already.
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    author: str
    year: int
    isbn: str | None
    price: Amount
    description: str | None
    stock: int
    created_at: datetime
    updated_at: datetime

    @computed_field
    @property
    def in_stock(self) -> bool:
        return self.stock > 0


class BookUpdate(SQLModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"price": "44.99", "stock": 12}]},
    )

    # Each field may be left out, but none may be null unless it is nullable.
    title: Text = Field(default=None, min_length=1, max_length=200)
    author: Text = Field(default=None, min_length=1, max_length=200)
    year: StrictInt = Field(default=None, ge=0, le=2100)
    isbn: ISBN | None = None
    price: Price = None
    description: Text | None = Field(default=None, max_length=2000)
    stock: Stock = None


class StockChange(SQLModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"delta": 5}]}
    )

    delta: StrictInt = Field(
        ge=-MAX_STOCK,
        le=MAX_STOCK,
        description="Copies to add (restock) or remove (write-off), never 0",
        schema_extra={"json_schema_extra": {"not": {"const": 0}}},
    )

    @field_validator("delta")
    @classmethod
    def not_zero(cls, delta: int) -> int:
        if delta == 0:
            raise ValueError("must not be 0")
        return delta


class StockPublic(SQLModel):
    book_id: int
    stock: int
    in_stock: bool


# --- Orders -----------------------------------------------------------------------


class OrderStatus(StrEnum):
    pending = "pending"
    confirmed = "confirmed"
    processing = "processing"
    shipped = "shipped"
    delivered = "delivered"
    cancelled = "cancelled"


NEXT_STATUSES = {
    OrderStatus.pending: [OrderStatus.confirmed, OrderStatus.cancelled],
    OrderStatus.confirmed: [OrderStatus.processing, OrderStatus.cancelled],
    OrderStatus.processing: [OrderStatus.shipped, OrderStatus.cancelled],
    OrderStatus.shipped: [OrderStatus.delivered],
    OrderStatus.delivered: [],
    OrderStatus.cancelled: [],
}


class OrderItemBase(SQLModel):
    book_id: StrictInt = Field(foreign_key="book.id", index=True, ge=1, le=MAX_ID)
    quantity: StrictInt = Field(ge=1, le=1000)


class OrderItem(OrderItemBase, table=True):
    __table_args__ = MYSQL_UTF8
    id: int | None = Field(default=None, primary_key=True)
    order_id: int = Field(foreign_key="order.id", index=True)
    title: str
    unit_price: Decimal = Field(sa_type=Money(10))
    line_total: Decimal = Field(sa_type=Money(15))


class OrderItemCreate(OrderItemBase):
    model_config = ConfigDict(extra="forbid")


class OrderItemPublic(OrderItemBase):
    title: str
    unit_price: Amount
    line_total: Amount


class OrderBase(SQLModel):
    customer: Text = Field(
        min_length=1,
        max_length=200,
        index=True,
        sa_type=ExactText(200),
        description="A name or an e-mail",
    )


class Order(OrderBase, table=True):
    __table_args__ = MYSQL_UTF8
    id: int | None = Field(default=None, primary_key=True)
    status: OrderStatus = Field(
        default=OrderStatus.pending, sa_type=String(10), index=True
    )
    total: Decimal = Field(sa_type=Money(15))
    idempotency_key: str | None = Field(
        default=None, unique=True, sa_type=ExactText(255)
    )
    request_hash: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime, index=True
    )
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # selectin: the items of a whole page of orders come in one more query, not one per order.
    items: list[OrderItem] = Relationship(
        sa_relationship_kwargs={"lazy": "selectin", "order_by": "OrderItem.id"}
    )


class OrderCreate(OrderBase):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "customer": "ada@example.com",
                    "items": [{"book_id": 1, "quantity": 2}],
                }
            ]
        },
    )

    items: list[OrderItemCreate] = Field(min_length=1, max_length=100)

    @field_validator("items")
    @classmethod
    def one_line_per_book(cls, items: list[OrderItemCreate]) -> list[OrderItemCreate]:
        if len({item.book_id for item in items}) < len(items):
            raise ValueError(
                "each book may appear only once; raise its quantity instead"
            )
        return items


class OrderPublic(OrderBase):
    id: int
    status: OrderStatus
    items: list[OrderItemPublic]
    total: Amount
    created_at: datetime
    updated_at: datetime


class StatusChange(SQLModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"status": "confirmed"}]}
    )

    status: OrderStatus


class Message(SQLModel):
    detail: str


class Page(SQLModel):
    offset: int = Field(default=0, ge=0, le=1_000_000)
    limit: int = Field(default=20, ge=1, le=100)


class BookFilter(Page):
    q: Text | None = Field(
        default=None,
        max_length=200,
        description="Case-insensitive part of the title or author",
    )
    author: Text | None = Field(
        default=None, max_length=200, description="Case-insensitive part of the author"
    )
    in_stock: bool | None = None
    min_price: Price | None = None
    max_price: Price | None = None
    year: int | None = Field(default=None, ge=0, le=2100)
    sort: Literal[
        "id", "-id", "title", "-title", "author", "-author",
        "year", "-year", "price", "-price", "created_at", "-created_at",
    ] = Field(default="id", description="A field, with a leading - for descending order")  # fmt: skip


class OrderFilter(Page):
    status: OrderStatus | None = None
    customer: Text | None = Field(
        default=None, max_length=200, description="Exact match"
    )


# --- The session, the app and its plumbing ------------------------------------------


async def get_session() -> Session:
    # Creating a session does no I/O, so this runs in the event loop. The session
    # is used, and closed, in a worker thread: see in_transaction below.
    return Session(engine, expire_on_commit=False)


SessionDep = Annotated[Session, Depends(get_session)]


# The threads that talk to the database: asyncio's own executor, which is lighter
# per call than FastAPI's run_in_threadpool, at one call per request.
database_threads = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="database")
# SQLite lets one transaction write at a time. This process's writes to SQLite run
# one after another in a thread of their own, where they queue without holding a
# thread, instead of sleeping in SQLite's busy handler. An in-memory database is
# one connection, which only one thread may use at a time: all its work runs here.
sqlite_writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")

# Conflicts that the same transaction, run again, can get past: SQLite busy;
# PostgreSQL serialization failure, deadlock, lock timeout; MySQL lock timeout, deadlock.
TRANSIENT_ERRORS = {"SQLITE_BUSY", "40001", "40P01", "55P03", 1205, 1213}


class DatabaseUnavailable(Exception):
    """The database failed, or gave no answer in time: the client gets a 503."""


def is_transient(error: DBAPIError) -> bool:
    # SQLite names its errors, PostgreSQL gives an SQLSTATE, MySQL an error number.
    orig = error.orig
    codes = {getattr(orig, "sqlite_errorname", None), getattr(orig, "sqlstate", None)}
    return not TRANSIENT_ERRORS.isdisjoint(codes | set(orig.args[:1]))


def run_transaction(
    session: Session, work: Callable[..., T], args: tuple, deadline: float
) -> T:
    """Run work(session, *args) and commit, as one transaction, in a worker thread.

    A transient conflict, or a connection found dead before the commit, rolls the
    transaction back and runs it again after a short random pause, a few times at
    most and before `deadline`. Any other failure of the database is a 503.
    """
    attempt = 0
    with session:
        while True:
            attempt += 1
            committing = False
            try:
                # The socket the transaction runs on, for cut_off to find.
                dbapi_connection = session.connection().connection.dbapi_connection
                if hasattr(dbapi_connection, "fileno"):
                    session.info["fileno"] = dbapi_connection.fileno()
                result = work(session, *args)
                # Past the deadline the client has had its 503: commit nothing.
                if time.monotonic() > deadline:
                    raise DatabaseUnavailable(f"no answer within {DB_TIMEOUT} s")
                committing = True
                session.commit()
                return result
            except (OperationalError, InterfaceError) as error:
                session.rollback()
                retry = is_transient(error) or (
                    error.connection_invalidated and not committing
                )
                if not retry or attempt == MAX_ATTEMPTS or time.monotonic() > deadline:
                    raise DatabaseUnavailable(error.orig) from None
                time.sleep(random.uniform(0, 0.05 * attempt))


def cut_off(session: Session) -> None:
    """Shut the socket of a transaction that has outlived DB_TIMEOUT.

    Its blocked call then fails, and the pool discards the connection. PyMySQL has
    read_timeout for this, and SQLite no socket; psycopg has no client-side timeout,
    and would wait forever for a database behind a network partition.
    """
    if fileno := session.info.get("fileno"):
        with suppress(OSError), socket.socket(fileno=os.dup(fileno)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


async def in_transaction(
    session: Session, work: Callable[..., T], *args, write: bool = False
) -> T:
    """Run work(session, *args) in a worker thread, as one transaction (run_transaction).

    Database calls block, and in the event loop they would stall every request.
    The endpoints are `async def` and hand their database work to a thread in one
    hop, while validation and JSON stay in the loop, where they cost no hop.

    The answer comes within DB_TIMEOUT whatever the database does: a unit still
    running then (connecting, or waiting for a thread) is left to fail on its own,
    and can no longer commit.
    """
    bind = session.get_bind()
    one_thread = bind.dialect.name == "sqlite" and (
        write or isinstance(bind.pool, StaticPool)
    )
    threads = sqlite_writer if one_thread else database_threads
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + DB_TIMEOUT
    unit = loop.run_in_executor(threads, run_transaction, session, work, args, deadline)
    watchdog = loop.call_later(DB_TIMEOUT, cut_off, session)
    unit.add_done_callback(lambda _: watchdog.cancel())
    try:
        return await asyncio.wait_for(asyncio.shield(unit), DB_TIMEOUT)
    except TimeoutError:
        raise DatabaseUnavailable(f"no answer within {DB_TIMEOUT} s") from None


@asynccontextmanager
async def lifespan(app: FastAPI):
    # Workers that start together race to create the same tables: the loser's
    # CREATE fails, and its next attempt finds the tables in place.
    for attempt in range(5):
        try:
            SQLModel.metadata.create_all(engine)
            break
        except SQLAlchemyError:
            if attempt == 4:
                raise
            await asyncio.sleep(0.5)
    if ADMIN_TOKEN is None:
        log.warning(
            "BOOKSTORE_ADMIN_TOKEN is not set: anyone may change the catalogue and orders (demo mode)"
        )
    yield
    # Requests in flight have finished. Closing the connections makes SQLite fold
    # its write-ahead log into the database file, which then holds every change.
    engine.dispose()


class LimitBodySize:
    """Answer 413 once a request body grows past MAX_BODY_BYTES, whether it was
    announced by Content-Length or sent in chunks, before more is read."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:  # FastAPI answers with this exception
                raise HTTPException(
                    413, f"Request body is larger than {MAX_BODY_BYTES} bytes"
                )
            return message

        await self.app(scope, receive_limited, send)


class SameWithTrailingSlash:
    """Route /books/ as /books, answering directly instead of with a 307 redirect,
    and HEAD as GET without the body. An encoded slash (/books/1%2F) is no slash."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if len(path) > 1 and scope.get("raw_path", b"").endswith(b"/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
        if scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def send_headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


RETRY_AFTER = {"description": "Seconds to wait", "schema": {"type": "integer"}}
LOCATION = {
    201: {
        "headers": {
            "Location": {
                "description": "The new resource's path",
                "schema": {"type": "string"},
            }
        }
    }
}
TOTAL_COUNT = {
    200: {
        "headers": {
            "X-Total-Count": {
                "description": "How many match in all",
                "schema": {"type": "integer"},
            }
        }
    }
}


def answers(*status_codes: int) -> dict:
    """The OpenAPI entries of a route that uses the database: its error answers,
    each {"detail": "..."}, and 503 when the database is unavailable."""
    entries: dict = {code: {"model": Message} for code in status_codes}
    entries[503] = {"model": Message, "headers": {"Retry-After": RETRY_AFTER}}
    return entries


app = FastAPI(
    title="BookStore",
    version="1.0.0",
    description="A book catalogue, its stock and its orders.",
    lifespan=lifespan,
    redirect_slashes=False,  # SameWithTrailingSlash answers /books/ directly
)
app.add_middleware(LimitBodySize)
app.add_middleware(SameWithTrailingSlash)


@app.exception_handler(DatabaseUnavailable)
async def database_unavailable(request, exc: DatabaseUnavailable):
    """503, logged once with its cause; the client may try again in a moment."""
    log.error("Database unavailable, answering 503: %s", exc)
    return JSONResponse(
        {"detail": "Database unavailable"}, 503, headers={"Retry-After": "2"}
    )


@app.exception_handler(RequestValidationError)
async def validation_error(request, exc: RequestValidationError):
    """FastAPI's 422 answer, without echoing the input back: JSON cannot carry
    some inputs (NaN, 1e400, unpaired surrogates), and FastAPI's own answer fails on them."""
    errors = [
        {"type": e["type"], "loc": e["loc"], "msg": e["msg"]} for e in exc.errors()
    ]
    return JSONResponse({"detail": errors}, 422)


bearer = HTTPBearer(
    auto_error=False, description="The BOOKSTORE_ADMIN_TOKEN of the service"
)


async def require_admin(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Let the request through if the service has no admin token or was sent the right one."""
    if ADMIN_TOKEN is None:
        return
    token = credentials.credentials if credentials else ""
    # compare_digest takes as long for a wrong first character as for a wrong last one.
    if not secrets.compare_digest(token.encode(), ADMIN_TOKEN.encode()):
        raise HTTPException(
            401, "Missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"}
        )


# Routes that change the catalogue or touch orders: the shop's, not the customers'.
admin = APIRouter(dependencies=[Depends(require_admin)], responses=answers(401))


@app.exception_handler(405)
async def method_not_allowed(request, exc: HTTPException):
    """405 with every method the path has in Allow; Starlette lists only one route's."""
    methods = {
        method
        for route in [*app.routes, *admin.routes]
        if route.matches(request.scope)[0] != Match.NONE
        for method in getattr(route, "methods", ())
    }
    allow = ", ".join(sorted(methods))
    return JSONResponse({"detail": exc.detail}, 405, headers={"Allow": allow})


# --- Service ----------------------------------------------------------------------


@app.get("/")
async def root():
    return {"name": app.title, "version": app.version, "docs": "/docs"}


def ping(session: Session) -> None:
    session.exec(select(1)).one()


@app.get("/health", responses=answers())
async def health(session: SessionDep):
    await in_transaction(session, ping)
    return {"status": "ok"}


# --- Books ------------------------------------------------------------------------


def get_book_or_404(session: Session, book_id: int) -> Book:
    book = session.get(Book, book_id)
    if book is None:
        raise HTTPException(404, f"Book {book_id} not found")
    return book


# Built once, with the id as a parameter: building a statement takes SQLAlchemy
# longer than SQLite takes to run it.
BOOK_BY_ID = select(*Book.__table__.columns).where(col(Book.id) == bindparam("id"))


def read_book_or_404(session: Session, book_id: int) -> Row:
    """The book as a row, for an answer only: like a page of books, no ORM object."""
    row = session.connection().execute(BOOK_BY_ID, {"id": book_id}).first()
    if row is None:
        raise HTTPException(404, f"Book {book_id} not found")
    return row


def save_book(session: Session, book: Book) -> Book:
    """Write `book`; a second book with the same ISBN is a 409, not a 500."""
    isbn = book.isbn  # a failed flush leaves the book unreadable
    session.add(book)
    try:
        session.flush()
    except IntegrityError:
        raise HTTPException(409, f"A book with ISBN {isbn} already exists") from None
    return book


@admin.post(
    "/books",
    status_code=201,
    response_model=BookPublic,
    responses=answers(400, 409, 413) | LOCATION,
)
async def create_book(book: BookCreate, session: SessionDep, response: Response):
    now = utcnow()
    db_book = Book.model_validate(book, update={"created_at": now, "updated_at": now})
    await in_transaction(session, save_book, db_book, write=True)
    response.headers["Location"] = f"/books/{db_book.id}"
    return db_book


def like_pattern(text: str) -> str:
    """A LIKE pattern (with ESCAPE '/') that finds `text` anywhere; % and _ are plain."""
    return "%" + text.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"


# The filters of a list of books, each a condition on a parameter of its own name.
# Like BOOK_BY_ID, the statements are built once (for each combination of filters
# and sort, by book_queries) and run with the values of each request.
BOOK_CONDITIONS = {
    "q": col(Book.title).ilike(bindparam("q"), escape="/")
    | col(Book.author).ilike(bindparam("q"), escape="/"),
    # On SQLite, a q of 3 or more characters is a phrase looked up in book_search.
    "phrase": col(Book.id).in_(
        sql_text(
            "SELECT rowid FROM book_search WHERE book_search MATCH :phrase"
        ).columns(column("rowid"))
    ),
    "author": col(Book.author).ilike(bindparam("author"), escape="/"),
    "in_stock": (col(Book.stock) > 0) == bindparam("in_stock"),
    "min_price": col(Book.price) >= bindparam("min_price"),
    "max_price": col(Book.price) <= bindparam("max_price"),
    "year": col(Book.year) == bindparam("year"),
}


@cache
def book_queries(filters: frozenset[str], sort: str) -> tuple[Select, Select]:
    """Statements that count the books matching `filters`, and read a page of them."""
    conditions = [BOOK_CONDITIONS[name] for name in BOOK_CONDITIONS if name in filters]
    count = select(func.count()).select_from(Book).where(*conditions)
    sort_field = sort.lstrip("-")
    field = col(getattr(Book, sort_field))
    if sort_field in ("title", "author"):
        field = func.lower(field)  # the same case-insensitive order on every database
    # Ties are broken by id, in the same direction, so that pages never overlap.
    if sort.startswith("-"):
        order_by = [field.desc(), col(Book.id).desc()]
    else:
        order_by = [field, col(Book.id)]
    # The page's ids first, then their rows: skipping 90,000 books is cheap in the
    # index of ids and slow in the table, whose rows are large.
    ids = (
        select(Book.id)
        .where(*conditions)
        .order_by(*order_by)
        .offset(bindparam("offset"))
        .limit(bindparam("limit"))
        .subquery()
    )
    page = select(*Book.__table__.columns).join(ids, col(Book.id) == ids.c.id)
    return count, page.order_by(*order_by)


def find_books(session: Session, filters: BookFilter) -> tuple[Sequence[Row], int]:
    """A page of the books that match `filters`, and how many match in all."""
    values = filters.model_dump(exclude_none=True, exclude={"offset", "limit", "sort"})
    if "q" in values:
        if session.get_bind().dialect.name == "sqlite" and len(filters.q) >= 3:
            # SQLite's trigram index matches a quoted phrase anywhere in the words.
            values["phrase"] = '"' + values.pop("q").replace('"', '""') + '"'
        else:
            values["q"] = like_pattern(filters.q)
    if "author" in values:
        values["author"] = like_pattern(filters.author)
    count, page = book_queries(frozenset(values), filters.sort)
    # Rows, not Book objects: a page is only read, and 20 tracked ORM objects cost
    # more to build, and to read back, than the query takes.
    connection = session.connection()
    total = connection.execute(count, values).scalar_one()
    values |= {"offset": filters.offset, "limit": filters.limit}
    return connection.execute(page, values).all(), total


@app.get("/books", response_model=list[BookPublic], responses=answers() | TOTAL_COUNT)
async def list_books(
    filters: Annotated[BookFilter, Query()], session: SessionDep, response: Response
):
    books, total = await in_transaction(session, find_books, filters)
    response.headers["X-Total-Count"] = str(total)
    return books


@app.get("/books/{book_id}", response_model=BookPublic, responses=answers(404))
async def read_book(book_id: PathId, session: SessionDep):
    return await in_transaction(session, read_book_or_404, book_id)


def update_book_fields(session: Session, book_id: int, fields: dict) -> Book:
    book = get_book_or_404(session, book_id)
    book.sqlmodel_update(fields)
    book.updated_at = utcnow()
    try:
        return save_book(session, book)
    except StaleDataError:  # deleted by a concurrent request since it was read
        raise HTTPException(404, f"Book {book_id} not found") from None


@admin.patch(
    "/books/{book_id}",
    response_model=BookPublic,
    responses=answers(400, 404, 409, 413),
)
@admin.put(
    "/books/{book_id}",
    response_model=BookPublic,
    responses=answers(400, 404, 409, 413),
    description="The same partial update as PATCH.",
)
async def update_book(book_id: PathId, book: BookUpdate, session: SessionDep):
    # exclude_unset: only the fields the client sent, so the others stay as they are.
    fields = book.model_dump(exclude_unset=True)
    return await in_transaction(
        session, update_book_fields, book_id, fields, write=True
    )


def delete_book_row(session: Session, book_id: int) -> None:
    # One DELETE whose row count says whether the book was there: of two
    # concurrent deletes, one finds the book and the other a 404.
    try:
        deleted = session.exec(delete(Book).where(col(Book.id) == book_id)).rowcount
    except IntegrityError:  # order_item's foreign key: order history is never lost
        raise HTTPException(
            409, f"Book {book_id} is in orders and cannot be deleted"
        ) from None
    if not deleted:
        raise HTTPException(404, f"Book {book_id} not found")


@admin.delete("/books/{book_id}", status_code=204, responses=answers(404, 409))
async def delete_book(book_id: PathId, session: SessionDep):
    await in_transaction(session, delete_book_row, book_id, write=True)


# --- Stock ------------------------------------------------------------------------


def stock_of(book: Book) -> StockPublic:
    return StockPublic(book_id=book.id, stock=book.stock, in_stock=book.stock > 0)


@app.get("/books/{book_id}/stock", response_model=StockPublic, responses=answers(404))
async def read_stock(book_id: PathId, session: SessionDep):
    return stock_of(await in_transaction(session, get_book_or_404, book_id))


def add_stock(session: Session, book_id: int, delta: int) -> Book:
    # One conditional UPDATE: the database checks and changes the stock in a
    # single step, so concurrent changes can neither be lost nor go below 0. A
    # write-off needs no upper bound: a cancel may have lifted the stock past it.
    new_stock = col(Book.stock) + delta
    within_range = new_stock >= 0 if delta < 0 else new_stock <= MAX_STOCK
    changed = session.exec(
        update(Book)
        .where(col(Book.id) == book_id, within_range)
        .values(stock=new_stock, updated_at=utcnow())
    ).rowcount
    book = get_book_or_404(session, book_id)
    if not changed:
        raise HTTPException(
            409,
            f"Stock of book {book_id} is {book.stock}: a change of {delta} "
            f"would take it outside 0..{MAX_STOCK}",
        )
    return book


@admin.post(
    "/books/{book_id}/stock",
    response_model=StockPublic,
    responses=answers(400, 404, 409, 413),
)
async def change_stock(book_id: PathId, change: StockChange, session: SessionDep):
    book = await in_transaction(session, add_stock, book_id, change.delta, write=True)
    return stock_of(book)


# --- Orders -----------------------------------------------------------------------


def find_keyed_order(session: Session, key: str, request_hash: str) -> Order | None:
    """The order placed earlier with this Idempotency-Key, if any."""
    order = session.exec(select(Order).where(Order.idempotency_key == key)).first()
    if order is not None and order.request_hash != request_hash:
        error = {
            "type": "idempotency_key_reused",
            "loc": ("header", "Idempotency-Key"),
            "msg": "This Idempotency-Key was used with a different request",
        }
        raise RequestValidationError([error])
    return order


# Built once, like BOOK_BY_ID. Copies are taken in one statement that checks and
# changes the stock together: two orders for the last copy cannot both get it.
TAKE_COPIES = (
    update(Book)
    .where(
        col(Book.id) == bindparam("book_id"), col(Book.stock) >= bindparam("quantity")
    )
    .values(stock=col(Book.stock) - bindparam("quantity"), updated_at=bindparam("now"))
)
TITLES_AND_PRICES = select(Book.id, Book.title, Book.price).where(
    col(Book.id).in_(bindparam("ids", expanding=True))
)


def place_order(
    session: Session, order_in: OrderCreate, key: str | None, request_hash: str
) -> tuple[Order, bool]:
    """Place the order in one transaction: all of it, or nothing. Also says
    whether it is new (False: an earlier order with the same key)."""
    if key and (order := find_keyed_order(session, key, request_hash)):
        return order, False
    now = utcnow()
    order = Order(
        customer=order_in.customer,
        total=Decimal(0),
        idempotency_key=key,
        request_hash=request_hash,
        created_at=now,
        updated_at=now,
    )
    session.add(order)
    if key:
        # The key is claimed before any stock is taken: a concurrent retry waits
        # here, at the key's unique index, until this order is placed, and then
        # finds it; it is never told that the last copies are gone.
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            return find_keyed_order(session, key, request_hash), False
    # Books in id order: two orders lock the books they share in the same order,
    # so they never deadlock.
    connection = session.connection()
    for item in sorted(order_in.items, key=lambda item: item.book_id):
        copies = {"book_id": item.book_id, "quantity": item.quantity, "now": now}
        if not connection.execute(TAKE_COPIES, copies).rowcount:
            book = get_book_or_404(session, item.book_id)
            raise HTTPException(
                409,
                f"Not enough stock for book {book.id} ({book.title}): "
                f"asked {item.quantity}, available {book.stock}",
            )
    book_ids = [item.book_id for item in order_in.items]
    books = {
        book.id: book
        for book in connection.execute(TITLES_AND_PRICES, {"ids": book_ids})
    }
    order.items = [
        OrderItem(
            book_id=item.book_id,
            quantity=item.quantity,
            title=books[item.book_id].title,
            unit_price=books[item.book_id].price,
            line_total=books[item.book_id].price * item.quantity,
        )
        for item in order_in.items
    ]
    order.total = sum(item.line_total for item in order.items)
    return order, True


@app.post(
    "/orders",
    status_code=201,
    response_model=OrderPublic,
    responses=answers(400, 404, 409, 413)
    | LOCATION
    | {200: {"model": OrderPublic, "description": "A retry"}},
)
async def create_order(
    order_in: OrderCreate,
    session: SessionDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            pattern=r"^[\x20-\x7e]+$",
            description="Retries with the same key get the same order back",
        ),
    ] = None,
):
    request_hash = hashlib.sha256(order_in.model_dump_json().encode()).hexdigest()
    order, placed = await in_transaction(
        session, place_order, order_in, idempotency_key, request_hash, write=True
    )
    if placed:
        response.headers["Location"] = f"/orders/{order.id}"
    else:
        response.status_code = 200
    return order


def find_orders(session: Session, filters: OrderFilter) -> tuple[list[Order], int]:
    """A page of the orders that match `filters`, newest first, and how many match."""
    conditions = []
    if filters.status is not None:
        conditions.append(col(Order.status) == filters.status)
    if filters.customer is not None:
        conditions.append(col(Order.customer) == filters.customer)
    total = session.exec(
        select(func.count()).select_from(Order).where(*conditions)
    ).one()
    newest_first = [col(Order.created_at).desc(), col(Order.id).desc()]
    query = select(Order).where(*conditions).order_by(*newest_first)
    orders = session.exec(query.offset(filters.offset).limit(filters.limit)).all()
    return list(orders), total


@admin.get(
    "/orders", response_model=list[OrderPublic], responses=answers() | TOTAL_COUNT
)
async def list_orders(
    filters: Annotated[OrderFilter, Query()], session: SessionDep, response: Response
):
    orders, total = await in_transaction(session, find_orders, filters)
    response.headers["X-Total-Count"] = str(total)
    return orders


def get_order_or_404(session: Session, order_id: int) -> Order:
    order = session.get(Order, order_id)
    if order is None:
        raise HTTPException(404, f"Order {order_id} not found")
    return order


@admin.get("/orders/{order_id}", response_model=OrderPublic, responses=answers(404))
async def read_order(order_id: PathId, session: SessionDep):
    return await in_transaction(session, get_order_or_404, order_id)


def move_order(
    session: Session, order_id: int, new_status: OrderStatus, repeat_ok: bool
) -> Order:
    """Move an order to `new_status`, putting its stock back if that is `cancelled`.

    The move is one conditional UPDATE (WHERE status IN the allowed previous
    statuses): of two concurrent moves only one can match, so stock comes back once.
    With `repeat_ok`, an order already in `new_status` is answered as it is.
    """
    now = utcnow()
    previous = [old for old, nexts in NEXT_STATUSES.items() if new_status in nexts]
    moved = session.exec(
        update(Order)
        .where(col(Order.id) == order_id, col(Order.status).in_(previous))
        .values(status=new_status, updated_at=now)
    ).rowcount
    order = get_order_or_404(session, order_id)
    if not moved:
        if repeat_ok and order.status == new_status:
            return order
        allowed = ", ".join(NEXT_STATUSES[order.status]) or "none, it is final"
        raise HTTPException(
            409,
            f"Order {order_id} is {order.status} and cannot become {new_status}; "
            f"allowed: {allowed}",
        )
    if new_status == OrderStatus.cancelled:
        for item in sorted(order.items, key=lambda item: item.book_id):
            session.exec(
                update(Book)
                .where(col(Book.id) == item.book_id)
                .values(stock=col(Book.stock) + item.quantity, updated_at=now)
            )
    return order


@admin.patch(
    "/orders/{order_id}/status",
    response_model=OrderPublic,
    responses=answers(400, 404, 409, 413),
)
async def change_order_status(
    order_id: PathId, change: StatusChange, session: SessionDep
):
    return await in_transaction(
        session, move_order, order_id, change.status, False, write=True
    )


@admin.delete(
    "/orders/{order_id}",
    response_model=OrderPublic,
    responses=answers(404, 409),
    description="Cancel the order and put its stock back; an order already cancelled stays as it is.",
)
async def cancel_order(order_id: PathId, session: SessionDep):
    return await in_transaction(
        session, move_order, order_id, OrderStatus.cancelled, True, write=True
    )


app.include_router(admin)
