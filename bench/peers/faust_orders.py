#!/usr/bin/env python3
"""The Faust README's order count, run by Faust itself (faust-streaming, aiokafka), for the
benchmark report to set beside ours on the same broker.

    faust_orders.py --broker 127.0.0.1:PORT --topic orders --orders 100000 --timeout 90 \
        --shape group_by

TOPIC holds JSON orders keyed by account id. Shapes:
  group_by  the README's agent: `async for order in orders.group_by(Order.account_id):
            order_count[order.account_id] += 1` (a repartition through a topic Faust makes)
  by_key    no repartition: `async for event in orders.events():
            order_count[event.key] += 1` (the records are already keyed by account)

One worker, a fresh app id (hence consumer group, changelog and repartition topics) per run,
reading from the earliest offset, tables in memory. Stops once --orders events have been
counted, or --timeout seconds after the process started, and prints one line of JSON on
stdout (everything else goes to stderr):

    {"peer": "faust", "shape": "group_by", "events": 100000, "seconds": 41.2,
     "events_per_s": 2427.2, "accounts": 10000, "sum_of_counts": 100000, "complete": true,
     "startup_s": 3.1}

`seconds` runs from the first event counted to the last; `startup_s` from process start to
the first event; `accounts` and `sum_of_counts` are read from the table itself.
"""
# First, before Faust: notes the process start and points file descriptor 1 at stderr (the
# result line alone goes to the real stdout), so whatever Faust or mode prints goes to stderr.
from peer_common import START, Result, arguments, start_watchdog

import asyncio
import logging
import os
import signal
import sys
import threading
import time

import faust


class Order(faust.Record, serializer="json"):
    account_id: str
    product_id: str
    amount: int
    price: float


class FaustResult(Result):
    """The common result (printed by the agent, the deadline task or the watchdog thread),
    with `accounts` and `sum_of_counts` read from the Faust table itself."""

    def __init__(self, shape: str, orders: int):
        super().__init__("faust", shape, orders)
        self.table = None  # the Faust table, read for accounts and sum_of_counts

    def counts(self):
        try:
            # A snapshot: the watchdog may read while the loop writes.
            return list(self.table.values()) if self.table is not None else []
        except Exception as e:  # a table mid-shutdown: report what was counted
            print(f"faust_orders: reading the table: {e!r}", file=sys.stderr)
            return []


def main() -> None:
    args = arguments(__doc__, "faust-orders",
                     "Faust app id: the consumer group and the prefix of its own topics").parse_args()
    result = FaustResult(args.shape, args.orders)
    deadline = START + args.timeout
    start_watchdog("faust_orders", deadline, result)

    app = faust.App(
        args.app_id,
        broker=f"kafka://{args.broker}",
        store="memory://",
        # tansu is a single broker: the changelog and repartition topics Faust creates need
        # replication factor 1 (Faust's default is 1 as well; said here so it stays so).
        topic_replication_factor=1,
        topic_partitions=4,
        consumer_auto_offset_reset="earliest",
        # tansu answers a JoinGroup round only after about half the session timeout (our
        # transport tests found it so), and Faust's default session timeout is 60 s: 10 s
        # keeps the group join at ~5 s. Heartbeats go from aiokafka's own task every second.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        table_standby_replicas=0,  # one worker: no one to keep a standby
        web_enabled=False,
        autodiscover=False,
    )
    orders = app.topic(args.topic, key_type=str, value_type=Order, key_serializer="raw")
    order_count = app.Table("order_count", default=int, partitions=4)
    result.table = order_count

    def finish(why: str) -> None:
        if result.emit():
            print(f"faust_orders: {why}: stopping the worker", file=sys.stderr)
            # The worker's own SIGTERM handler stops it gracefully; the watchdog covers a stop
            # that hangs, and this one gives it 20 s.
            os.kill(os.getpid(), signal.SIGTERM)
            grace = threading.Timer(20.0, lambda: os._exit(0))
            grace.daemon = True
            grace.start()

    # The agent's name prefixes the repartition topic group_by makes; Faust's default is the
    # function's qualified name ("faust_orders.count"), the same in every run, and a later
    # run would read the records an earlier one left there. The app id makes it fresh.
    agent_name = f"{args.app_id}-count"
    if args.shape == "group_by":
        @app.agent(orders, name=agent_name)
        async def count(stream):
            grouped = stream.group_by(Order.account_id)
            # After group_by: it moves the processors added before it to the grouped stream.
            # Runs after group_by's own, which forwards the record to the repartition topic.
            stream.add_processor(result.read)
            async for order in grouped:
                order_count[order.account_id] += 1
                if result.counted():
                    finish(f"{result.events} events counted")
    else:
        @app.agent(orders, name=agent_name)
        async def count(stream):
            stream.add_processor(result.read)
            async for event in stream.events():
                # key_type=str with the raw key serializer: the key is the account id, a str
                # (the tables' keys must be the same type in both shapes).
                order_count[event.key] += 1
                if result.counted():
                    finish(f"{result.events} events counted")

    @app.task
    async def stop_at_deadline():
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        finish(f"timeout after {result.events} events")

    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False,
                          stdout=sys.stderr, stderr=sys.stderr)
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as e:  # mode's worker always ends so: 0 once stopped, 1 if it failed
        code = e.code if isinstance(e.code, int) else 1
    finally:
        # A worker that ended before finishing (it failed to start, say) still prints a line.
        result.emit()
        logging.shutdown()
        # os._exit: no waiting on threads or loop leftovers that Faust leaves behind.
        os._exit(code)


if __name__ == "__main__":
    main()
