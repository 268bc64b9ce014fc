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
# First, before Quix: notes the process start and points file descriptor 1 at stderr (the
# result line alone goes to the real stdout), so whatever Quix or librdkafka prints goes to
# stderr.
from peer_common import START, Result, arguments, start_watchdog

import logging
import os
import shutil
import sys
import tempfile
import threading
import time

from quixstreams import Application
from quixstreams.models.topics.admin import TopicAdmin

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


class QuixResult(Result):
    """The common result (printed by the main thread once Quix stops, or by the watchdog
    thread), with `accounts` and `sum_of_counts` read from the latest count Quix's state
    gave for each key."""

    def __init__(self, shape: str, orders: int):
        super().__init__("quix", shape, orders)
        self.latest = {}  # key -> the latest count Quix's state held for it

    def counts(self):
        return list(self.latest.values())  # a snapshot: the watchdog may read mid-run


def main() -> None:
    args = arguments(__doc__, "quix-orders",
                     "the consumer group, which also names Quix's own topics").parse_args()
    result = QuixResult(args.shape, args.orders)
    deadline = START + args.timeout
    state_dir = tempfile.mkdtemp(prefix="quix-orders-state-")
    start_watchdog("quix_orders", deadline, result,
                   cleanup=lambda: shutil.rmtree(state_dir, ignore_errors=True))

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


def run(args, result: QuixResult, deadline: float, state_dir: str) -> None:
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
        result.latest[key] = n
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
