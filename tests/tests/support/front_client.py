#!/usr/bin/env python3
"""An independent Kafka client (aiokafka) for the Kafka front's tests (tests/tests/kafka_front.rs).

Connects to --bootstrap with the given security settings, creates --topic (1 partition),
produces 3 records to partition 0, reads them back, and prints one JSON line:
{"ok": true, "produced": 3, "consumed": [...]} on success (exit 0), or
{"ok": false, "error": "...", "log": [...]} on failure (exit 1), where "log" holds what
aiokafka logged at warning level and above (its bootstrap swallows the cause of a failed
connection into a log line). Every wait is bounded; the whole run takes at most --timeout s.
"""

import argparse
import asyncio
import json
import logging
import ssl
import sys

LOGGED = []


class Collect(logging.Handler):
    def emit(self, record):
        try:
            LOGGED.append(f"{record.name}: {record.getMessage()}")
        except Exception:  # noqa: BLE001 - a broken log record must not end the run
            pass


def settings(args):
    common = {
        "bootstrap_servers": args.bootstrap,
        "security_protocol": args.protocol,
        "request_timeout_ms": 5000,
        "retry_backoff_ms": 100,
        "metadata_max_age_ms": 5000,
    }
    if args.protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=args.cafile)
        if args.certfile:
            context.load_cert_chain(args.certfile, args.keyfile)
        common["ssl_context"] = context
    if args.protocol.startswith("SASL_"):
        common["sasl_mechanism"] = args.mechanism
        common["sasl_plain_username"] = args.user
        common["sasl_plain_password"] = args.password
    return common


async def run(args):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    common = settings(args)
    admin = AIOKafkaAdminClient(**common)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(args.topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    values = [f"record-{i}" for i in range(3)]
    producer = AIOKafkaProducer(**common, acks="all")
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send_and_wait(args.topic, value.encode(), key=f"key-{i}".encode(), partition=0)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        **common, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    consumed = []
    try:
        tp = TopicPartition(args.topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = asyncio.get_running_loop().time() + 10
        while len(consumed) < len(values) and asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=500)
            for records in batches.values():
                consumed.extend(r.value.decode() for r in records)
    finally:
        await consumer.stop()
    if consumed != values:
        raise RuntimeError(f"read back {consumed}, expected {values}")
    return {"ok": True, "produced": len(values), "consumed": consumed}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument(
        "--protocol", default="PLAINTEXT", choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
    )
    parser.add_argument("--mechanism", default="PLAIN")
    parser.add_argument("--user", default="")
    parser.add_argument("--password", default="")
    parser.add_argument("--cafile")
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    parser.add_argument("--topic", default="front-test")
    parser.add_argument("--timeout", type=float, default=25.0)
    args = parser.parse_args()

    handler = Collect(level=logging.WARNING)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)

    try:
        result = asyncio.run(asyncio.wait_for(run(args), timeout=args.timeout))
    except BaseException as e:  # noqa: BLE001 - every failure is reported the same way
        if isinstance(e, KeyboardInterrupt):
            raise
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}", "log": LOGGED}), flush=True)
        sys.exit(1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
