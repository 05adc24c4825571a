"""Decode memory: a pixel budget shared by the photos being decoded, and giving memory back.

A 50-megapixel PNG decodes to ~150 MB of pixels, and the resize to the model input briefly needs
about as much again; PNG has no reduced-size decoding, so four of them at once would take a small
box's memory. `PixelBudget` lets photos decode together only while their pixel counts fit in
`decode_pixel_budget`; a photo that does not fit waits briefly for room, then is refused
(`OverloadedError`, 503 + Retry-After). A photo larger than the whole budget runs alone.

glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which the
allocations of the next large decode (the resize's 16 MiB image blocks, OpenCV's buffers) come
from per-thread heaps that it rarely returns to the system: four 49-megapixel PNGs left the agent
at 4x its baseline RSS. So `map_large_blocks` pins the threshold at 16 MiB (blocks that large are
always mapped, and unmapped when freed; an ordinary photo's buffers stay below it and keep being
reused from the heap), and `give_memory_back` calls `malloc_trim(0)` after large decodes for what
is left in the heaps. Where the C library is not glibc (musl, macOS) both do nothing.

Pinning the mmap threshold also stops glibc's dynamic trim threshold, which then stays at its
128 KiB default: every free that left more than 128 KiB at the top of a heap gave it back to the
system, and the next photo's buffers (a body's 256 KiB reads, a 2 MB decoded image) took page
faults to get it again. That churn was most of the HTTP body receive (6.8 ms for a 2.5 MB photo,
against 2 ms in a plain uvicorn app). So the trim threshold is pinned too, at 8 MiB: above an
ordinary photo's buffers, below the blocks that are mapped anyway. (At 32 MiB, the 2x ratio of
glibc's own dynamic rule, the agent's RSS grew by 54 MiB for no further speed; at 8 MiB it stayed
below what it was before.) The explicit `malloc_trim(0)` after large decodes still gives the heaps
back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import platform
from collections.abc import AsyncIterator

from edge_agent.errors import OverloadedError

#: A decode of at least this many pixels (~12 MB of RGB) is "large": memory is given back after.
LARGE_PIXELS = 4_000_000
RETRY_AFTER_S = 1.0
#: Allocations this large or larger are always mapped (glibc's M_MMAP_THRESHOLD).
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024
#: Free memory above this much at the top of a heap is given back (glibc's M_TRIM_THRESHOLD).
TRIM_THRESHOLD_BYTES = 8 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


class PixelBudget:
    """Pixels being decoded at once; single event loop, so a condition suffices."""

    def __init__(self, pixels: int) -> None:
        self.capacity = pixels
        self.held = 0
        self.large_held = 0  # reservations of LARGE_PIXELS or more
        self._changed = asyncio.Condition()

    def _fits(self, cost: int) -> bool:
        return self.held + cost <= self.capacity

    @contextlib.asynccontextmanager
    async def reserve(self, pixels: int, wait_s: float) -> AsyncIterator[None]:
        """Hold `pixels` of the budget for the block, after waiting up to `wait_s` for room."""
        cost = min(pixels, self.capacity)  # larger than the whole budget: runs alone
        if not self._fits(cost):
            try:
                async with self._changed, asyncio.timeout(max(wait_s, 0.0)):
                    await self._changed.wait_for(lambda: self._fits(cost))
            except TimeoutError:
                raise OverloadedError(
                    f"a {pixels:,}-pixel photo would not fit in the decode memory budget "
                    f"({self.held:,} of {self.capacity:,} pixels are being decoded); retry "
                    "after a second, or send a smaller photo",
                    retry_after_s=RETRY_AFTER_S,
                ) from None
        large = pixels >= LARGE_PIXELS
        self.held += cost
        self.large_held += large
        try:
            yield
        finally:
            self.held -= cost
            self.large_held -= large
            async with self._changed:
                self._changed.notify_all()


def _glibc() -> ctypes.CDLL | None:
    """glibc with malloc_trim and mallopt, or None where the C library is something else."""
    if platform.libc_ver()[0] != "glibc":
        return None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        return libc
    return None


_GLIBC = _glibc()


def map_large_blocks() -> bool:
    """Pin the mmap threshold at MMAP_THRESHOLD_BYTES and the trim threshold at
    TRIM_THRESHOLD_BYTES (process-wide; idempotent)."""
    if _GLIBC is None:
        return False
    trim = _GLIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    mapped = _GLIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return bool(mapped and trim)


def give_memory_back() -> bool:
    """Return the allocator's free memory to the system; False where that is not possible."""
    if _GLIBC is None:
        return False
    _GLIBC.malloc_trim(0)
    return True
