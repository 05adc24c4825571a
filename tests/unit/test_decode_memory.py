"""Decode memory (#15): the pixel count read from the header, the pixel budget shared by photos
being decoded (wait for room, refuse after the wait, a photo larger than the budget runs alone),
giving memory back, and the in-place colour conversion's output."""

from __future__ import annotations

import asyncio

import cv2
import numpy as np
import pytest

from edge_agent.engine.memory import LARGE_PIXELS, PixelBudget, give_memory_back, map_large_blocks
from edge_agent.errors import OverloadedError
from edge_bundle.imaging import decode_image, decoded_pixels
from tests.images import encode, natural_image


def test_decoded_pixels_counts_what_the_decoder_will_allocate() -> None:
    image = natural_image(1200, 1600, seed=2)
    png, jpeg = encode(image, "png"), encode(image, "jpeg")
    assert decoded_pixels(png) == 1600 * 1200
    assert decoded_pixels(png, target_hw=(32, 32)) == 1600 * 1200  # PNG has no reduced decode
    assert decoded_pixels(jpeg, target_hw=(224, 224)) == 800 * 600  # decoded at 1/2
    assert decoded_pixels(jpeg, target_hw=(32, 32)) == 200 * 150  # at 1/8
    for data, target in ((png, None), (jpeg, (32, 32))):
        decoded = decode_image(data, target_hw=target).pixels
        assert decoded_pixels(data, target_hw=target) == decoded.shape[0] * decoded.shape[1]
    # Photos the decoder refuses before allocating cost nothing.
    assert decoded_pixels(png, max_pixels=1600 * 1200 - 1) == 0
    assert decoded_pixels(b"not an image") == 0


def test_the_colour_conversion_in_place_gives_the_same_pixels() -> None:
    image = natural_image(301, 403, seed=5)  # RGB
    data = encode(image, "png")
    decoded = decode_image(data).pixels
    assert np.array_equal(decoded, image)  # PNG is lossless
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(decoded, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def test_photos_decode_together_while_they_fit_and_the_next_waits_for_room() -> None:
    async def scenario() -> list[str]:
        budget = PixelBudget(10_000_000)
        events: list[str] = []
        release = asyncio.Event()

        async def decode(name: str, pixels: int) -> None:
            async with budget.reserve(pixels, wait_s=5):
                events.append(f"{name} in")
                await release.wait()
            events.append(f"{name} out")

        first = asyncio.create_task(decode("a", 6_000_000))
        second = asyncio.create_task(decode("b", 4_000_000))  # fits beside a
        await asyncio.sleep(0.01)
        third = asyncio.create_task(decode("c", 3_000_000))  # does not fit: waits
        await asyncio.sleep(0.01)
        assert budget.held == 10_000_000 and budget.large_held == 2
        release.set()
        await asyncio.gather(first, second, third)
        assert budget.held == 0 and budget.large_held == 0
        return events

    events = asyncio.run(scenario())
    assert events[:2] == ["a in", "b in"]
    assert events.index("c in") > events.index("a out")


def test_a_photo_that_finds_no_room_in_time_is_refused_with_retry_after() -> None:
    async def scenario() -> None:
        budget = PixelBudget(10_000_000)
        async with budget.reserve(8_000_000, wait_s=0):
            with pytest.raises(OverloadedError, match="decode memory budget") as caught:
                async with budget.reserve(5_000_000, wait_s=0.02):
                    pass
            assert caught.value.retry_after_s is not None
            assert budget.held == 8_000_000  # the refused photo took nothing
        assert budget.held == 0

    asyncio.run(scenario())


def test_a_photo_larger_than_the_whole_budget_runs_alone() -> None:
    async def scenario() -> None:
        budget = PixelBudget(10_000_000)
        async with budget.reserve(40_000_000, wait_s=0):
            assert budget.held == 10_000_000  # counted as the whole budget
            with pytest.raises(OverloadedError):
                async with budget.reserve(1, wait_s=0):
                    pass
        async with budget.reserve(LARGE_PIXELS - 1, wait_s=0):
            assert budget.large_held == 0

    asyncio.run(scenario())


def test_memory_is_given_back_on_glibc() -> None:
    import platform

    glibc = platform.libc_ver()[0] == "glibc"
    assert map_large_blocks() is glibc
    assert give_memory_back() is glibc
