"""Bundles served in chunks over MQTT, central side: the chunk store and the chunk server.

`store` keeps bundles by sha256 with their chunk manifests (the store is all the state there
is); `server` answers boxes' chunk requests from it over the broker. The wire protocol is
`edge_bundle.chunks`; docs/mqtt-delivery.md tells the whole story.
"""
