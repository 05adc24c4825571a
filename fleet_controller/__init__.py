"""Lineside's fleet controller: central IT's registry of boxes and its wave rollouts.

It imports `edge_bundle` (notices, signing, bundle checks) and never `edge_agent`: boxes are
spoken to only through the broker. See docs/fleet.md.
"""

__version__ = "0.1.0"
