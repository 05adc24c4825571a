"""Progress output for long packager steps: a line per step and a tqdm bar per loop, on stderr.

Quiet mode (tests, scripts) prints nothing; the steps are the same either way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

_T = TypeVar("_T")


class Progress:
    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self._number = 0

    def step(self, text: str) -> None:
        self._number += 1
        if not self.quiet:
            print(f"[{self._number}] {text}", file=sys.stderr, flush=True)

    def bar(self, description: str) -> Callable[[Sequence[_T]], Iterable[_T]]:
        """A function wrapping a sequence in a progress bar labelled `description`."""

        def wrap(items: Sequence[_T]) -> Iterable[_T]:
            if self.quiet:
                return items
            from tqdm import tqdm

            return tqdm(items, desc=f"    {description}", unit="img", leave=False, file=sys.stderr)

        return wrap
