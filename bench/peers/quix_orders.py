#!/usr/bin/env python3
"""The Faust README's order count written for Quix Streams (librdkafka underneath), for the
benchmark report to set beside ours on the same broker.

    quix_orders.py --broker 127.0.0.1:PORT --topic orders --orders 100000 --timeout 90 \
        --shape group_by

TOPIC holds JSON orders keyed by account id. Shapes:
  group_by  `sdf.group_by("account_id")` (a repartition through a topic Quix makes), then a
            stateful `update` that adds one to the account's count
  by_key    the same stateful `update` straight on the topic: Quix's state is keyed by the
            message key, which is already the account id

One application, a fresh consumer group (hence changelog and repartition topics) per run,
reading from the earliest offset, with Quix's default state store (RocksDB, in a temporary
directory removed at exit). Stops once --orders events have been counted, or --timeout
seconds after the process started, and prints one line of JSON on stdout (everything else
goes to stderr):

    {"peer": "quix", "shape": "group_by", "events": 100000, "seconds": 41.2,
     "events_per_s": 2427.2, "accounts": 10000, "sum_of_counts": 100000, "complete": true,
     "startup_s": 3.1}

`seconds` runs from the first event counted to the last; `startup_s` from process start to
the first event. Quix's state is per key in RocksDB; the script keeps the latest count the
state gave for each key, and `accounts` and `sum_of_counts` are read from that.
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
# descriptor 1 at stderr, so whatever Quix prints goes to stderr.
RESULT_OUT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402

from quixstreams import Application  # noqa: E402
from quixstreams.models.topics.admin import TopicAdmin  # noqa: E402

# tansu workaround. Quix sizes its changelog and repartition topics from the source topic's
# configs, read with DescribeConfigs, and needs "retention.ms" among them (a KeyError
# otherwise). Kafka lists every config, defaults included; tansu lists only those given when
# the topic was created, so for a topic made without configs it lists none. Fill in Kafka's
# defaults (7 days, no size limit) where the broker gave nothing.
_KAFKA_DEFAULTS = {"retention.ms": "604800000", "retention.bytes": "-1"}
_inspect_topics = TopicAdmin.inspect_topics


def _inspect_topics_with_defaults(self, *args, **kwargs):
    configs = _inspect_topics(self, *args, **kwargs)
    for config in configs.values():
        if config is not None:
            for name, value in _KAFKA_DEFAULTS.items():
                config.extra_config.setdefault(name, value)
    return configs


TopicAdmin.inspect_topics = _inspect_topics_with_defaults


class Result:
    """What was counted, and the one result line (printed once, by whoever gets there
    first: the main thread once Quix stops, or the watchdog thread)."""

    def __init__(self, shape: str, orders: int):
        self.shape = shape
        self.orders = orders
        self.events = 0
        self.first_read = None  # monotonic time of the first record read from TOPIC
        self.first = None  # ... of the first event counted
        self.last = None  # ... and of the last one
        self.counts = {}  # key -> the latest count Quix's state held for it
        self._lock = threading.Lock()
        self._printed = False

    def read(self, _value) -> None:
        """Notes when the first record was read (before group_by's repartition)."""
        if self.first_read is None:
            self.first_read = time.monotonic()

    def counted(self) -> bool:
        """Notes one event counted; True when that was the last one wanted."""
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.events += 1
        return self.events >= self.orders

    def emit(self) -> None:
        with self._lock:
            if self._printed:
                return
            self._printed = True
            counts = list(self.counts.values())  # a snapshot: the watchdog may read mid-run
            seconds = (self.last - self.first) if self.first is not None else 0.0
            line = {
                "peer": "quix",
                "shape": self.shape,
                "events": self.events,
                "seconds": round(seconds, 3),
                "events_per_s": round(self.events / seconds, 1) if seconds > 0 else 0.0,
                "accounts": sum(1 for c in counts if c),
                "sum_of_counts": sum(counts),
                "complete": self.events >= self.orders,
                "startup_s": round(self.first - START, 3) if self.first is not None else None,
                # Not in the common contract: from process start to the first record read
                # from TOPIC. With group_by, the first count waits for the repartition to
                # fill, so the work between the two is in startup_s, not in seconds.
                "first_read_s": round(self.first_read - START, 3) if self.first_read is not None else None,
            }
            RESULT_OUT.write(json.dumps(line) + "\n")
            RESULT_OUT.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True, help="HOST:PORT")
    p.add_argument("--topic", required=True)
    p.add_argument("--orders", type=int, required=True, help="stop after counting this many events")
    p.add_argument("--timeout", type=float, required=True, help="seconds from process start")
    p.add_argument("--shape", choices=["group_by", "by_key"], required=True)
    p.add_argument("--app-id", default=f"quix-orders-{uuid.uuid4().hex[:8]}",
                   help="the consumer group, which also names Quix's own topics")
    args = p.parse_args()
    result = Result(args.shape, args.orders)
    deadline = START + args.timeout
    state_dir = tempfile.mkdtemp(prefix="quix-orders-state-")

    # Hard watchdog: whatever hangs (a rebalance that never ends, a shutdown that waits on
    # the broker), print what was counted and end 30 s after the timeout.
    def watchdog() -> None:
        print("quix_orders: watchdog: exiting", file=sys.stderr)
        result.emit()
        shutil.rmtree(state_dir, ignore_errors=True)
        os._exit(0)

    timer = threading.Timer(max(0.0, deadline + 30 - time.monotonic()), watchdog)
    timer.daemon = True
    timer.start()

    code = 0
    try:
        run(args, result, deadline, state_dir)
    except BaseException as e:  # noqa: BLE001 - still print the line, then say it failed
        print(f"quix_orders: the application failed: {e!r}", file=sys.stderr)
        code = 1
    finally:
        result.emit()
        logging.shutdown()
        shutil.rmtree(state_dir, ignore_errors=True)
        # os._exit: no waiting on librdkafka's threads or anything else left behind.
        os._exit(code)


def run(args, result: Result, deadline: float, state_dir: str) -> None:
    """Builds the application and runs it until it is stopped."""
    app = Application(
        broker_address=args.broker,
        consumer_group=args.app_id,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        loglevel="WARNING",
        # Quix makes the repartition and changelog topics itself, with the source topic's
        # partition count and replication factor (1 on tansu, read from its metadata).
        auto_create_topics=True,
        consumer_extra_config={
            # tansu answers a JoinGroup round only after about half the session timeout
            # (librdkafka's default is 45 s): 10 s keeps the join at ~5 s. librdkafka
            # heartbeats from its own thread, so a busy callback does not miss them.
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 1_000,
        },
    )
    stop_requested = threading.Event()

    def finish(why: str) -> None:
        if not stop_requested.is_set():
            stop_requested.set()
            print(f"quix_orders: {why}: stopping the application", file=sys.stderr)
            # Only sets flags: Quix leaves its poll loop after the current message and
            # commits its checkpoint (state, changelog, offsets) on the way out.
            app.stop()

    def count(_value, key, _timestamp, _headers, state) -> None:
        if stop_requested.is_set():
            return  # already done: messages Quix still hands over are not counted
        n = state.get("count", 0) + 1
        state.set("count", n)
        result.counts[key] = n
        if result.counted():
            finish(f"{result.events} events counted")

    orders = app.topic(args.topic, key_deserializer="str", value_deserializer="json")
    sdf = app.dataframe(orders)
    sdf.update(result.read)
    if args.shape == "group_by":
        # Re-keys each order by its account id through a "repartition__" topic.
        sdf = sdf.group_by("account_id")
    sdf.update(count, stateful=True, metadata=True)

    deadline_timer = threading.Timer(max(0.0, deadline - time.monotonic()),
                                     lambda: finish(f"timeout after {result.events} events"))
    deadline_timer.daemon = True
    deadline_timer.start()
    app.run()


if __name__ == "__main__":
    main()
