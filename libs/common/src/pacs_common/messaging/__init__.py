"""Messaging over RabbitMQ (aio-pika): topology, confirmed publishing, consumers."""
