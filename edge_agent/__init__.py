"""Run time on the device: settings, inference core, runtimes, transports, bundle store, updater,
telemetry and self-test."""

__version__ = "0.1.0"
