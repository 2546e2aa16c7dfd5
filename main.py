"""BookStore: a book catalogue, its stock and its orders, with FastAPI and SQLModel.

Run it with `uvicorn main:app` and open http://127.0.0.1:8000/docs.
README.md walks through this file from top to bottom:

- the shop: settings, field types, the tables and their classes, the app, its
  routers and one function per endpoint (service, books, stock, orders), each
  statement it runs beside it;
- what keeps it running, which a first reading may skip: the unit of work
  (threads, one commit, retries, timeouts, 503), the engine and start-up, the
  middleware and the error handlers, and each database's search indexes.
"""

import asyncio
import functools
import hashlib
import json
import logging
import os
import random
import re
import secrets
import signal
import socket
import threading
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterator,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, closing, suppress
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from functools import cache
from inspect import signature
from math import ceil
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
)
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    JsonValue,
    PlainSerializer,
    StrictInt,
    WithJsonSchema,
    computed_field,
    field_validator,
)
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    Numeric,
    Row,
    String,
    bindparam,
    column,
    event,
    exists,
    insert,
    inspect,
)
from sqlalchemy import table as sql_table
from sqlalchemy import text as sql_text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.pool import NullPool, StaticPool
from sqlalchemy.schema import CreateColumn
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator, TypeEngine
from sqlmodel import (
    Field,
    Relationship,
    Session,
    SQLModel,
    col,
    create_engine,
    func,
    select,
    update,
)
from sqlmodel.sql.expression import SelectOfScalar
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

# --- Settings -----------------------------------------------------------------

log = logging.getLogger("uvicorn.error")


def is_on(name: str, default: str = "") -> bool:
    """A switch in the environment: 1, true, yes or on."""
    return os.environ.get(name, default).lower() in ("1", "true", "yes", "on")


DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite:///./bookstore.db")
SQL_ECHO = is_on("SQL_ECHO")
ADMIN_TOKEN = os.environ.get("BOOKSTORE_ADMIN_TOKEN") or None
# A bearer token travels in a header: visible ASCII only. A trailing newline from
# a secret file would make every admin request a 401.
if ADMIN_TOKEN is not None and not re.fullmatch(r"[\x21-\x7e]+", ADMIN_TOKEN):
    log.critical(
        "BOOKSTORE_ADMIN_TOKEN must be visible ASCII characters, without spaces or"
        " a trailing newline: no client could send it"
    )
    raise SystemExit(3)
# Without an admin token the shop is open to anyone (demo mode), unless
# BOOKSTORE_DEMO says no: the Docker image does, as it serves on a network.
if ADMIN_TOKEN is None and not is_on("BOOKSTORE_DEMO", "1"):
    log.critical(
        "BOOKSTORE_ADMIN_TOKEN is not set, and BOOKSTORE_DEMO forbids an open shop:"
        " set the token, or BOOKSTORE_DEMO=1 for demo mode"
    )
    raise SystemExit(3)
# Browser pages from these origins may call the API (CORS): "https://a.example,
# http://localhost:5173", or "*". None: no page from another origin may.
CORS_ORIGINS = [
    o.strip() for o in os.environ.get("CORS_ORIGINS", "").split(",") if o.strip()
]


def seconds(name: str, default: str, zero: str = "") -> float:
    """A setting in seconds: a positive number (or 0, if `zero` says what it
    means), or the service does not start."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf") or (zero and value == 0)):  # nan: false too
        text = os.environ[name]
        kind = "a positive number of seconds" + (f", or 0 for {zero}" if zero else "")
        log.critical("%s must be %s, not %r", name, kind, text)
        raise SystemExit(3)  # uvicorn's "failed to start": its other workers stop too
    return value


# Seconds a request may wait for the database in all (connecting, locks, statements).
DB_TIMEOUT = seconds("DB_TIMEOUT", "10")
# Seconds a request's body may take to arrive: a slower one is a 408.
BODY_TIMEOUT = seconds("BODY_TIMEOUT", "30")
# Seconds an order stays pending, its copies held, before the service cancels it.
ORDER_HOLD_SECONDS = seconds("ORDER_HOLD_SECONDS", "3600", zero="never")
# A lock is waited for briefly: a transaction that does not get it gives its thread
# back, and runs again after a pause, until DB_TIMEOUT. A commit still under way at
# DB_TIMEOUT is waited for a third of it more, so that its client learns the outcome.
LOCK_WAIT = 0.1
COMMIT_GRACE = DB_TIMEOUT / 3

MAX_ID = 2_147_483_647  # the largest key that every database's INTEGER holds
MAX_STOCK = 1_000_000_000
# The largest body a model can hold (a book whose 2,400 characters of text are all
# written as JSON escapes, "\ud83d\ude00", is 29 KB): more is a 413, before the cost
# of reading it is paid.
MAX_BODY_BYTES = 32 * 1024
# A 422 lists the first errors only: 100,000 unknown keys are not 100,000 errors.
MAX_ERRORS = 20
# Requests hold a worker thread only while they talk to the database (see
# in_transaction): a few threads for reads and as many for writes are enough, and
# each keeps its own SQLite page cache.
WORKER_THREADS = 8

T = TypeVar("T")
BookOrRow = TypeVar("BookOrRow", "Book", "Row[Any]")


# --- Field types ----------------------------------------------------------------
# Column types that make the databases agree, then the contract's rules as types.


class Money(TypeDecorator[Decimal]):
    """Exact money: NUMERIC(p, 2) where the database has it; integer cents on SQLite."""

    impl = Numeric
    cache_ok = True

    def __init__(self, precision: int):
        super().__init__(precision, 2)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        # SQLite's NUMERIC is a float in disguise: 32.97 would come back as
        # 32.970000000000006.
        return BigInteger() if dialect.name == "sqlite" else self.impl_instance

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        return int(value * 100)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None or dialect.name != "sqlite":
            return value  # type: ignore[no-any-return]
        return Decimal(value).scaleb(-2)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every database, microseconds included."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        # MySQL's DATETIME drops microseconds unless asked for 6 digits.
        if dialect.name in ("mysql", "mariadb"):
            return mysql.DATETIME(fsp=6)
        return self.impl_instance

    def process_bind_param(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        # SQLite and MySQL store no time zone: keep UTC there, without an offset.
        if value is None or dialect.name == "postgresql":
            return value
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        if value is not None and value.tzinfo is None:  # SQLite, MySQL
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value else value


def utcnow() -> datetime:
    return datetime.now(UTC)


class ExactText(TypeDecorator[str]):
    """VARCHAR that compares exactly, and sorts by code point, on every database:
    MySQL's default collation ignores case, its _bin collations ignore trailing
    spaces, and PostgreSQL's sort as the database's locale says."""

    impl = String
    cache_ok = True

    def __init__(self, length: int):
        super().__init__(length)
        self.length = length

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return String(self.length, collation="C")
        if dialect.name not in ("mysql", "mariadb"):
            return self.impl_instance
        mariadb = getattr(dialect, "is_mariadb", False)
        collation = "utf8mb4_nopad_bin" if mariadb else "utf8mb4_0900_bin"
        return mysql.VARCHAR(self.length, collation=collation)


# Full Unicode text on MySQL/MariaDB, whatever the database's default character set.
MYSQL_UTF8 = {"mysql_charset": "utf8mb4"}


def isbn13_checksum(digits: str) -> int:
    """The ISBN-13 weighted sum: a valid ISBN-13 has it divisible by 10."""
    return sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(digits))


def normalize_isbn(value: str) -> str:
    """Check an ISBN-10 or ISBN-13 and return it as the 13 digits of ISBN-13."""
    # [0-9], not isdigit(): Arabic-Indic and full-width digits are digits too.
    digits = value.replace("-", "").replace(" ", "")
    if re.fullmatch(r"[0-9]{9}[0-9Xx]", digits):
        checksum = sum(
            (10 - i) * (10 if c in "Xx" else int(c)) for i, c in enumerate(digits)
        )
        if checksum % 11:
            raise ValueError("ISBN-10 check digit is wrong")
        digits = "978" + digits[:9]
        return digits + str(-isbn13_checksum(digits) % 10)
    if re.fullmatch(r"[0-9]{13}", digits):
        if isbn13_checksum(digits) % 10:
            raise ValueError("ISBN-13 check digit is wrong")
        return digits
    raise ValueError("must be an ISBN-10 or ISBN-13")


def refuse_nul(text: str) -> str:
    """PostgreSQL cannot store NUL characters in text: none is accepted anywhere."""
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    return text


# Text a client sends (answers are plain str: they were checked on the way in).
Text = Annotated[str, AfterValidator(refuse_nul)]
ISBN = Annotated[str, AfterValidator(normalize_isbn)]
# Decimal, written in JSON as a string with exactly two places: "10.99", "32.97".
Amount = Annotated[
    Decimal,
    PlainSerializer(lambda amount: f"{amount:.2f}", return_type=str, when_used="json"),
    WithJsonSchema(
        {"type": "string", "pattern": r"^[0-9]+\.[0-9]{2}$", "examples": ["10.99"]},
        mode="serialization",
    ),
]
MONEY_STRING = r"^[0-9]{1,8}(\.[0-9]{1,2})?$"


def check_money(value: object) -> object:
    """Money comes as a JSON number, read as a Decimal (see ExactJSONRequest), or as
    a string that looks like one: "10.99". -0 is 0."""
    if isinstance(value, str) and not re.fullmatch(MONEY_STRING, value):
        raise ValueError('must look like "10.99": at most 8 digits, 2 decimal places')
    return value + 0 if isinstance(value, Decimal) else value


# The bounds before the BeforeValidator: pydantic checks them in its compiled core;
# after it, in Python, where every price of a page would cost more.
Price = Annotated[
    Amount,
    Field(ge=0, lt=100_000_000, decimal_places=2),
    BeforeValidator(check_money),
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
PathId = Annotated[int, Path(ge=1, le=MAX_ID, examples=[1])]


class Input(SQLModel):
    """What a client sends, a body or a list's query: an unknown field, such as a
    typo ("prise", ?autor=), is a 422."""

    model_config = {"extra": "forbid"}
    # pydantic builds a model with an __init__ of its own by calling it with the
    # client's keys as keyword arguments, and SQLModel's __new__ and __init__ have
    # parameters named "cls" and "__pydantic_self__": such a key would be a 500. An
    # input is no table, so pydantic's plain __init__ serves, which it skips.
    __init__ = BaseModel.__init__


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
        # A page sorted by price, year or age steps over the books before it in an
        # index, in the order book_queries sorts: ties broken by id.
        Index("book_price_id", "price", "id"),
        Index("book_year_id", "year", "id"),
        Index("book_created_at_id", "created_at", "id"),
        Index("book_title_folded_id", "title_folded", "id"),
        Index("book_author_folded_id", "author_folded", "id"),
        # AUTOINCREMENT: SQLite would give a deleted book's id to the next book,
        # whose ETag "1" would then name the other book's first version too.
        MYSQL_UTF8 | {"sqlite_autoincrement": True},
    )

    # index=True on the key too: an index of ids alone is a fraction of the size of
    # the table, so counting, or skipping to page 4,500, reads a fraction of the pages.
    id: int | None = Field(default=None, primary_key=True, index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # The title and author as Python's str.lower() folds them (fold_case), which
    # searches and sorts compare: each database folds case its own way (MariaDB's
    # lower() leaves 741 letters as they are, PostgreSQL's depends on its locale).
    # Nullable: a database made before them gets them at start-up, filled.
    title_folded: str | None = Field(default=None, sa_type=ExactText(400))
    author_folded: str | None = Field(default=None, sa_type=ExactText(400))
    # The book's ETag: 1 when it is added, and every UPDATE of the book adds 1 in
    # the database. (SQLAlchemy's version_id_col would count too, but it has every
    # INSERT ask the database for the version back, a round trip per create.)
    version: int = Field(default=1, sa_column_kwargs={"server_default": "1"})


class BookCreate(BookBase, Input):
    model_config = {
        "json_schema_extra": {
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
    }


# What the schema shows as an answer: a real book, as the shop would send it.
BOOK_EXAMPLE: dict[str, JsonValue] = {
    "title": "Dune",
    "author": "Frank Herbert",
    "year": 1965,
    "isbn": "9780441172719",
    "price": "10.99",
    "description": "A desert planet, and the spice that only it yields.",
    "stock": 10,
    "id": 1,
    "created_at": "2026-11-22T09:30:00Z",
    "updated_at": "2026-11-22T09:30:00Z",
    "in_stock": True,
}


class BookPublic(BookBase):
    model_config = {"json_schema_extra": {"examples": [BOOK_EXAMPLE]}}

    # Answers are not inputs: a cancel may lift the stock past what a client may
    # send, and a book stored by an earlier version keeps its ISBN as it was.
    title: str
    author: str
    isbn: str | None = Field(default=None, description="ISBN-13")
    description: str | None = None
    stock: int = Field(default=0, description="Copies on hand")
    id: int
    created_at: datetime
    updated_at: datetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def in_stock(self) -> bool:
        return self.stock > 0


def without_null(schema: dict[str, Any]) -> None:
    """The schema of a field that may be left out, but not sent as null."""
    kinds = [kind for kind in schema.pop("anyOf") if kind != {"type": "null"}]
    schema.update(kinds[0] if len(kinds) == 1 else {"anyOf": kinds})


NOT_NULL = {"json_schema_extra": without_null}


class BookUpdate(Input):
    model_config = {
        "json_schema_extra": {"examples": [{"price": "44.99", "stock": 12}]},
    }

    # None: a field not sent. Only the nullable ones may be sent as null (not_null).
    title: Text | None = Field(
        default=None, min_length=1, max_length=200, schema_extra=NOT_NULL
    )
    author: Text | None = Field(
        default=None, min_length=1, max_length=200, schema_extra=NOT_NULL
    )
    year: StrictInt | None = Field(default=None, ge=0, le=2100, schema_extra=NOT_NULL)
    isbn: ISBN | None = None
    price: Price | None = Field(default=None, schema_extra=NOT_NULL)
    description: Text | None = Field(default=None, max_length=2000)
    stock: Stock | None = Field(default=None, schema_extra=NOT_NULL)

    @field_validator("title", "author", "year", "price", "stock")
    @classmethod
    def not_null(cls, value: T | None) -> T:
        if value is None:  # a default is not validated: this is a null sent
            raise ValueError("may be left out, but not null")
        return value


class StockChange(Input):
    model_config = {"json_schema_extra": {"examples": [{"delta": 5}]}}

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
    model_config = {
        "json_schema_extra": {
            "examples": [{"book_id": 1, "stock": 10, "in_stock": True}]
        }
    }

    book_id: int
    stock: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def in_stock(self) -> bool:
        return self.stock > 0


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
    order_id: int | None = Field(
        default=None, foreign_key="order.id", index=True, nullable=False
    )
    title: str
    unit_price: Decimal = Field(sa_type=Money(10))
    line_total: Decimal = Field(sa_type=Money(15))


class OrderItemCreate(OrderItemBase, Input):
    pass


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
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime, index=True
    )
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # The customer's key to this order (see order_access); none in an order that an
    # earlier version placed.
    token: str | None = Field(default=None, sa_type=ExactText(43))
    # selectin: the items of a whole page of orders come in one more query, not
    # one per order.
    items: list[OrderItem] = Relationship(
        sa_relationship_kwargs={"lazy": "selectin", "order_by": "OrderItem.id"}
    )


class OrderCreate(OrderBase, Input):
    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "customer": "ada@example.com",
                    "items": [{"book_id": 1, "quantity": 2}],
                }
            ]
        },
    }

    items: list[OrderItemCreate] = Field(min_length=1, max_length=100)

    @field_validator("items")
    @classmethod
    def one_line_per_book(cls, items: list[OrderItemCreate]) -> list[OrderItemCreate]:
        if len({item.book_id for item in items}) < len(items):
            raise ValueError(
                "each book may appear only once; raise its quantity instead"
            )
        return items


ORDER_EXAMPLE: dict[str, JsonValue] = {
    "customer": "ada@example.com",
    "id": 1,
    "status": "pending",
    "items": [
        {
            "book_id": 1,
            "quantity": 2,
            "title": "Dune",
            "unit_price": "10.99",
            "line_total": "21.98",
        }
    ],
    "total": "21.98",
    "created_at": "2026-11-22T09:45:00Z",
    "updated_at": "2026-11-22T09:45:00Z",
}


class OrderPublic(OrderBase):
    model_config = {"json_schema_extra": {"examples": [ORDER_EXAMPLE]}}

    customer: str
    id: int
    status: OrderStatus
    items: list[OrderItemPublic]
    total: Amount
    created_at: datetime
    updated_at: datetime


class OrderPlaced(OrderPublic):
    """The answer to POST /orders: the order, and its own token."""

    model_config = {
        "json_schema_extra": {
            "examples": [ORDER_EXAMPLE | {"token": "b4X0oZ8pQeYw3nT6LkR2sA"}]
        }
    }

    token: str | None = Field(
        description="Opens this order (Authorization: Bearer <token>) for the"
        " customer who placed it: GET and DELETE /orders/{id}. Null for an order"
        " placed by an earlier version of the service",
    )


class StatusChange(Input):
    model_config = {"json_schema_extra": {"examples": [{"status": "confirmed"}]}}

    status: OrderStatus


# --- Retries ----------------------------------------------------------------------


class KeyedRequest(SQLModel, table=True):
    """A request sent with an Idempotency-Key, and the book or order it made or
    changed: a retry with the same key is answered with that, as it is now."""

    __tablename__ = "keyed_request"
    __table_args__ = (Index("keyed_request_result_id", "result_id"), MYSQL_UTF8)
    # A key belongs to its route: the same key on an order and on a restock is two.
    route: str = Field(primary_key=True, max_length=20)
    key: str = Field(primary_key=True, sa_type=ExactText(255))
    request_hash: str = Field(max_length=64)
    result_id: int | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# Keys whose book has been deleted keep its id negated: see delete_book.
BOOK_ROUTES = ("create_book", "change_stock")
FORGET_BOOK_KEYS = (
    update(KeyedRequest)
    .where(
        col(KeyedRequest.route).in_(BOOK_ROUTES),
        col(KeyedRequest.result_id) == bindparam("book_id"),
    )
    .values(result_id=-col(KeyedRequest.result_id))
)


class FieldError(SQLModel):
    type: str
    loc: list[str | int]
    msg: str


class ValidationErrors(SQLModel):
    """A 422, as validation_error writes it: the first errors, without the input."""

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "detail": [
                        {
                            "type": "missing",
                            "loc": ["body", "price"],
                            "msg": "Field required",
                        }
                    ]
                }
            ]
        }
    }

    detail: list[FieldError]


class Message(SQLModel):
    model_config = {
        "json_schema_extra": {"examples": [{"detail": "Book 42 not found"}]}
    }

    detail: str


class ServiceInfo(SQLModel):
    model_config = {
        "json_schema_extra": {
            "examples": [{"name": "BookStore", "version": "1.0.0", "docs": "/docs"}]
        }
    }

    name: str
    version: str
    docs: str


class HealthStatus(SQLModel):
    model_config = {"json_schema_extra": {"examples": [{"status": "ok"}]}}

    status: Literal["ok"]


class Page(Input):
    offset: int = Field(default=0, ge=0, le=1_000_000)
    limit: int = Field(default=20, ge=1, le=100)


Sort = Literal[
    "id", "-id", "title", "-title", "author", "-author",
    "year", "-year", "price", "-price", "created_at", "-created_at",
]  # fmt: skip


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
    sort: Sort = Field(
        default="id",
        description="A field, - first for descending",
        # Names for a generated client: PRICE_DESC, not VALUE_9.
        schema_extra={"json_schema_extra": {"x-enum-varnames": [
            name.lstrip("-").upper() + "_DESC" * name.startswith("-")
            for name in get_args(Sort)
        ]}},
    )  # fmt: skip


class OrderFilter(Page):
    status: OrderStatus | None = None
    customer: Text | None = Field(
        default=None, max_length=200, description="Exact match"
    )


# --- The app ----------------------------------------------------------------------


def get_session() -> Iterator[Session]:
    # expire_on_commit=False: the answer is made from the endpoint's objects after
    # the commit, and they stay as they were.
    with Session(engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if ADMIN_TOKEN is None:
        log.warning(
            "BOOKSTORE_ADMIN_TOKEN is not set: anyone may change the catalogue "
            "and orders (demo mode)"
        )
    async with start_up():  # the tables up to date; abandoned orders given back
        yield
    # Requests in flight have finished. Closing the connections makes SQLite fold
    # its write-ahead log into the database file, which then holds every change.
    engine.dispose()


app = FastAPI(
    title="BookStore",
    version="1.0.0",
    description="A book catalogue, its stock and its orders.",
    contact={"name": "The BookStore team"},
    license_info={"name": "MIT", "identifier": "MIT"},
    servers=[{"url": "/", "description": "This service"}],
    openapi_tags=[
        {"name": "books", "description": "The catalogue"},
        {"name": "stock", "description": "Copies on hand"},
        {"name": "orders", "description": "Orders and their statuses"},
        {"name": "service", "description": "The service itself"},
    ],
    # Operation ids are the endpoints' names (create_book, place_order ...), the
    # method names of a client generated from the schema.
    generate_unique_id_function=lambda route: route.name,
    lifespan=lifespan,
    redirect_slashes=False,  # SameWithTrailingSlash answers /books/ directly
    # A body sent without a Content-Type is read as JSON (one of another type is a
    # 415: see ShopRoute).
    strict_content_type=False,
)


bearer = HTTPBearer(
    auto_error=False, description="The BOOKSTORE_ADMIN_TOKEN of the service"
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def is_admin(credentials: HTTPAuthorizationCredentials | None) -> bool:
    """Whether the service has no admin token (demo mode), or was sent it."""
    if ADMIN_TOKEN is None:
        return True
    token = credentials.credentials if credentials else ""
    # compare_digest takes as long for a wrong first character as for a wrong last one.
    return secrets.compare_digest(token.encode(), ADMIN_TOKEN.encode())


def unauthorized() -> HTTPException:
    return HTTPException(
        401, "Missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"}
    )


async def require_admin(credentials: Credentials) -> None:
    """Let the request through if the service has no admin token, or was sent it."""
    if not is_admin(credentials):
        raise unauthorized()


# Routes that change the catalogue or touch orders are the shop's, not the
# customers': they depend on ADMIN. The others are open, also in the schema.
ADMIN = Depends(require_admin)

# An order's own token opens that order to the customer who placed it.
order_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="OrderToken",
    description="An order's own token, from the answer to POST /orders",
)


async def order_access(
    credentials: Credentials,
    # The same Authorization header, read again so that the schema names the order's
    # token as a second way into these routes.
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(order_bearer)],
) -> str | None:
    """Who opens an order: the admin (None), or a customer with the token the order
    must have (check_order_token). Without a token, 401."""
    if is_admin(credentials):
        return None
    if credentials is None:
        raise unauthorized()
    return credentials.credentials


OrderAccess = Annotated[str | None, Depends(order_access)]


def header(description: str, kind: str = "string") -> dict[str, Any]:
    """An answer's header, in the OpenAPI schema."""
    return {"description": description, "schema": {"type": kind}}


LOCATION = {"Location": header("The new resource's path")}
TOTAL_COUNT = {"X-Total-Count": header("How many match in all", "integer")}
ETAG = {"ETag": header("The book's version, for If-Match and If-None-Match")}
NOT_MODIFIED = {
    "description": "If-None-Match names the current version",
    "headers": ETAG,
}

# Request headers: conditions on the book's ETag (RFC 9110 §13), and the key that
# makes a retry safe. Endpoints read them from the request, and routes declare them
# in the schema (reads): as Header parameters, FastAPI would check each of them on
# every request, which costs a read of a book more than it is worth.
# An Idempotency-Key: 1 to 255 printable ASCII characters (checked in claim_key).
KEY_PATTERN = r"^[\x20-\x7e]{1,255}$"
REQUEST_HEADERS: dict[str, dict[str, Any]] = {
    "If-Match": {"description": "ETags, or *: unless the book's is one of them, 412"},
    "If-None-Match": {"description": "ETags, or *: if the book's is one, 304"},
    "Idempotency-Key": {
        "description": "A retry with the same key gets the first one's result back",
        "schema": {"type": "string", "pattern": KEY_PATTERN},
    },
}


def reads(*names: str) -> dict[str, Any]:
    """The OpenAPI entries of the request headers a route reads."""
    return {
        "parameters": [
            {"name": name, "in": "header", "schema": {"type": "string"}}
            | REQUEST_HEADERS[name]
            for name in names
        ]
    }


Answers = dict[int | str, dict[str, Any]]  # a route's answers in the schema


def answers(*status_codes: int) -> Answers:
    """The OpenAPI entries of a route's own error answers, each {"detail": "..."}.
    A 412 names the book's ETag."""
    entries: Answers = {code: {"model": Message} for code in status_codes}
    if 412 in entries:
        entries[412]["headers"] = ETAG
    return entries


UNAVAILABLE = {
    "model": Message,
    "headers": {"Retry-After": header("Seconds to wait", "integer")},
}


class ExactJSONRequest(Request):
    """A request whose JSON body must be UTF-8, and whose numbers are read exactly:
    as a float, 10.999999999999999999 would become 11.0, a price nobody sent."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:  # a NUL byte is never JSON: UTF-16 or UTF-32 text has them
                text = body.decode() if b"\x00" not in body else None
            except UnicodeDecodeError:
                text = None
            if text is None:
                raise HTTPException(400, "Request body is not UTF-8")
            value = json.loads(text, parse_float=Decimal)
            # A number alone is no body: pydantic refuses a float for a model, but
            # would read a Decimal as an object, with none of BookUpdate's fields.
            self._json = float(value) if isinstance(value, Decimal) else value
        return self._json


# A route that can answer 412 reads If-Match, and one that can answer 304
# If-None-Match: ShopRoute declares them.
CONDITIONS = {412: "If-Match", 304: "If-None-Match"}


class ShopRoute(APIRoute):
    """A route of the shop, which reads its body with ExactJSONRequest.

    An endpoint that takes a session runs as one unit of work (see in_transaction):
    in a worker thread, with a session from get_session, committed once when the
    endpoint returns, run again whole after a transient conflict, and answered with
    503 when the database fails or gives no answer within DB_TIMEOUT. The answers
    that follow from what a route takes are declared here, once: 503 with a
    session, 401 with ADMIN or OrderAccess (without them, the route is open), 400,
    408, 413 and 415 with a body, 422 with any parameter; a route that answers 412
    reads If-Match, and one that answers 304 If-None-Match.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any):
        takes = signature(endpoint)
        parameters = takes.parameters.values()
        annotations = [p.annotation for p in parameters]
        own = kwargs["responses"] or {}
        shared: Answers = {}
        # A body is a model of what a client sends (a list's query is Annotated).
        if any(isinstance(a, type) and issubclass(a, Input) for a in annotations):
            shared |= answers(400, 408, 413, 415)
        extra = kwargs["openapi_extra"] or {}
        if ADMIN in kwargs["dependencies"] or OrderAccess in annotations:
            shared |= answers(401)
        else:
            extra = {"security": []} | extra
        conditions = [name for code, name in CONDITIONS.items() if code in own]
        if conditions:
            headers = reads(*conditions)["parameters"] + extra.get("parameters", [])
            extra = extra | {"parameters": headers}
        kwargs["openapi_extra"] = extra or None
        if any(p.name not in ("session", "request", "response") for p in parameters):
            shared[422] = {"model": ValidationErrors, "description": "Validation Error"}
        if "session" in takes.parameters:
            shared[503] = UNAVAILABLE
            run, write = endpoint, not set(kwargs["methods"]) <= {"GET", "HEAD"}
            # A list's page and its count must see one state of the database.
            snapshot = get_origin(kwargs["response_model"]) is list

            @functools.wraps(run)
            async def unit_of_work(**values: Any) -> Any:
                return await in_transaction(run, values, write, snapshot)

            # FastAPI reads what to pass from this signature: all but the session,
            # which each attempt gets from get_session.
            unit_of_work.__signature__ = takes.replace(  # type: ignore[attr-defined]
                parameters=[p for p in parameters if p.name != "session"]
            )
            endpoint = unit_of_work
        # The route's own success first, then every other answer by its code.
        success = str(kwargs["status_code"] or 200)
        responses = sorted(
            (shared | own).items(), key=lambda e: (str(e[0]) != success, str(e[0]))
        )
        kwargs["responses"] = dict(responses)
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        reads_body = self.body_field is not None

        async def read_exactly(request: Request) -> Response:
            # A body is JSON: sent as a form (curl -d), it would be read as bytes.
            content_type = request.headers.get("content-type")
            if reads_body and content_type is not None:
                media_type = content_type.partition(";")[0].strip().lower()
                kind, _, subtype = media_type.partition("/")
                if kind != "application" or not (
                    subtype == "json" or subtype.endswith("+json")
                ):
                    raise HTTPException(
                        415, "Request body must be JSON: Content-Type: application/json"
                    )
            return await handler(ExactJSONRequest(request.scope, request.receive))

        return read_exactly


# Every route below runs its endpoint as the unit of work that ShopRoute makes of
# it: the endpoint works with its session, and its changes are committed once, by
# UnitOfWork.attempt, when it returns. Each router carries its tag.
service = APIRouter(tags=["service"], route_class=ShopRoute)
books = APIRouter(prefix="/books", tags=["books"], route_class=ShopRoute)
stock = APIRouter(
    prefix="/books/{book_id}/stock", tags=["stock"], route_class=ShopRoute
)
orders = APIRouter(prefix="/orders", tags=["orders"], route_class=ShopRoute)


# --- Service ----------------------------------------------------------------------


@service.get("/")
async def read_service_info() -> ServiceInfo:
    """The service's name and version, and where its interactive docs are."""
    return ServiceInfo(name=app.title, version=app.version, docs="/docs")


@service.get("/health")
def check_health(session: SessionDep) -> HealthStatus:
    """200 after a round trip to the database; 503 when it cannot be reached."""
    session.exec(select(1)).one()
    return HealthStatus(status="ok")


# --- Books ------------------------------------------------------------------------


# A retry with the key of a request made already gets its result back, with 200.
CREATED_BOOK: Answers = {
    201: {"headers": LOCATION | ETAG},
    200: {"model": BookPublic, "description": "A retry", "headers": ETAG},
}
KEYED = reads("Idempotency-Key")


@books.post(
    "",
    status_code=201,
    response_model=BookPublic,
    responses=answers(404, 409) | CREATED_BOOK,
    dependencies=[ADMIN],
    openapi_extra=KEYED,
)
def create_book(
    book: BookCreate, session: SessionDep, request: Request, response: Response
) -> Book | Row[Any]:
    """Add a book to the catalogue; an ISBN-10 is stored as its ISBN-13. A retry
    with the same Idempotency-Key gets the same book back (200)."""
    key = claim_key(session, "create_book", request, book.model_dump_json())
    if key and key.result_id:  # a retry
        response.status_code = 200
        return send_etag(response, read_book_or_404(session, key.result_id))
    now = utcnow()
    db_book = Book.model_validate(book, update={"created_at": now, "updated_at": now})
    save_book(session, db_book)
    if key:
        key.result_id = db_book.id
    response.headers["Location"] = f"/books/{db_book.id}"
    return send_etag(response, db_book)


COUNTED: Answers = {200: {"headers": TOTAL_COUNT}}


@books.get("", response_model=list[BookPublic], responses=COUNTED)
def list_books(
    filters: Annotated[BookFilter, Query()], session: SessionDep, response: Response
) -> Sequence[Row[Any]]:
    """A page of the catalogue, filtered and sorted; X-Total-Count says how many
    books match in all."""
    values = filters.model_dump(exclude_none=True, exclude={"offset", "limit", "sort"})
    q = values.pop("q", "").lower()  # folded as the titles are (Book.title_folded)
    dialect = session.get_bind().dialect
    if len(q) >= 3 and dialect.name == "sqlite":
        # The trigram index finds a quoted phrase anywhere in the folded text:
        # the same books as the LIKE of q, without a scan.
        values["phrase"] = '"' + q.replace('"', '""') + '"'
    elif q:
        values["q"] = like_pattern(q)
    if filters.author is not None:
        values["author"] = like_pattern(filters.author.lower())
    count, count_from, page = book_queries(frozenset(values), filters.sort)
    # Rows, not Book objects, as in read_book.
    connection = session.connection()
    offset, limit = filters.offset, filters.limit
    found = connection.execute(page, values | {"offset": offset, "limit": limit}).all()
    if len(found) < limit and (found or not offset):
        total = offset + len(found)  # the last page: no count needed
    elif found and offset and count_from is not None and dialect.name != "sqlite":
        # PostgreSQL and MariaDB visit every row they count, and the page has just
        # visited the `offset` books before it: count only those from it on.
        # (SQLite counts a whole table from its pages, faster than any part of it.)
        after = connection.execute(count_from, values | {"first": found[0].id})
        total = offset + after.scalar_one()
    else:
        total = connection.execute(count, values).scalar_one()
    response.headers["X-Total-Count"] = str(total)
    return found


def like_pattern(text: str) -> str:
    """A LIKE pattern (ESCAPE '/') that finds `text` anywhere; % and _ are plain."""
    return "%" + text.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"


# The filters of a list of books, each a condition on a parameter of its own name.
# Like every statement an endpoint runs, these are built once (for each combination
# of filters and sort, by book_queries) and run with the values of each request.
BOOK_CONDITIONS = {
    "q": col(Book.title_folded).like(bindparam("q"), escape="/")
    | col(Book.author_folded).like(bindparam("q"), escape="/"),
    # On SQLite, a q of 3 or more characters, looked up in book_search instead.
    "phrase": col(Book.id).in_(
        sql_text(
            "SELECT rowid FROM book_search WHERE book_search MATCH :phrase"
        ).columns(column("rowid"))
    ),
    "author": col(Book.author_folded).like(bindparam("author"), escape="/"),
    "in_stock": (col(Book.stock) > 0) == bindparam("in_stock"),
    "min_price": col(Book.price) >= bindparam("min_price"),
    "max_price": col(Book.price) <= bindparam("max_price"),
    "year": col(Book.year) == bindparam("year"),
}


@cache
def book_queries(
    filters: frozenset[str], sort: str
) -> tuple[SelectOfScalar[int], SelectOfScalar[int] | None, SelectOfScalar[Book]]:
    """Statements that count the books matching `filters` (all of them, and, in id
    order only, those from the id `first` on), and read a page of them."""
    conditions = [BOOK_CONDITIONS[name] for name in BOOK_CONDITIONS if name in filters]
    count = select(func.count()).select_from(Book).where(*conditions)
    sort_field = sort.lstrip("-")
    if sort_field in ("title", "author"):  # by the folded text: the same everywhere
        field: ColumnElement[Any] = getattr(Book, f"{sort_field}_folded")
    else:
        field = getattr(Book, sort_field)
    descending = sort.startswith("-")
    order_by = [field.desc() if descending else field.asc()]
    count_from = None
    if sort_field == "id":  # the books from a page's first one on: a range of ids
        first = bindparam("first", type_=Integer())
        from_first = col(Book.id) <= first if descending else col(Book.id) >= first
        count_from = count.where(from_first)
    else:  # ties are broken by id, in the same direction: pages never overlap
        order_by.append(col(Book.id).desc() if descending else col(Book.id).asc())
    # The page's ids first, then their rows: skipping 90,000 books is cheap in the
    # index of ids and slow in the table, whose rows are large.
    ids_in_order = select(Book.id).where(*conditions).order_by(*order_by)
    if not conditions and sort_field == "id":
        # Told nothing, MariaDB steps over the books in its primary key, which holds
        # whole rows: slower than its index of ids.
        for dialect in ("mysql", "mariadb"):
            ids_in_order = ids_in_order.with_hint(
                Book, "FORCE INDEX (ix_book_id)", dialect
            )
    ids = ids_in_order.offset(bindparam("offset")).limit(bindparam("limit")).subquery()
    page = select(Book).join(ids, col(Book.id) == ids.c.id)
    return count, count_from, page.order_by(*order_by)


CACHED: Answers = {200: {"headers": ETAG}, 304: NOT_MODIFIED}


@books.get("/{book_id}", response_model=BookPublic, responses=answers(404) | CACHED)
def read_book(
    book_id: PathId, session: SessionDep, request: Request, response: Response
) -> Row[Any]:
    """One book of the catalogue; 304 if the client has its current version."""
    return send_etag(response, read_book_or_404(session, book_id), request)


WITH_ETAG: Answers = {200: {"headers": ETAG}}


@books.patch(
    "/{book_id}",
    response_model=BookPublic,
    responses=answers(404, 409, 412) | WITH_ETAG,
    dependencies=[ADMIN],
)
@books.put(
    "/{book_id}",
    response_model=BookPublic,
    responses=answers(404, 409, 412) | WITH_ETAG,
    dependencies=[ADMIN],
    summary="Update Book (PUT, the same as PATCH)",
    operation_id="update_book_with_put",
)
def update_book(
    book_id: PathId,
    book: BookUpdate,
    session: SessionDep,
    request: Request,
    response: Response,
) -> Book:
    """Only the fields sent change; `stock` sets an absolute number of copies."""
    db_book = lock_book(session, book_id, request)
    # exclude_unset: only the fields the client sent, so the others stay as they are.
    # The database adds 1 to the version, as every UPDATE of a book does.
    db_book.sqlmodel_update(
        book.model_dump(exclude_unset=True),
        update={"updated_at": utcnow(), "version": col(Book.version) + 1},
    )
    return send_etag(response, save_book(session, db_book))


@books.delete(
    "/{book_id}",
    status_code=204,
    responses=answers(404, 409, 412),
    dependencies=[ADMIN],
)
def delete_book(book_id: PathId, session: SessionDep, request: Request) -> None:
    """Delete a book that no order names (order history is never lost)."""
    session.delete(lock_book(session, book_id, request))
    try:
        session.flush()
    except IntegrityError:  # order_item's foreign key: order history is never lost
        raise HTTPException(
            409, f"Book {book_id} is in orders and cannot be deleted"
        ) from None
    # A retry of the request that made or restocked it is a 404 from now on, even
    # where a new book gets its id (SQLite files made before AUTOINCREMENT).
    session.exec(FORGET_BOOK_KEYS, params={"book_id": book_id})


def book_not_found(book_id: int) -> HTTPException:
    return HTTPException(404, f"Book {book_id} not found")


# Built once, with the id as a parameter: building a statement takes SQLAlchemy
# longer than SQLite takes to run it. Every statement an endpoint runs on each
# request is built once, as this one is.
BOOK_BY_ID = select(Book).where(col(Book.id) == bindparam("id"))


def read_book_or_404(session: Session, book_id: int) -> Row[Any]:
    """The book as a row: run on the connection, a select gives plain rows, not
    the objects a session builds and tracks. Less work, and FastAPI reads the
    response model's fields from a row as from an object."""
    row = session.connection().execute(BOOK_BY_ID, {"id": book_id}).first()
    if row is None:
        raise book_not_found(book_id)
    return row


# The book's row, locked until the commit (lock_book). MariaDB's UPDATEs of a book
# go through its index of ids, then its row: a lock taken through the primary key
# first, as MariaDB would, is taken in the other order, and two requests deadlock.
BOOK_FOR_UPDATE = (
    select(Book)
    .where(col(Book.id) == bindparam("id"))
    .with_for_update()
    .with_hint(Book, "FORCE INDEX (ix_book_id)", "mysql")
    .with_hint(Book, "FORCE INDEX (ix_book_id)", "mariadb")
)


def lock_book(session: Session, book_id: int, request: Request) -> Book:
    """The book, which no other request can change until this one commits: the
    If-Match it was sent is checked against the book it changes (412 if none of
    its ETags is the book's). 404 before 412: a missing book has no ETag."""
    # FOR UPDATE locks the book's row; SQLite's whole database is locked already,
    # from the start of every write (lock_sqlite_for_writing).
    book = session.exec(BOOK_FOR_UPDATE, params={"id": book_id}).first()
    if book is None:
        raise book_not_found(book_id)
    current = etag(book)
    if_match = header_list(request, "If-Match")
    if if_match is not None and not names_etag(if_match, current, weak=False):
        raise HTTPException(
            412,
            f"Book {book_id} has changed: its ETag is now {current}",
            headers={"ETag": current},
        )
    return book


def save_book(session: Session, book: Book) -> Book:
    """Write `book` (a new one gets its id); a second book with the same ISBN is a
    409, not a 500."""
    isbn = book.isbn  # a failed flush leaves the book unreadable
    session.add(book)
    try:
        session.flush()
    except IntegrityError:
        raise HTTPException(409, f"A book with ISBN {isbn} already exists") from None
    return book


def etag(book: Book | Row[Any]) -> str:
    """The book's strong ETag: its version, which every committed change raises."""
    return f'"{book.version}"'


def names_etag(header: str, current: str, weak: bool) -> bool:
    """Whether an If-Match or If-None-Match header, a list of ETags, names the
    book's `current` ETag or is *. The weak comparison (If-None-Match) takes W/"1"
    to name "1"."""
    tags = {tag.strip() for tag in header.split(",")}
    if weak:
        tags = {tag.removeprefix("W/") for tag in tags}
    return "*" in tags or current in tags


def header_list(request: Request, name: str) -> str | None:
    """A list header, however many lines it came in: one comma-separated list
    (RFC 9110 section 5.3)."""
    lines = request.headers.getlist(name)
    return ", ".join(lines) if lines else None


def send_etag(
    response: Response, book: BookOrRow, request: Request | None = None
) -> BookOrRow:
    """Answer with the book's ETag; or, when the request's If-None-Match names it,
    with 304 Not Modified and no body: the client has this version already."""
    response.headers["ETag"] = current = etag(book)
    if_none_match = header_list(request, "If-None-Match") if request else None
    if if_none_match is not None and names_etag(if_none_match, current, weak=True):
        raise HTTPException(304, headers={"ETag": current})
    return book


def claim_key(
    session: Session, route: str, request: Request, content: str
) -> KeyedRequest | None:
    """Claim the request's Idempotency-Key before the request changes anything, or
    find the request that claimed it first: its result_id, set, is what a retry
    is answered with. `content`: what makes two requests the same. A key that is
    not 1 to 255 printable ASCII characters, or that came with other content, is
    a 422; so are two keys. A key whose book has been deleted since is a 404."""
    keys = request.headers.getlist("Idempotency-Key")
    if not keys:
        return None
    if len(keys) > 1:
        raise idempotency_key_error("must be sent once")
    key = keys[0]
    if not re.fullmatch(KEY_PATTERN, key):
        raise idempotency_key_error("must be 1 to 255 printable ASCII characters")
    request_hash = hashlib.sha256(content.encode()).hexdigest()
    while True:
        claimed = session.get(KeyedRequest, (route, key))
        if claimed is not None:
            if claimed.request_hash != request_hash:
                raise idempotency_key_error("was used with a different request")
            if claimed.result_id is not None and claimed.result_id < 0:
                raise book_not_found(-claimed.result_id)  # see delete_book
            return claimed
        claim = KeyedRequest(route=route, key=key, request_hash=request_hash)
        session.add(claim)
        try:
            # A concurrent retry waits here, at the key's primary key, until the
            # first request commits, and then finds it; it is never told that the
            # last copies are gone, nor makes a second book.
            session.flush()
            return claim
        except IntegrityError:
            session.rollback()  # and again: now the key finds that request


def idempotency_key_error(message: str) -> RequestValidationError:
    error = {"type": "idempotency_key", "loc": ("header", "Idempotency-Key")}
    return RequestValidationError([error | {"msg": f"Idempotency-Key {message}"}])


# --- Stock ------------------------------------------------------------------------


@stock.get("", response_model=StockPublic, responses=answers(404) | CACHED)
def read_stock(
    book_id: PathId, session: SessionDep, request: Request, response: Response
) -> StockPublic:
    """How many copies of the book are on hand."""
    book = send_etag(response, read_book_or_404(session, book_id), request)
    return StockPublic(book_id=book_id, stock=book.stock)


@stock.post(
    "",
    response_model=StockPublic,
    responses=answers(404, 409, 412) | WITH_ETAG,
    dependencies=[ADMIN],
    openapi_extra=KEYED,
)
def change_stock(
    book_id: PathId,
    change: StockChange,
    session: SessionDep,
    request: Request,
    response: Response,
) -> StockPublic:
    """Add copies (delta > 0) or take them off (delta < 0), atomically; never
    below 0, and a restock never above 1,000,000,000. A retry with the same
    Idempotency-Key changes nothing again."""
    content = f"{book_id} {change.model_dump_json()}"
    key = claim_key(session, "change_stock", request, content)
    if not (key and key.result_id):  # not a retry, whose change is made already
        book = lock_book(session, book_id, request)
        # One conditional UPDATE: the database checks and changes the stock in a
        # single step, so concurrent changes can neither be lost nor go below 0. A
        # write-off needs no upper bound: a cancel may have lifted the stock past it.
        delta = change.delta
        new_stock = col(Book.stock) + delta
        within_range = new_stock >= 0 if delta < 0 else new_stock <= MAX_STOCK
        changed = session.exec(
            update(Book)
            .where(col(Book.id) == book_id, within_range)
            .values(stock=new_stock, version=col(Book.version) + 1, updated_at=utcnow())
        ).rowcount
        if not changed:
            raise HTTPException(
                409,
                f"Stock of book {book_id} is {book.stock}: a change of {delta} "
                f"would take it outside 0..{MAX_STOCK}",
            )
        if key:
            key.result_id = book_id
    row = send_etag(response, read_book_or_404(session, book_id))
    return StockPublic(book_id=book_id, stock=row.stock)


# --- Orders -----------------------------------------------------------------------


PLACED_ORDER: Answers = {
    201: {"headers": LOCATION},
    200: {"model": OrderPlaced, "description": "A retry"},
}


@orders.post(
    "",
    status_code=201,
    response_model=OrderPlaced,
    responses=answers(404, 409) | PLACED_ORDER,
    openapi_extra=KEYED,
)
def place_order(
    order_in: OrderCreate, session: SessionDep, request: Request, response: Response
) -> Order:
    """Take the copies and record the order, all or nothing; a retry with the same
    Idempotency-Key gets the same order back (200). The answer carries the order's
    own token, which opens it to the customer (GET and DELETE /orders/{id})."""
    key = claim_key(session, "place_order", request, order_in.model_dump_json())
    if key and key.result_id:  # a retry
        response.status_code = 200
        return read_order_or_404(session, key.result_id)
    now = utcnow()
    order = Order(
        customer=order_in.customer,
        total=Decimal(0),
        created_at=now,
        updated_at=now,
        token=secrets.token_urlsafe(16),  # 128 random bits
    )
    session.add(order)
    session.flush()  # the order gets its id, for its Location and its key
    # Books in id order: two orders lock the books they share in the same order,
    # so they never deadlock.
    connection = session.connection()
    for item in sorted(order_in.items, key=lambda item: item.book_id):
        copies = {"book_id": item.book_id, "quantity": item.quantity, "now": now}
        if not connection.execute(TAKE_COPIES, copies).rowcount:
            book = read_book_or_404(session, item.book_id)
            raise HTTPException(
                409,
                f"Not enough stock for book {book.id} ({book.title}): "
                f"asked {item.quantity}, available {book.stock}",
            )
    book_ids = [item.book_id for item in order_in.items]
    titles_and_prices = connection.execute(TITLES_AND_PRICES, {"ids": book_ids})
    found = {book.id: book for book in titles_and_prices}
    order.items = [
        OrderItem(
            book_id=item.book_id,
            quantity=item.quantity,
            title=found[item.book_id].title,
            unit_price=found[item.book_id].price,
            line_total=found[item.book_id].price * item.quantity,
        )
        for item in order_in.items
    ]
    order.total = sum((item.line_total for item in order.items), Decimal(0))
    if key:
        key.result_id = order.id
    response.headers["Location"] = f"/orders/{order.id}"
    return order


# Copies are taken in one statement that checks and
# changes the stock together: two orders for the last copy cannot both get it.
TAKE_COPIES = (
    update(Book)
    .where(
        col(Book.id) == bindparam("book_id"), col(Book.stock) >= bindparam("quantity")
    )
    .values(
        stock=col(Book.stock) - bindparam("quantity"),
        version=col(Book.version) + 1,
        updated_at=bindparam("now"),
    )
)
TITLES_AND_PRICES = select(col(Book.id), col(Book.title), col(Book.price)).where(
    col(Book.id).in_(bindparam("ids", expanding=True))
)


@orders.get(
    "", response_model=list[OrderPublic], responses=COUNTED, dependencies=[ADMIN]
)
def list_orders(
    filters: Annotated[OrderFilter, Query()], session: SessionDep, response: Response
) -> Sequence[Order]:
    """A page of orders, newest first; X-Total-Count says how many match in all."""
    conditions: list[ColumnElement[bool]] = []
    if filters.status is not None:
        conditions.append(col(Order.status) == filters.status)
    if filters.customer is not None:
        conditions.append(col(Order.customer) == filters.customer)
    total = session.exec(
        select(func.count()).select_from(Order).where(*conditions)
    ).one()
    response.headers["X-Total-Count"] = str(total)
    newest_first = col(Order.created_at).desc(), col(Order.id).desc()
    query = select(Order).where(*conditions).order_by(*newest_first)
    return session.exec(query.offset(filters.offset).limit(filters.limit)).all()


@orders.get("/{order_id}", response_model=OrderPublic, responses=answers(404))
def read_order(order_id: PathId, session: SessionDep, token: OrderAccess) -> Order:
    """One order, with its items, for the admin or the order's own token."""
    check_order_token(session, order_id, token)
    return read_order_or_404(session, order_id)


@orders.patch(
    "/{order_id}/status",
    response_model=OrderPublic,
    responses=answers(404, 409),
    dependencies=[ADMIN],
)
def change_order_status(
    order_id: PathId, change: StatusChange, session: SessionDep
) -> Order:
    """Only the moves of the status table; to `cancelled`, the stock comes back."""
    return move_order(session, order_id, change.status, repeat_ok=False)


@orders.delete("/{order_id}", response_model=OrderPublic, responses=answers(404, 409))
def cancel_order(order_id: PathId, session: SessionDep, token: OrderAccess) -> Order:
    """Cancel the order and put its stock back; an order already cancelled stays
    as it is. For the admin or the order's own token."""
    check_order_token(session, order_id, token)
    return move_order(session, order_id, OrderStatus.cancelled, repeat_ok=True)


def check_order_token(session: Session, order_id: int, token: str | None) -> None:
    """A customer's token opens its own order only: any other order, or none, is a
    401 as without a token, so that a token tells nobody which orders exist."""
    if token is None:  # the admin
        return
    owner = session.exec(select(Order.token).where(col(Order.id) == order_id)).first()
    if owner is None or not secrets.compare_digest(owner.encode(), token.encode()):
        raise unauthorized()


def read_order_or_404(session: Session, order_id: int) -> Order:
    order = session.get(Order, order_id)
    if order is None:
        raise HTTPException(404, f"Order {order_id} not found")
    return order


def move_order(
    session: Session,
    order_id: int,
    new_status: OrderStatus,
    repeat_ok: bool,
    placed_before: datetime | None = None,
) -> Order:
    """Move an order to `new_status`, putting its stock back if that is `cancelled`.

    The move is one conditional UPDATE (WHERE status IN the allowed previous
    statuses): of two concurrent moves only one can match, so stock comes back once.
    With `repeat_ok`, an order already in `new_status` is answered as it is. With
    `placed_before`, only a pending order placed before it moves (its hold is up).
    """
    now = utcnow()
    previous = [old for old, nexts in NEXT_STATUSES.items() if new_status in nexts]
    may_move: ColumnElement[bool]
    if placed_before is None:
        may_move = col(Order.status).in_(previous)
    else:  # the hold is up only for an order still pending, placed before it
        may_move = (col(Order.status) == OrderStatus.pending) & (
            col(Order.created_at) < placed_before
        )
    moved = session.exec(
        update(Order)
        .where(col(Order.id) == order_id, may_move)
        .values(status=new_status, updated_at=now)
    ).rowcount
    order = read_order_or_404(session, order_id)
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
                .values(
                    stock=col(Book.stock) + item.quantity,
                    version=col(Book.version) + 1,
                    updated_at=now,
                )
            )
    return order


def cancel_expired_orders(session: Session) -> int:
    """Cancel the orders whose hold has ended and that are still pending, putting
    their copies back; how many. One confirmed or cancelled meanwhile stays so."""
    placed_before = utcnow() - timedelta(seconds=ORDER_HOLD_SECONDS)
    expired: Sequence[int] = session.exec(  # type: ignore[assignment]  # ids are set
        select(Order.id)
        .where(col(Order.status) == OrderStatus.pending)
        .where(col(Order.created_at) < placed_before)
        .order_by(col(Order.id))
        .limit(100)
    ).all()
    cancelled = 0
    for order_id in expired:
        with suppress(HTTPException):  # the 409 of an order that has moved on
            move_order(session, order_id, OrderStatus.cancelled, False, placed_before)
            cancelled += 1
    return cancelled


ROUTERS = (service, books, stock, orders)
for router in ROUTERS:
    app.include_router(router)


# --- What keeps it running: the unit of work ---------------------------------------


# The threads that talk to the database: asyncio's own executors, which are lighter
# per call than FastAPI's run_in_threadpool, at one call per request. Reads and
# writes have threads of their own: writes waiting for a book that another
# transaction holds never take a thread that a read needs.
reader_threads = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="reader")
writer_threads = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="writer")
# SQLite lets one transaction write at a time. This process's writes to SQLite run
# one after another in a thread of their own, where they queue without holding a
# thread, instead of sleeping in SQLite's busy handler. An in-memory database is
# one connection, which only one thread may use at a time: all its work runs here.
sqlite_writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")

# Conflicts that the same transaction, run again, can get past: SQLite busy;
# PostgreSQL serialization failure, deadlock, lock timeout; MySQL lock timeout,
# deadlock.
TRANSIENT_ERRORS = {"SQLITE_BUSY", "40001", "40P01", "55P03", 1205, 1213}


class DatabaseUnavailable(Exception):
    """The database failed, or gave no answer in time: the client gets a 503.
    `after_commit`: the commit was sent and no answer came back, so nobody knows
    whether it was made."""

    def __init__(self, cause: object, after_commit: bool = False):
        super().__init__(cause)
        self.after_commit = after_commit


class Conflict(Exception):
    """A transient conflict: the transaction is run again, from the start."""


def is_transient(error: DBAPIError) -> bool:
    # SQLite names its errors, PostgreSQL gives an SQLSTATE, MySQL an error number.
    orig = error.orig
    codes = {getattr(orig, "sqlite_errorname", None), getattr(orig, "sqlstate", None)}
    return not TRANSIENT_ERRORS.isdisjoint(codes | set(orig.args[:1] if orig else ()))


class UnitOfWork:
    """What a request's transaction shares between the worker thread that runs an
    attempt at it and the event loop that answers its client within DB_TIMEOUT.

    Its lock orders the two: an attempt starts and commits only while the client
    has not been answered, and the event loop answers 503 only while no commit is
    under way (or once it has waited for it in vain). The socket of the attempt's
    connection is kept as a duplicate, which always names that connection, and is
    forgotten before the connection goes back to the pool.
    """

    def __init__(self, write: bool, snapshot: bool):
        self.write = write
        self.snapshot = snapshot
        self.lock = threading.Lock()
        self.answered = False  # the client has its 503: start nothing, commit nothing
        self.committing = False
        self.socket: socket.socket | None = None

    def attempt(
        self,
        endpoint: Callable[..., T],
        kwargs: dict[str, Any],
        sessions: Generator[Session, None, None],
    ) -> T:
        """Run endpoint(**kwargs) and commit, in a worker thread, on a connection of
        this attempt's own; closing `sessions` ends get_session's block.
        Every way the transaction ends, the rollback and the connection's return
        included, is inside the mapping of errors below."""
        session: Session = kwargs["session"]
        committing = False
        try:
            with self.lock:  # waited for a thread past its deadline: touch nothing
                self.stop_if_answered()
            with closing(sessions), session.get_bind().engine.connect() as connection:
                try:
                    self.watch(connection)
                    if not self.write:  # see begin_transaction
                        connection.execution_options(
                            reads_only=True, snapshot=self.snapshot
                        )
                    session.bind = connection  # the watched one, not one of its own
                    result = endpoint(**kwargs)
                    with self.lock:
                        self.stop_if_answered()
                        # A read has nothing to lose: its commit ends it.
                        self.committing = committing = self.write
                    session.commit()
                    return result
                except BaseException:
                    with self.lock:
                        self.committing = False
                    roll_back(session)
                    raise
                finally:
                    session.close()
                    self.forget()  # before the connection goes back to the pool
        except (OperationalError, InterfaceError) as error:
            # A connection found dead before the commit: run again on a new one. One
            # lost during the commit leaves nobody knowing whether it was made.
            lost = error.connection_invalidated
            if is_transient(error) or (lost and not committing):
                raise Conflict from None
            raise DatabaseUnavailable(error.orig, committing and lost) from None

    def watch(self, connection: Connection) -> None:
        """Keep a duplicate of a psycopg connection's socket, for cut_off; or stop,
        if the client was answered while this attempt connected (cut_off has run,
        and would not run again)."""
        dbapi_connection: Any = connection.connection.dbapi_connection
        duplicate = None
        if hasattr(dbapi_connection, "fileno"):
            duplicate = socket.socket(fileno=os.dup(dbapi_connection.fileno()))
        with self.lock:
            self.socket = duplicate
            self.stop_if_answered()

    def stop_if_answered(self) -> None:
        """With the lock held: a unit whose client has had its 503 does no more."""
        if self.answered:
            raise DatabaseUnavailable(f"no answer within {DB_TIMEOUT} s")

    def forget(self) -> None:
        with self.lock:
            duplicate, self.socket = self.socket, None
        if duplicate is not None:
            duplicate.close()

    def cut_off(self) -> None:
        """Shut the socket of an attempt that has outlived DB_TIMEOUT.

        Its blocked call then fails, and the pool discards the connection. PyMySQL has
        read_timeout for this, and SQLite no socket; psycopg has no client-side timeout,
        and would wait forever for a database behind a network partition.
        """
        with self.lock, suppress(OSError):
            if self.socket is not None:
                self.socket.shutdown(socket.SHUT_RDWR)


def roll_back(session: Session) -> None:
    """Roll back; a connection that fails at it is discarded instead, since a
    transaction that was never committed has changed nothing either way."""
    try:
        session.rollback()
    except SQLAlchemyError:
        session.invalidate()


async def in_transaction(
    endpoint: Callable[..., T],
    values: dict[str, Any],
    write: bool,
    snapshot: bool = False,
) -> T:
    """Run endpoint(**values) in a worker thread, as one transaction: see ShopRoute.

    One hop to a thread per attempt: validation and JSON stay in the event loop,
    where they cost no hop. Each attempt has a session of its own, from get_session
    (or its override): a transient conflict gives its thread back and runs the
    endpoint again after a short random pause, as if for the first time, the
    status and headers of the answer as FastAPI made them. The answer comes within
    DB_TIMEOUT, whatever the database does: an attempt still running then
    (connecting, or waiting for a thread) is left to fail on its own, and can no
    longer commit. One already committing is waited for COMMIT_GRACE more, so that
    its client learns what happened; past that, nobody knows, and the 503 says so.
    """
    make_sessions = app.dependency_overrides.get(get_session, get_session)
    response: Response | None = values.get("response")
    unit = UnitOfWork(write, snapshot)
    loop = asyncio.get_running_loop()
    attempts = 0
    try:
        async with asyncio.timeout(DB_TIMEOUT):
            while True:
                attempts += 1
                # get_session, up to its yield: making a session takes no I/O.
                sessions = make_sessions()
                session = next(sessions)
                kwargs = values | {"session": session}
                engine = session.get_bind().engine
                if engine.dialect.name == "sqlite" and (
                    write or isinstance(engine.pool, StaticPool)
                ):
                    threads = sqlite_writer
                else:
                    threads = writer_threads if write else reader_threads
                args = endpoint, kwargs, sessions
                running = loop.run_in_executor(threads, unit.attempt, *args)
                try:
                    result = await asyncio.shield(running)
                    break
                except Conflict:
                    # The next attempt answers as if it were the first: the Response
                    # as FastAPI made it, with no status and no headers.
                    if response is not None:
                        response.status_code = None  # type: ignore[assignment]
                        for name in set(response.headers.keys()):
                            del response.headers[name]
                    pause = min(0.5, 0.02 * 2**attempts)
                    await asyncio.sleep(random.uniform(0, pause))  # noqa: S311 (jitter)
    except TimeoutError:
        # Whatever the attempt still running does now, nobody waits for it.
        running.add_done_callback(forget_outcome)
        with unit.lock:
            committing = unit.committing
            unit.answered = True  # from now on, no attempt starts or commits
        try:
            if not committing:
                raise
            result = await asyncio.wait_for(asyncio.shield(running), COMMIT_GRACE)
        except (TimeoutError, Conflict):  # a commit refused is a commit not made
            unit.cut_off()
            lost = committing and not running.done()
            raise DatabaseUnavailable(
                f"no answer within {DB_TIMEOUT} s", lost
            ) from None
    return result


def forget_outcome(attempt: asyncio.Future[Any]) -> None:
    """Take the outcome of an attempt nobody waits for, so that asyncio does not log
    it as "never retrieved": its client has had its answer."""
    if not attempt.cancelled():
        attempt.exception()


# --- What keeps it running: the engine, start-up and the database's text -----------


# The URLs that hosting platforms hand out name no driver: these are the drivers.
DRIVERS = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
}


def with_driver(url: str) -> str:
    """`url` with its driver named: postgres://... is postgresql+psycopg://...,
    and mysql://... is mysql+pymysql://... in full Unicode (utf8mb4)."""
    scheme, separator, rest = url.partition("://")
    if scheme not in DRIVERS:
        return url
    if DRIVERS[scheme].startswith("mysql") and "charset=" not in rest:
        rest += ("&" if "?" in rest else "?") + "charset=utf8mb4"
    return f"{DRIVERS[scheme]}{separator}{rest}"


def make_engine(url: str, for_requests: bool = True) -> Engine:
    """An engine for `url`, with every wait bounded by DB_TIMEOUT; on SQLite, set up
    so that several processes can share the file. Not `for_requests`: start-up's,
    one connection without the statement and lock timeouts (building an index on a
    large catalogue may take longer than DB_TIMEOUT)."""
    url = with_driver(url)
    # As many pooled connections as threads that talk to the database (on SQLite,
    # sqlite_writer too): no thread waits for a connection, and none opens a
    # short-lived one of its own. No pre-ping: a connection found dead runs its
    # transaction again on a new one (see UnitOfWork.attempt). No rollback when a
    # connection comes back: its transaction has ended already, by a commit or a
    # rollback, and a second one costs MySQL a round trip.
    pool: dict[str, Any] = {
        "pool_size": 2 * WORKER_THREADS,
        "max_overflow": 0,
        "pool_reset_on_return": None,
    }
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        statements, locks = round(DB_TIMEOUT * 1000), round(LOCK_WAIT * 1000)
        connect_args = {
            "connect_timeout": max(2, ceil(DB_TIMEOUT)),
            "options": f"-c statement_timeout={statements} -c lock_timeout={locks}",
        }
    elif url.startswith(("mysql", "mariadb")):
        connect_args = {
            "connect_timeout": DB_TIMEOUT,
            "read_timeout": DB_TIMEOUT,  # client-side: bounds a statement too
            "write_timeout": DB_TIMEOUT,
            # MariaDB waits for a lock whole seconds or not at all: not at all.
            "init_command": "SET innodb_lock_wait_timeout = 0",
        }
    elif url.startswith("sqlite"):
        # isolation_level=None: the driver begins no transaction itself, and
        # begin_transaction begins each one of a session (SQLAlchemy's pysqlite
        # recipe, on the session's event rather than the engine's).
        connect_args = {
            "check_same_thread": False,
            "isolation_level": None,
            "timeout": LOCK_WAIT,
        }
        pool["pool_size"] += 1
        if url == "sqlite://":  # in memory: the database lives in its one connection
            pool = {"poolclass": StaticPool, "pool_reset_on_return": None}
    if not for_requests:
        pool = {"poolclass": NullPool}
        connect_args.pop("options", None)
        connect_args.pop("init_command", None)
        connect_args.pop("read_timeout", None)
        connect_args.pop("write_timeout", None)
        if "timeout" in connect_args:
            connect_args["timeout"] = STARTUP_LOCK_WAIT
    # hide_parameters: no log line shows a statement's values, an order's token
    # among them, even with SQL_ECHO on.
    engine = create_engine(
        url, echo=SQL_ECHO, hide_parameters=True, connect_args=connect_args, **pool
    )
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", set_sqlite_pragmas)
    if engine.dialect.name == "postgresql":
        event.listen(engine, "checkout", refuse_unfinished)
    return engine


def set_sqlite_pragmas(dbapi_connection: Any, _connection_record: Any) -> None:
    # WAL: readers never wait for the writer, and NORMAL sync is safe with it.
    # foreign_keys: SQLite ignores REFERENCES unless asked.
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
        dbapi_connection.execute(f"PRAGMA {pragma}")


def refuse_unfinished(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A psycopg connection leaves the pool idle, or not at all: one whose last
    command never finished (its rollback failed, and psycopg did not find it
    broken) is discarded, and the pool hands out another."""
    if dbapi_connection.info.transaction_status != 0:  # psycopg: IDLE
        raise DisconnectionError("a connection in the pool was left in a command")


@event.listens_for(Session, "after_begin")
def begin_transaction(_session: Session, _: Any, connection: Connection) -> None:
    """Begin a session's transaction the way this database needs, before its first
    statement. It listens to the session, not the engine: an engine with a
    listener of its own runs every statement through its event dispatch.

    On SQLite, one that may write takes the write lock at once, where SQLite can
    wait for it: begun at its first write, after its reads, another process could
    change what it read in between, and a book checked for its ETag (lock_book)
    would no longer be the book it changes. One that only reads (`reads_only`)
    begins only if it is a `snapshot`, a page and its count that must see one
    state of the database; one of a single resource runs in autocommit. On
    PostgreSQL, whose READ COMMITTED gives each statement a state of its own, a
    read runs in REPEATABLE READ, which psycopg names in the BEGIN it sends
    (MariaDB's default is that already).
    """
    options = connection.get_execution_options()
    reads_only = options.get("reads_only", False)
    if connection.dialect.name == "sqlite":
        if not reads_only:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif options["snapshot"]:
            connection.exec_driver_sql("BEGIN")
    elif connection.dialect.name == "postgresql":  # at every begin: no write keeps it
        psycopg_connection: Any = connection.connection.dbapi_connection
        repeatable_read = 3  # psycopg.IsolationLevel.REPEATABLE_READ
        psycopg_connection.isolation_level = repeatable_read if reads_only else None


engine = make_engine(DATABASE_URL)


@event.listens_for(Book, "before_insert")
@event.listens_for(Book, "before_update")
def fold_case(_mapper: Any, _connection: Any, book: Book) -> None:
    book.title_folded = book.title.lower()
    book.author_folded = book.author.lower()


# A worker starting next to another one waits this long for SQLite's write lock.
STARTUP_LOCK_WAIT = 600


@asynccontextmanager
async def start_up() -> AsyncIterator[None]:
    """What runs beside the requests: the tables, brought up to date before the
    first (upgrade_database); then, while the service serves, the sweep of
    abandoned orders (expire_orders), stopped with the service."""
    await upgrade_database()
    sweeps = asyncio.create_task(expire_orders()) if ORDER_HOLD_SECONDS else None
    try:
        yield
    finally:
        if sweeps is not None:
            sweeps.cancel()
            with suppress(asyncio.CancelledError):
                await sweeps


# Seconds between two sweeps: an order is cancelled at most this long (and the
# sweep's own time) after its hold ends.
SWEEP_EVERY = 5


async def expire_orders() -> None:
    """Cancel the orders still pending ORDER_HOLD_SECONDS after they were placed,
    every SWEEP_EVERY seconds, as a unit of work like a request's. Every worker
    sweeps; each cancel is a conditional UPDATE, so one of them cancels an order,
    once. A sweep that fails is logged and tried again at the next."""
    while True:
        await asyncio.sleep(SWEEP_EVERY)
        try:
            cancelled = await in_transaction(cancel_expired_orders, {}, write=True)
        except (DatabaseUnavailable, SQLAlchemyError) as error:
            cause = " ".join(str(error).split())
            log.warning("Expired orders wait for the next sweep: %s", cause)
            continue
        if cancelled:
            log.info(
                "Cancelled %d orders pending for %g s", cancelled, ORDER_HOLD_SECONDS
            )


async def upgrade_database() -> None:
    """Make the tables, or bring a database made by an earlier version up to this
    one (create_tables): once, however many workers start together, under a lock
    that the database holds, without the request timeouts.

    A database that cannot be reached (refused, timed out, still starting) is
    waited for, and logged once: a worker started during an outage serves when the
    database is back. One that answers but refuses (a wrong password, no such
    database) stops the start.
    """
    own = engine
    if not isinstance(engine.pool, StaticPool):  # in memory: its one connection
        own = make_engine(engine.url.render_as_string(False), for_requests=False)
    waited = False
    # uvicorn acts on SIGTERM only once start-up is over: until then, a signal ends
    # the wait, and is handed on to uvicorn, which then stops before serving.
    stopping: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda sig, _: stopping.append(sig))
    try:
        while not stopping:
            try:
                await asyncio.to_thread(upgrade_tables, own)
                # The requests' engine connects once, here: on its first connection
                # SQLAlchemy reads the server's settings, in statements that no
                # request could cut off, and that hold every thread's connect.
                await asyncio.to_thread(lambda: engine.connect().close())
                break
            except (OperationalError, InterfaceError) as error:
                if not is_unreachable(error):
                    log.critical("The database refused the start: %s", error.orig)
                    raise
                if not waited:
                    cause = " ".join(str(error.orig).split())
                    log.warning("Waiting for the database: %s", cause)
                    waited = True
                await asyncio.sleep(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own is not engine:
            own.dispose()
    for received in stopping[:1]:
        signal.raise_signal(received)
    if waited and not stopping:
        log.info("The database is back")


def is_unreachable(error: DBAPIError) -> bool:
    """Whether the database gave no answer, or said it is starting or stopping,
    rather than refusing (psycopg tells only in words what the server said)."""
    message = str(error.orig)
    if error.orig is not None and error.orig.args[:1] in ((2003,), (2006,), (2013,)):
        return True  # MySQL: cannot connect, server gone away, connection lost
    starting = "the database system is" in message  # starting up, shutting down
    return "psycopg" in type(error.orig).__module__ and (
        "FATAL:" not in message or starting
    )


def upgrade_tables(own: Engine) -> None:
    with own.begin() as connection:
        # The lock, held until the end: the other workers wait for it, then find
        # nothing left to change. SQLite's is its write lock.
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(20261202)")
        elif connection.dialect.name in ("mysql", "mariadb"):  # held until closed
            connection.exec_driver_sql("SELECT GET_LOCK('bookstore start-up', 86400)")
        changes = create_tables(connection)
    if changes:
        log.info("Start-up brought the tables up to date: %s", "; ".join(changes))


def create_tables(connection: Connection) -> list[str]:
    """Create the tables, or bring those of a database made by an earlier version
    up to this one, keeping every row: the columns and indexes they lack, their
    character set, the folded text of their books, the keys of their orders, and
    the indexes each database makes its own way. What it changed, in words; when
    nothing needs to change, it changes nothing and takes no lock."""
    changes: list[str] = []
    inspector = inspect(connection)
    dialect = connection.dialect
    tables = set(inspector.get_table_names())
    missing_tables = [
        t for t in SQLModel.metadata.sorted_tables if t.name not in tables
    ]
    if missing_tables:
        SQLModel.metadata.create_all(connection, tables=missing_tables)
        changes.append("created " + ", ".join(t.name for t in missing_tables))
        inspector = inspect(connection)
    quote = dialect.identifier_preparer
    for table in SQLModel.metadata.sorted_tables:
        present = {info["name"] for info in inspector.get_columns(table.name)}
        for missing in [c for c in table.columns if c.name not in present]:
            # Rows need a value of it: from its default (a book's version is 1).
            if missing.unique or not (missing.nullable or missing.server_default):
                problem = (
                    f"Table {table.name} has no column {missing.name}, which start-up"
                    " cannot add: add it by hand, or start on a new database"
                )
                log.critical(problem)
                raise RuntimeError(problem)
            connection.exec_driver_sql(
                f"ALTER TABLE {quote.format_table(table)}"
                f" ADD COLUMN {CreateColumn(missing).compile(dialect=dialect)}"
            )
            changes.append(f"added column {table.name}.{missing.name}")
        indexes = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(connection)
                changes.append(f"added index {index.name}")
    if dialect.name in ("mysql", "mariadb"):
        changes += convert_to_utf8mb4(connection)
    order_columns = {info["name"] for info in inspector.get_columns("order")}
    if "idempotency_key" in order_columns:  # where earlier versions kept them
        changes += copy_order_keys(connection)
    # A key whose book an earlier version deleted: its retry is a 404 (delete_book).
    connection.execute(FORGET_DELETED_BOOKS_KEYS)
    unfolded = select(Book.id, Book.title, Book.author).where(
        col(Book.title_folded).is_(None)
    )
    folded = [
        {"book_id": id_, "folded_title": title.lower(), "folded_author": author.lower()}
        for id_, title, author in connection.execute(unfolded)
    ]
    if folded:
        connection.execute(FOLD_CASE, folded)
        changes.append(f"folded the titles and authors of {len(folded)} books")
    if dialect.name == "postgresql":
        changes += create_postgresql_indexes(connection)
    elif getattr(dialect, "is_mariadb", False):
        book_columns = {info["name"] for info in inspector.get_columns("book")}
        if book_columns & {"title_lower", "author_lower"}:
            connection.exec_driver_sql(OBSOLETE_MARIADB)
            changes.append("dropped the columns title_lower, author_lower")
    elif dialect.name == "sqlite":
        # The triggers go with the book table, and earlier ones indexed other text.
        trigger = connection.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE name = 'book_search_insert'"
        ).scalar()
        if "title_folded" not in (trigger or ""):
            for statement in OBSOLETE_SQLITE + SQLITE_SEARCH_INDEX:
                connection.exec_driver_sql(statement)
            changes.append("made the search index")
    return changes


FOLD_CASE = (
    update(Book)
    .where(col(Book.id) == bindparam("book_id"))
    .values(
        title_folded=bindparam("folded_title"),
        author_folded=bindparam("folded_author"),
    )
)
FORGET_DELETED_BOOKS_KEYS = (
    update(KeyedRequest)
    .where(
        col(KeyedRequest.route).in_(BOOK_ROUTES),
        col(KeyedRequest.result_id) > 0,
        ~exists().where(col(Book.id) == col(KeyedRequest.result_id)),
    )
    .values(result_id=-col(KeyedRequest.result_id))
)


def convert_to_utf8mb4(connection: Connection) -> list[str]:
    """Bring MySQL/MariaDB tables made in another character set (latin1, utf8mb3:
    no emoji) to utf8mb4, and the text that compares exactly to its collation."""
    changes = []
    quote = connection.dialect.identifier_preparer
    collations = connection.execute(MYSQL_COLLATIONS).all()
    for table in SQLModel.metadata.sorted_tables:
        name = quote.format_table(table)
        found = {
            column: collation for t, column, collation in collations if t == table.name
        }
        if any(not collation.startswith("utf8mb4") for collation in found.values()):
            connection.exec_driver_sql(
                f"ALTER TABLE {name} CONVERT TO CHARACTER SET utf8mb4"
            )
            changes.append(f"converted table {table.name} to utf8mb4")
            found = dict.fromkeys(found, "")
        for exact in table.columns:
            wanted = exact.type.dialect_impl(connection.dialect)
            collation = getattr(wanted, "collation", None)
            if collation and found.get(exact.name) != collation:
                connection.exec_driver_sql(
                    f"ALTER TABLE {name} MODIFY COLUMN"
                    f" {CreateColumn(exact).compile(dialect=connection.dialect)}"
                )
                changes.append(f"column {table.name}.{exact.name} now {collation}")
    return changes


MYSQL_COLLATIONS = sql_text(
    "SELECT TABLE_NAME, COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS"
    " WHERE TABLE_SCHEMA = DATABASE() AND COLLATION_NAME IS NOT NULL"
)


def copy_order_keys(connection: Connection) -> list[str]:
    """Copy the Idempotency-Keys that earlier versions kept in their orders into
    the table of keys, each once. Compared in Python: in the database, the two
    columns may have collations that MySQL refuses to compare."""
    copied = set(
        connection.scalars(
            select(KeyedRequest.key).where(col(KeyedRequest.route) == "place_order")
        )
    )
    keys = [
        {"route": "place_order", "key": key, "request_hash": request_hash,
         "result_id": order_id, "created_at": created_at}
        for order_id, key, request_hash, created_at in connection.execute(
            EARLIER_ORDER_KEYS
        )
        if key not in copied
    ]  # fmt: skip
    if keys:
        connection.execute(insert(KeyedRequest), keys)
        return [f"copied {len(keys)} order keys"]
    return []


# Earlier versions kept the Idempotency-Key of an order in the order (the columns
# stay, unused).
EARLIER_ORDERS = sql_table(
    "order",
    column("id"),
    column("idempotency_key"),
    column("request_hash"),
    column("created_at", UTCDateTime()),
)
EARLIER_ORDER_KEYS = select(
    EARLIER_ORDERS.c.id,
    EARLIER_ORDERS.c.idempotency_key,
    EARLIER_ORDERS.c.request_hash,
    EARLIER_ORDERS.c.created_at,
).where(EARLIER_ORDERS.c.idempotency_key.is_not(None))


def create_postgresql_indexes(connection: Connection) -> list[str]:
    """PostgreSQL's trigram indexes, if pg_trgm can be had, in place of what
    earlier versions made. Only what is missing is made: CREATE INDEX IF NOT
    EXISTS would lock the table before it looks."""
    changes = []
    present = set(connection.scalars(POSTGRESQL_INDEXES))
    if obsolete := sorted(present & OBSOLETE_POSTGRESQL):
        connection.exec_driver_sql("DROP INDEX " + ", ".join(obsolete))
        changes.append("dropped indexes " + ", ".join(obsolete))
    missing = [name for name in POSTGRESQL_SEARCH_INDEXES if name not in present]
    if not missing:
        return changes
    try:
        with connection.begin_nested():
            connection.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except (ProgrammingError, OperationalError) as error:
        # pg_trgm ships with PostgreSQL, and a database's owner may add it
        # since PostgreSQL 13; without it, a search reads every title.
        log.warning("Search will be slower, without pg_trgm: %s", error.orig)
        return changes
    for name in missing:
        connection.exec_driver_sql(POSTGRESQL_SEARCH_INDEXES[name])
        changes.append(f"added index {name}")
    return changes


POSTGRESQL_INDEXES = sql_text(
    "SELECT indexname FROM pg_indexes WHERE tablename = 'book'"
)


# --- What keeps it running: the way in and the error answers ------------------------


class LimitBody:
    """Answer 413 once a request body grows past MAX_BODY_BYTES, whether it was
    announced by Content-Length or sent in chunks, before more is read; and 408,
    closing the connection, when it has not all arrived BODY_TIMEOUT seconds after
    the request began (a client sending a byte a second holds no connection long)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT
        received = 0
        complete = False

        async def receive_limited() -> ASGIMessage:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:  # FastAPI answers with these exceptions
                raise HTTPException(
                    408, "Request body too slow", headers={"Connection": "close"}
                ) from None
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if received > MAX_BODY_BYTES:
                raise HTTPException(
                    413, f"Request body is larger than {MAX_BODY_BYTES} bytes"
                )
            return message

        await self.app(scope, receive_limited, send)


class SameWithTrailingSlash:
    """Route /books/ as /books, answering directly instead of with a 307 redirect,
    and HEAD as GET without the body. An encoded slash (/books/1%2F) is no slash."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        # Behind a proxy, uvicorn --root-path /shop: the path is /shop/... and the
        # routes see what follows /shop. "/shop/" is the root, not /shop.
        route_path = path.removeprefix(scope.get("root_path", ""))
        raw_path = scope.get("raw_path") or path.encode()
        if len(route_path) > 1 and raw_path.endswith(b"/"):  # /books/1%2F/ stays
            scope = {**scope, "path": path[:-1]}
        if scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def send_headers_only(message: ASGIMessage) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


app.add_middleware(LimitBody)
app.add_middleware(SameWithTrailingSlash)
if CORS_ORIGINS:  # outermost: a browser's preflight is answered before the rest
    app.add_middleware(
        CORSMiddleware,
        allow_origins=CORS_ORIGINS,
        allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type", *REQUEST_HEADERS],
        expose_headers=["ETag", "Location", "X-Total-Count", "Retry-After"],
    )


@app.exception_handler(DatabaseUnavailable)
async def database_unavailable(
    request: Request, exc: DatabaseUnavailable
) -> JSONResponse:
    """503, logged once with its cause; the client may try again in a moment."""
    cause = " ".join(str(exc).split())  # psycopg's messages have several lines
    log.error("Database unavailable, answering 503: %s", cause)
    detail = "Database unavailable"
    if exc.after_commit:
        detail += (
            " after the commit was sent: the change may have been made; a retry"
            " with the same Idempotency-Key tells"
        )
    return JSONResponse({"detail": detail}, 503, headers={"Retry-After": "2"})


@app.exception_handler(RequestValidationError)
async def validation_error(
    request: Request, exc: RequestValidationError
) -> JSONResponse:
    """FastAPI's 422 answer, without echoing the input back: JSON cannot carry
    some inputs (NaN, 1e400, unpaired surrogates), and FastAPI's own answer fails
    on them."""
    errors = [
        {"type": e["type"], "loc": e["loc"], "msg": e["msg"]}
        for e in exc.errors()[:MAX_ERRORS]
    ]
    return JSONResponse({"detail": errors}, 422)


@app.exception_handler(405)
async def method_not_allowed(request: Request, exc: HTTPException) -> JSONResponse:
    """405 with every method the path has in Allow (HEAD wherever GET, as
    SameWithTrailingSlash answers it); Starlette lists only one route's."""
    methods = {
        method
        for router in ROUTERS
        for route in router.routes
        if route.matches(request.scope)[0] != Match.NONE
        for method in getattr(route, "methods", ())
    }
    if "GET" in methods:
        methods.add("HEAD")
    allow = ", ".join(sorted(methods))
    return JSONResponse({"detail": exc.detail}, 405, headers={"Allow": allow})


# --- What keeps it running: each database's search indexes and what they replace --


# On SQLite, a trigram index of the folded titles and authors (FTS5), kept current
# by triggers, finds the books that a search of 3 or more characters matches,
# without reading every title (see list_books). case_sensitive: the text is folded
# already, and FTS5's own folding differs from Python's.
SQLITE_SEARCH_INDEX = (
    """CREATE VIRTUAL TABLE book_search USING fts5(
        title_folded, author_folded, content='book', content_rowid='id',
        tokenize='trigram case_sensitive 1')""",
    """CREATE TRIGGER book_search_insert AFTER INSERT ON book BEGIN
        INSERT INTO book_search(rowid, title_folded, author_folded)
        VALUES (new.id, new.title_folded, new.author_folded);
    END""",
    """CREATE TRIGGER book_search_delete AFTER DELETE ON book BEGIN
        INSERT INTO book_search(book_search, rowid, title_folded, author_folded)
        VALUES ('delete', old.id, old.title_folded, old.author_folded);
    END""",
    """CREATE TRIGGER book_search_update
    AFTER UPDATE OF title_folded, author_folded ON book BEGIN
        INSERT INTO book_search(book_search, rowid, title_folded, author_folded)
        VALUES ('delete', old.id, old.title_folded, old.author_folded);
        INSERT INTO book_search(rowid, title_folded, author_folded)
        VALUES (new.id, new.title_folded, new.author_folded);
    END""",
    "INSERT INTO book_search(book_search) VALUES ('rebuild')",  # the books there
)


# On PostgreSQL, trigram indexes (pg_trgm) serve LIKE '%...%' as it is.
POSTGRESQL_SEARCH_INDEXES = {
    name: f"CREATE INDEX {name} ON book USING gin ({column} gin_trgm_ops)"
    for name, column in (
        ("book_title_folded_trgm", "title_folded"),
        ("book_author_folded_trgm", "author_folded"),
    )
}
# What earlier versions made to search and sort by each database's own folding.
OBSOLETE_POSTGRESQL = {
    "book_title_lower",
    "book_author_lower",
    "book_title_trgm",
    "book_author_trgm",
}
OBSOLETE_MARIADB = (
    "ALTER TABLE book DROP COLUMN IF EXISTS title_lower,"
    " DROP COLUMN IF EXISTS author_lower"
)
OBSOLETE_SQLITE = (
    "DROP TRIGGER IF EXISTS book_search_insert",
    "DROP TRIGGER IF EXISTS book_search_delete",
    "DROP TRIGGER IF EXISTS book_search_update",
    "DROP TABLE IF EXISTS book_search",
)
