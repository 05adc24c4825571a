"""The device: one narrow API (`api.Device`) that both transports and the updater call.

Each use case is written once here: the model lifecycle (`models`), the predict path
(`predictions`), the generate path (`texts`), feedback, explanations and telemetry. What the device
sends out leaves through ports (`ports.Publisher`), which the MQTT side implements, so nothing in
this layer knows a transport.
"""
