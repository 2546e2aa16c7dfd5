"""Drive a live BookStore through a client generated from its own /openapi.json.

.ci/run generates the client with openapi-python-client into a temp directory,
puts that on PYTHONPATH and runs this with the service's URL and admin token. It
uses nothing but the generated client: a schema change that breaks generated
clients fails CI here.
"""

import sys
from http import HTTPStatus

from book_store_client import AuthenticatedClient
from book_store_client.api.books import create_book, list_books
from book_store_client.api.orders import cancel_order, place_order, read_order
from book_store_client.api.stock import read_stock
from book_store_client.models import (
    BookCreate,
    OrderCreate,
    OrderItemCreate,
    OrderStatus,
)

url, token = sys.argv[1:3]
client = AuthenticatedClient(base_url=url, token=token, raise_on_unexpected_status=True)

body = BookCreate(
    title="Dune", author="Frank Herbert", year=1965, price="10.99", stock=3
)
created = create_book.sync_detailed(client=client, body=body)
assert created.status_code == HTTPStatus.CREATED, created.content
book = created.parsed
assert book.price == "10.99", book
assert created.headers["location"] == f"/books/{book.id}"

listed = list_books.sync_detailed(client=client, q="dune", limit=100)
assert int(listed.headers["x-total-count"]) >= 1
assert book.id in [listed_book.id for listed_book in listed.parsed]

order_body = OrderCreate(
    customer="ada@example.com", items=[OrderItemCreate(book_id=book.id, quantity=2)]
)
placed = place_order.sync_detailed(
    client=client, body=order_body, idempotency_key=f"generated-client-{book.id}"
)
assert placed.status_code == HTTPStatus.CREATED, placed.content
order = placed.parsed
assert order.total == "21.98", order
assert read_order.sync(client=client, order_id=order.id).status == OrderStatus.PENDING
assert read_stock.sync(client=client, book_id=book.id).stock == 1

# The order's own token opens it to the customer, who cancels it.
assert isinstance(order.token, str), order
customer = AuthenticatedClient(
    base_url=url, token=order.token, raise_on_unexpected_status=True
)
assert read_order.sync(client=customer, order_id=order.id).id == order.id
cancelled = cancel_order.sync(client=customer, order_id=order.id)
assert cancelled.status == OrderStatus.CANCELLED
assert read_stock.sync(client=client, book_id=book.id).stock == 3
print(f"generated client: book {book.id}, order {order.id} placed, read, cancelled")
