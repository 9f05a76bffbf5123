#!/usr/bin/env python3
"""Place one order: publish an `order.place` command to choreo, as docs/contract.md describes.

Prints the order id, and only the order id, on stdout:

    ORDER_ID=$(python3 place_order.py --customer cust-1 --sku sku-001 --quantity 2 --price-cents 1250)

Exit codes: 0 the broker confirmed the message and routed it to a queue; 1 it was not accepted
(unroutable, nacked, exchange missing, broker error); 2 bad arguments; 3 cannot connect to the broker.
Publishing again with the same --order-id is safe: placing one order id twice creates one order.
"""

import argparse
import json
import os
import re
import sys
import unicodedata
import uuid
from datetime import datetime, timezone

import pika
import pika.exceptions

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"  # the workers' default
MESSAGE_TYPE = "order.place"
SCHEMA_VERSION = 1
PRODUCER = "place_order.py"

# Limits of messages/src/payloads.rs; checked here so a typo gets an answer now, not a dead letter later.
MAX_ID_BYTES = 128
MAX_QUANTITY = 10_000
MAX_UNIT_PRICE_CENTS = 100_000_000


def fail(message, code):
    print(f"place_order: {message}", file=sys.stderr)
    sys.exit(code)


def check_id(parser, flag, value):
    size = len(value.encode("utf-8"))
    if not 1 <= size <= MAX_ID_BYTES:
        parser.error(f"{flag} must be 1 to {MAX_ID_BYTES} bytes of UTF-8, got {size}")
    if any(unicodedata.category(c) == "Cc" for c in value):
        parser.error(f"{flag} must not contain control characters")


def parse_args():
    parser = argparse.ArgumentParser(
        description="Publish one order.place command to choreo (see docs/contract.md). "
        "Prints the order id on stdout.",
        epilog="Exit codes: 0 confirmed and routed; 1 not accepted by the broker; 2 bad arguments; "
        "3 cannot connect.",
    )
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL") or DEFAULT_AMQP_URL,
                        help="AMQP URL of the broker (default: env AMQP_URL, else "
                        + DEFAULT_AMQP_URL.replace("%", "%%") + ")")
    parser.add_argument("--namespace", default=os.environ.get("CHOREO_NAMESPACE") or "choreo",
                        help="prefix of exchange and queue names (env CHOREO_NAMESPACE; default: %(default)s)")
    parser.add_argument("--customer", required=True, help="customer id, 1 to 128 bytes")
    parser.add_argument("--sku", required=True, help="stock keeping unit of the single line, 1 to 128 bytes")
    parser.add_argument("--quantity", type=int, default=1, help="units, 1 to 10000 (default: %(default)s)")
    parser.add_argument("--price-cents", type=int, default=1000,
                        help="unit price in minor units, 0 to 100000000 (default: %(default)s)")
    parser.add_argument("--currency", default="EUR", help="ISO 4217 code (default: %(default)s)")
    parser.add_argument("--order-id", help="UUID of the order (default: a new random UUID)")
    args = parser.parse_args()

    check_id(parser, "--customer", args.customer)
    check_id(parser, "--sku", args.sku)
    if not 1 <= args.quantity <= MAX_QUANTITY:
        parser.error(f"--quantity must be 1 to {MAX_QUANTITY}, got {args.quantity}")
    if not 0 <= args.price_cents <= MAX_UNIT_PRICE_CENTS:
        parser.error(f"--price-cents must be 0 to {MAX_UNIT_PRICE_CENTS}, got {args.price_cents}")
    if not re.fullmatch(r"[A-Z]{3}", args.currency):
        parser.error(f"--currency must be an ISO 4217 code (three upper-case letters), got {args.currency!r}")
    if not args.namespace:
        parser.error("--namespace must not be empty")
    try:
        args.order_id = str(uuid.UUID(args.order_id)) if args.order_id else str(uuid.uuid4())
    except ValueError:
        parser.error(f"--order-id must be a UUID, got {args.order_id!r}")
    return args


def main():
    args = parse_args()
    exchange = f"{args.namespace}.events"
    message_id = str(uuid.uuid4())
    now = datetime.now(timezone.utc)
    body = json.dumps({
        "order_id": args.order_id,
        "customer_id": args.customer,
        "currency": args.currency,
        "lines": [{"sku": args.sku, "quantity": args.quantity, "unit_price_cents": args.price_cents}],
    }, separators=(",", ":")).encode("utf-8")
    properties = pika.BasicProperties(
        message_id=message_id,
        correlation_id=args.order_id,  # the workflow id; choreoctl uses the order id too
        type=MESSAGE_TYPE,
        content_type="application/json",
        timestamp=int(now.timestamp()),
        delivery_mode=2,
        app_id=PRODUCER,
        headers={
            "schema-version": SCHEMA_VERSION,
            "producer": PRODUCER,
            "occurred-at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        },
    )

    try:
        parameters = pika.URLParameters(args.amqp_url)
        parameters.blocked_connection_timeout = 30
        connection = pika.BlockingConnection(parameters)
    except (pika.exceptions.AMQPError, ValueError, OSError) as e:
        fail(f"cannot connect to the broker: {e!r}", 3)

    try:
        channel = connection.channel()
        channel.confirm_delivery()
        try:
            channel.exchange_declare(exchange=exchange, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                fail(f"exchange `{exchange}` does not exist: is the namespace `{args.namespace}` right, "
                     "and has a worker (order-worker) started once?", 1)
            raise
        channel.basic_publish(exchange=exchange, routing_key=MESSAGE_TYPE, body=body,
                              properties=properties, mandatory=True)
    except pika.exceptions.UnroutableError:
        fail(f"order {args.order_id} was returned unroutable: no queue is bound to `{MESSAGE_TYPE}` on "
             f"`{exchange}`; start order-worker once so that it declares its queue, then retry", 1)
    except pika.exceptions.NackError:
        fail(f"the broker refused (nacked) order {args.order_id}; retry with --order-id {args.order_id}", 1)
    except pika.exceptions.AMQPError as e:
        fail(f"publishing order {args.order_id} failed: {e!r}; retry with --order-id {args.order_id}", 1)
    finally:
        if connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                pass

    print(args.order_id)


if __name__ == "__main__":
    main()
