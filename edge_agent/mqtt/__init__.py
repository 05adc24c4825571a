"""MQTT transport: the paho client driven on the event loop, topics, and the durable outbox it flushes."""
