"""MQTT transport: the paho client's owner thread, topics, and the durable outbox it flushes."""
