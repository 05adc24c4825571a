"""Updates pulled over MQTT: a pure state machine (`machine`), its persisted state (`persist`),
and the runner that does the I/O around it (`runner`)."""
