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
# First, before librdkafka: notes the process start and points file descriptor 1 at stderr
# (the result line alone goes to the real stdout), so whatever a library prints goes to
# stderr.
from peer_common import START, Result, arguments, start_watchdog

import os
import sys
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition


def main() -> None:
    p = arguments(__doc__, "raw-consume", "the group.id", orders_help="stop after this many records",
                  shape=False)
    p.add_argument("--batch", type=int, default=1000, help="num_messages of each consume()")
    args = p.parse_args()
    # Every record read counts as an event: `first` is the first batch with a record, and
    # the line has no accounts, sum_of_counts nor first_read_s.
    result = Result("librdkafka", "raw", args.orders, first_read=False)
    deadline = START + args.timeout
    start_watchdog("raw_consume", deadline, result)

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
