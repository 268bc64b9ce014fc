#!/usr/bin/env python3
"""Loads a topic with the Faust README's orders, for manual runs of the peers.

Creates TOPIC with --partitions partitions (replication factor 1: tansu, the test broker,
has one broker only) and writes --orders JSON orders such as

    {"account_id": "account-0000042", "product_id": "product-17", "amount": 3, "price": 9.5}

keyed by account_id (the key bytes are the account id, UTF-8), over --accounts accounts in
turn (order i is for account i % accounts, so every account gets the same number of orders).
Records go to partitions by Kafka's default partitioner (murmur2 of the key, as the Java
client, aiokafka and our own transport do). Prints one line of JSON on stdout:
{"topic": ..., "orders": N, "partitions": P, "seconds": S}.

    produce_orders.py --broker 127.0.0.1:PORT --topic orders --orders 100000
"""
import argparse
import json
import random
import sys
import time

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def create_topic(broker: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": broker})
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    try:
        futures[topic].result(timeout=30)
    except KafkaException as e:
        # An existing topic is fine (a second load of the same topic appends to it).
        if e.args[0].code() != e.args[0].TOPIC_ALREADY_EXISTS:
            raise
        print(f"topic {topic} already exists: appending", file=sys.stderr)
    # tansu answers CreateTopics at once; wait until the metadata shows every partition, so
    # the producer does not ask for a topic it does not know yet (and auto-create it with
    # the broker's default partition count).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        meta = admin.list_topics(topic=topic, timeout=10).topics.get(topic)
        if meta is not None and meta.error is None and len(meta.partitions) == partitions:
            return
        time.sleep(0.1)
    raise SystemExit(f"topic {topic} has not got {partitions} partitions after 30 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True, help="HOST:PORT")
    p.add_argument("--topic", default="orders")
    p.add_argument("--orders", type=int, default=100_000, help="how many orders to write")
    p.add_argument("--accounts", type=int, default=10_000, help="how many distinct accounts")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    create_topic(args.broker, args.topic, args.partitions)
    producer = Producer({
        "bootstrap.servers": args.broker,
        # Kafka's (the Java client's) default partitioner; librdkafka's own default differs.
        "partitioner": "murmur2_random",
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "compression.type": "none",
        "acks": "all",
        "enable.idempotence": False,
    })
    failed = []

    def on_delivery(err, _msg):
        if err is not None:
            failed.append(err)

    rng = random.Random(args.seed)
    start = time.monotonic()
    for i in range(args.orders):
        account = f"account-{i % args.accounts:07d}"
        order = {
            "account_id": account,
            "product_id": f"product-{rng.randrange(100)}",
            "amount": rng.randint(1, 10),
            "price": rng.randrange(100, 10_000) / 100,
        }
        value = json.dumps(order, separators=(", ", ": ")).encode()
        while True:
            try:
                producer.produce(args.topic, value=value, key=account.encode(), on_delivery=on_delivery)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.05)
        producer.poll(0)
    left = producer.flush(120)
    seconds = time.monotonic() - start
    if left or failed:
        raise SystemExit(f"{left} orders not delivered, {len(failed)} failed (first: {failed[:1]})")
    print(json.dumps({"topic": args.topic, "orders": args.orders, "partitions": args.partitions,
                      "seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
