"""Run time on the device, in layers that import only downwards: the composition root (`app`),
the transports and the updater side by side (`http`, `mqtt`, `updater`), the device API and its
use cases (`device`), the engine that runs models (`engine`), the runtimes (`runtimes`), and the
ground modules (`errors`, `settings`, `metrics`, `faults`). See docs/architecture.md."""

__version__ = "0.4.0"
