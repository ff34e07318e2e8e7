"""Messaging over RabbitMQ (aio-pika): topology, confirmed publishing, consumers."""

from pacs_common.messaging.blocking import BlockingPublisher
from pacs_common.messaging.broker import Broker, PublishError
from pacs_common.messaging.consumer import Delivery, IngestConsumer, SettleOutcome
from pacs_common.messaging.dlq import DeadLetter, list_dead_letters, replay_dead_letters
from pacs_common.messaging.models import (
    EVENT_ROUTING_KEYS,
    IngestMessage,
    IngestSource,
    InstanceStored,
    StorageLocation,
    StudyStable,
    decode_ingest,
    encode,
)
from pacs_common.messaging.topology import Topology, declare_topology, delete_topology
from pacs_common.messaging.tracecontext import extract_trace_context, inject_trace_context

__all__ = [
    "EVENT_ROUTING_KEYS",
    "BlockingPublisher",
    "Broker",
    "DeadLetter",
    "Delivery",
    "IngestConsumer",
    "IngestMessage",
    "IngestSource",
    "InstanceStored",
    "PublishError",
    "SettleOutcome",
    "StorageLocation",
    "StudyStable",
    "Topology",
    "declare_topology",
    "decode_ingest",
    "delete_topology",
    "encode",
    "extract_trace_context",
    "inject_trace_context",
    "list_dead_letters",
    "replay_dead_letters",
]
