"""The subcommands of `model-packager`, one module each.

Each module exposes `register(subparsers)`, which adds its parser and sets `run` to a function
`(argparse.Namespace) -> int`. Modules that need heavy libraries (torch, optimum) import them
inside `run`, so `keygen` and `verify` work on a machine without them.
"""

from __future__ import annotations

import argparse
from typing import TypeAlias

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
