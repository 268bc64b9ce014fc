#!/usr/bin/env python3
"""The raw-consume ceiling: librdkafka (through confluent-kafka) reads every record of TOPIC
from the beginning and does nothing with them (decodes nothing), in batches of
`Consumer.consume(num_messages=--batch)`. What a Python consumer of this broker can fetch at
best, to set the stream processors' figures against.

    raw_consume.py --broker 127.0.0.1:PORT --topic orders --orders 100000 --timeout 90

Stops once --orders records have been read, or --timeout seconds after the process started,
and prints one line of JSON on stdout:

    {"peer": "librdkafka", "shape": "raw", "events": 100000, "seconds": 0.4,
     "events_per_s": 250000.0, "complete": true, "startup_s": 0.3}

`seconds` runs from the return of the first batch with a record to the return of the batch
with the last record counted (so the first batch's records count as read at time 0: with
batches of 1000 that overstates the rate by about 1000/N). `startup_s` is from process start
to that first batch.

It assigns itself every partition of the topic (no subscribe, hence no group join: tansu
answers a JoinGroup only after about half the session timeout, and a ceiling needs no
group). --app-id is the group.id all the same (librdkafka wants one); nothing is committed.
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
# descriptor 1 at stderr, so whatever a library prints goes to stderr.
RESULT_OUT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

import argparse  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition  # noqa: E402


class Result:
    """What was read, and the one result line (printed once, by whoever gets there first:
    the main loop or the watchdog)."""

    def __init__(self, orders: int):
        self.orders = orders
        self.events = 0
        self.first = None  # monotonic time of the first record read
        self.last = None  # ... and of the last one counted
        self._lock = threading.Lock()
        self._printed = False

    def emit(self) -> None:
        with self._lock:
            if self._printed:
                return
            self._printed = True
            seconds = (self.last - self.first) if self.first is not None else 0.0
            line = {
                "peer": "librdkafka",
                "shape": "raw",
                "events": self.events,
                "seconds": round(seconds, 3),
                "events_per_s": round(self.events / seconds, 1) if seconds > 0 else 0.0,
                "complete": self.events >= self.orders,
                "startup_s": round(self.first - START, 3) if self.first is not None else None,
            }
            RESULT_OUT.write(json.dumps(line) + "\n")
            RESULT_OUT.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True, help="HOST:PORT")
    p.add_argument("--topic", required=True)
    p.add_argument("--orders", type=int, required=True, help="stop after this many records")
    p.add_argument("--timeout", type=float, required=True, help="seconds from process start")
    p.add_argument("--app-id", default=f"raw-consume-{uuid.uuid4().hex[:8]}", help="the group.id")
    p.add_argument("--batch", type=int, default=1000, help="num_messages of each consume()")
    args = p.parse_args()
    result = Result(args.orders)
    deadline = START + args.timeout

    # Hard watchdog: whatever hangs, print what was read and end 30 s after the timeout.
    def watchdog() -> None:
        print("raw_consume: watchdog: exiting", file=sys.stderr)
        result.emit()
        os._exit(0)

    timer = threading.Timer(max(0.0, deadline + 30 - time.monotonic()), watchdog)
    timer.daemon = True
    timer.start()

    code = 0
    try:
        consume(args, result, deadline)
    except BaseException as e:  # noqa: BLE001 - still print the line, then say it failed
        print(f"raw_consume: failed: {e!r}", file=sys.stderr)
        code = 1
    finally:
        result.emit()
        os._exit(code)


def consume(args, result: Result, deadline: float) -> None:
    """Reads until --orders records have been read or the deadline has passed."""
    consumer = Consumer({
        "bootstrap.servers": args.broker,
        "group.id": args.app_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # Fetch for throughput: big responses, a deep local queue to prefetch into, and no
        # CRC checks (the default) nor partition EOF events.
        "fetch.max.bytes": 64 * 1024 * 1024,
        "max.partition.fetch.bytes": 16 * 1024 * 1024,
        "fetch.wait.max.ms": 100,
        "queued.min.messages": 1_000_000,
        "queued.max.messages.kbytes": 512 * 1024,
        "enable.partition.eof": False,
        "log_level": 4,  # warnings and worse (syslog levels), to stderr
    })
    meta = consumer.list_topics(args.topic, timeout=max(1.0, deadline - time.monotonic())).topics.get(args.topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise RuntimeError(f"no topic {args.topic}: {meta.error if meta else None}")
    consumer.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)])

    while result.events < args.orders:
        now = time.monotonic()
        if now >= deadline:
            print(f"raw_consume: timeout after {result.events} records", file=sys.stderr)
            break
        batch = consumer.consume(num_messages=args.batch, timeout=min(0.5, deadline - now))
        if not batch:
            continue
        got = 0
        for m in batch:
            err = m.error()
            if err is None:
                got += 1
            elif err.code() != KafkaError._PARTITION_EOF:
                print(f"raw_consume: {err}", file=sys.stderr)
        if got:
            now = time.monotonic()
            if result.first is None:
                result.first = now
            result.last = now
            result.events = min(args.orders, result.events + got)
    result.emit()
    consumer.close()


if __name__ == "__main__":
    main()
