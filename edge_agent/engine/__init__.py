"""The engine: what runs models on this box, below any transport.

The inference lane (`lane`: the single inference thread, admission, what is running now) is shared
by classification (`core`), shadow runs (`shadow`) and text generation (`generation`); the served
models (`classifier`, `generator`), their checks (`selftest`, `reference_check`), drift and
request records live beside them. Nothing here knows a transport, the device API or the updater.
"""
