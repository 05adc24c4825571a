"""Build time: sources -> export -> quantize -> validate -> benchmark -> bundle -> sign, and the
fleet publishing that pushes bundles to devices."""
