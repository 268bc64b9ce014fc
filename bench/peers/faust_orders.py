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
import os
import sys
import time


def _process_age() -> float:
    """Seconds since this process started (from /proc), so `startup_s` includes the
    interpreter's start and the imports; 0 where /proc cannot tell."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


START = time.monotonic() - _process_age()

# The result line is the only thing on stdout: keep the real stdout for it, and point file
# descriptor 1 at stderr, so whatever Faust or mode prints (banners, progress) goes to stderr.
RESULT_OUT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402

import faust  # noqa: E402


class Order(faust.Record, serializer="json"):
    account_id: str
    product_id: str
    amount: int
    price: float


class Result:
    """What was counted, and the one result line (printed once, by whoever gets there
    first: the agent, the deadline task or the watchdog thread)."""

    def __init__(self, shape: str, orders: int):
        self.shape = shape
        self.orders = orders
        self.events = 0
        self.first_read = None  # monotonic time of the first record read from TOPIC
        self.first = None  # ... of the first event counted
        self.last = None  # ... and of the last one
        self.table = None  # the Faust table, read for accounts and sum_of_counts
        self._lock = threading.Lock()
        self._printed = False

    def read(self, value):
        """A stream processor that notes when the first record was read (before group_by's
        repartition), and passes the value on."""
        if self.first_read is None:
            self.first_read = time.monotonic()
        return value

    def counted(self) -> bool:
        """Notes one event counted; True when that was the last one wanted."""
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.events += 1
        return self.events >= self.orders

    def emit(self) -> bool:
        """Prints the result line, unless it has been printed; True if this call did."""
        with self._lock:
            if self._printed:
                return False
            self._printed = True
            accounts = total = 0
            try:
                # A snapshot: the watchdog may read while the loop writes.
                counts = list(self.table.values()) if self.table is not None else []
                accounts = sum(1 for c in counts if c)
                total = sum(counts)
            except Exception as e:  # a table mid-shutdown: report what was counted
                print(f"faust_orders: reading the table: {e!r}", file=sys.stderr)
            seconds = (self.last - self.first) if self.first is not None else 0.0
            line = {
                "peer": "faust",
                "shape": self.shape,
                "events": self.events,
                "seconds": round(seconds, 3),
                "events_per_s": round(self.events / seconds, 1) if seconds > 0 else 0.0,
                "accounts": accounts,
                "sum_of_counts": total,
                "complete": self.events >= self.orders,
                "startup_s": round(self.first - START, 3) if self.first is not None else None,
                # Not in the common contract: from process start to the first record read
                # from TOPIC. With group_by, the first count waits for the repartition to
                # fill, so the work between the two is in startup_s, not in seconds.
                "first_read_s": round(self.first_read - START, 3) if self.first_read is not None else None,
            }
            RESULT_OUT.write(json.dumps(line) + "\n")
            RESULT_OUT.flush()
            return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True, help="HOST:PORT")
    p.add_argument("--topic", required=True)
    p.add_argument("--orders", type=int, required=True, help="stop after counting this many events")
    p.add_argument("--timeout", type=float, required=True, help="seconds from process start")
    p.add_argument("--shape", choices=["group_by", "by_key"], required=True)
    p.add_argument("--app-id", default=f"faust-orders-{uuid.uuid4().hex[:8]}",
                   help="Faust app id: the consumer group and the prefix of its own topics")
    args = p.parse_args()
    result = Result(args.shape, args.orders)
    deadline = START + args.timeout

    # Hard watchdog: whatever hangs (a rebalance that never ends, a shutdown that waits on
    # the broker), print what was counted and end 30 s after the timeout.
    def watchdog() -> None:
        print("faust_orders: watchdog: exiting", file=sys.stderr)
        result.emit()
        os._exit(0)

    timer = threading.Timer(max(0.0, deadline + 30 - time.monotonic()), watchdog)
    timer.daemon = True
    timer.start()

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
