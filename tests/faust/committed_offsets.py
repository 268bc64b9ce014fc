"""A consumer group's committed offsets through aiokafka, the Kafka client Faust uses, for
tests/tests/kafka_group.rs.

    committed_offsets.py BROKER GROUP TOPIC PARTITIONS read
        prints {"0": offset or null, ...}
    committed_offsets.py BROKER GROUP TOPIC PARTITIONS commit P=OFFSET ...
        commits them as a client outside the group's generations (manual assignment), prints ok
"""

import asyncio
import json
import sys

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata


async def main() -> None:
    broker, group, topic, partitions, mode, *rest = sys.argv[1:]
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(int(partitions))]
        if mode == "read":
            print(json.dumps({str(tp.partition): await consumer.committed(tp) for tp in tps}))
        elif mode == "commit":
            consumer.assign(tps)
            offsets = {}
            for arg in rest:
                p, offset = arg.split("=")
                offsets[TopicPartition(topic, int(p))] = OffsetAndMetadata(int(offset), "")
            await consumer.commit(offsets)
            print("ok")
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        await consumer.stop()


asyncio.run(main())
