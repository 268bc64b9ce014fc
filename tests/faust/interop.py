"""Faust's side of tests/tests/faust_interop.rs: Faust records, both ways, on one broker.

    interop.py produce BROKER TOPIC N
        Faust's producer sends N `Order` records (keys "k0".."k{N-1}") to TOPIC, in Faust's
        JSON layout with its `__faust` metadata; prints "sent N".
    interop.py consume BROKER TOPIC N APP_ID
        a Faust worker whose agent reads TOPIC without a value type (Faust then rebuilds each
        record from its `__faust.ns`, as it does for polymorphic topics) and prints one JSON
        line per record: {"key", "class", "account_id", "amount", "price", "tags"}; exits
        once N were read (or after 120 s).

Everything but those lines goes to stderr.
"""

import asyncio
import json
import os
import sys
import threading
from typing import List

# The lines alone on stdout: Faust and mode print to file descriptor 1 too.
OUT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

import faust  # noqa: E402


class Order(faust.Record, namespace="interop.Order", serializer="json"):
    account_id: str
    amount: int
    price: float
    tags: List[str]


def order(i: int) -> Order:
    return Order(account_id=f"account-{i % 7}", amount=i, price=i / 4, tags=[f"t{i}", "faust"])


def app(app_id: str, broker: str) -> faust.App:
    return faust.App(
        app_id,
        broker=f"kafka://{broker}",
        store="memory://",
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        # tansu answers a JoinGroup round after about half the session timeout.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        table_standby_replicas=0,
        web_enabled=False,
        autodiscover=False,
    )


def produce(broker: str, topic_name: str, n: int) -> None:
    a = app("interop-producer", broker)
    topic = a.topic(topic_name, key_type=str, value_type=Order, key_serializer="raw")

    async def run() -> None:
        await a.maybe_start_producer()
        for i in range(n):
            await topic.send(key=f"k{i}", value=order(i))
        await a.producer.flush()
        await a.producer.stop()

    asyncio.run(run())
    print(f"sent {n}", file=OUT, flush=True)


def consume(broker: str, topic_name: str, n: int, app_id: str) -> None:
    a = app(app_id, broker)
    # No value type: Faust decodes by the record's namespace.
    topic = a.topic(topic_name, key_type=str, key_serializer="raw", value_serializer="json")
    seen = []

    @a.agent(topic, name=f"{app_id}-read")
    async def read(stream):
        async for event in stream.events():
            value = event.value
            line = {"key": event.key, "class": type(value).__name__}
            if isinstance(value, Order):
                line.update(account_id=value.account_id, amount=value.amount, price=value.price, tags=value.tags)
            print(json.dumps(line), file=OUT, flush=True)
            seen.append(line)
            if len(seen) >= n:
                OUT.flush()
                os._exit(0)

    # However the worker fares, the process ends.
    threading.Timer(120.0, lambda: os._exit(3)).start()
    worker = faust.Worker(a, loglevel="warning", quiet=True, redirect_stdouts=False, stdout=sys.stderr, stderr=sys.stderr)
    worker.execute_from_commandline()


if __name__ == "__main__":
    mode, broker, topic_name, n, *rest = sys.argv[1:]
    if mode == "produce":
        produce(broker, topic_name, int(n))
    else:
        consume(broker, topic_name, int(n), rest[0])
