"""Running the PACS on one machine without containers.

``infra`` starts throwaway PostgreSQL and RabbitMQ servers as plain processes
(for machines without the configured ones, and for fault tests that must stop
and restart them); ``runner`` starts the services themselves.
"""
