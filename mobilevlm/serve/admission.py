"""Reading request bodies and decoding images with bounded workers, inside the server's memory budget.

A body is read by one of `body_readers` readers (a request waits up to the budget's wait for one, then gets 429)
and its bytes are taken from the budget as they arrive; images are decoded by `decode_workers` threads, each
decode first taking its estimated peak from the budget. Until a request's images are decoded its body stays
counted (the parsed request holds the data: URLs); after that only the pixel tensors stay counted, until the job
ends.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import Request

from mobilevlm.serve.apierror import ApiError
from mobilevlm.serve.budget import MemoryBudget, Reservation
from mobilevlm.serve.pixels import ImageFile, decode_cost, pixel_bytes, to_pixels

# Bytes of memory a body of one byte costs until it is parsed: the raw bytes, the text json.loads decodes them
# to and the strings it parses out (the base64 decoding of the images that follows needs less than the text).
BODY_COST = 3


class Admission:
    def __init__(self, pipeline, budget: MemoryBudget, max_body_bytes: int, body_readers: int, decode_workers: int,
                 body_timeout_s: float):
        if body_readers < 1 or decode_workers < 1:
            raise ValueError("body_readers and decode_workers must be at least 1")
        self.pipeline, self.budget = pipeline, budget
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        self.readers = asyncio.Semaphore(body_readers)
        self.decoders = asyncio.Semaphore(decode_workers)
        self.pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="mobilevlm-decode")
        self.pixel_bytes = pixel_bytes(pipeline)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    @asynccontextmanager
    async def _reader(self):
        try:
            async with asyncio.timeout(self.budget.wait_s):
                await self.readers.acquire()
        except TimeoutError:
            raise ApiError(429, "the server is busy: all its body readers are taken; retry later",
                           code="server_busy", headers={"Retry-After": "1"}) from None
        try:
            yield
        finally:
            self.readers.release()

    def _too_large(self, size: str) -> ApiError:
        return ApiError(413, f"request body {size}, the limit is {self.max_body_bytes}", code="request_too_large")

    async def read_body(self, request: Request, memory: Reservation) -> bytes:
        """The body, its cost taken into `memory`; 413 over the size limit, 408 if it does not arrive in time."""
        declared = request.headers.get("content-length", "")
        declared = int(declared) if declared.isdigit() else None
        if declared is not None and declared > self.max_body_bytes:
            raise self._too_large(f"is {declared} bytes")
        chunks, size = [], 0
        async with self._reader():
            if declared:
                await memory.grow(BODY_COST * declared, "the request body")
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    async for chunk in request.stream():
                        size += len(chunk)
                        if size > self.max_body_bytes:
                            raise self._too_large("exceeds the limit")
                        if declared is None:  # chunked upload: counted as it comes
                            await memory.grow(BODY_COST * len(chunk), "the request body")
                        chunks.append(chunk)
            except TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                               code="request_timeout") from None
        return b"".join(chunks)

    async def decode(self, files: list[ImageFile], memory: Reservation) -> tuple[list[torch.Tensor], Reservation]:
        """Each image's pixel tensor, and the reservation that holds their bytes (the caller hands it on).

        `memory` (the body's) is also charged each decode's peak while it runs. 413 if the request could not run
        even in an empty budget: its body, its pixel tensors and its largest decode at once."""
        if not files:
            return [], self.budget.reservation()
        costs = [decode_cost(file) for file in files]
        held = self.pixel_bytes * len(files)
        self.budget.check_fits(memory.size + held + max(costs), "this request")
        pixels_memory = self.budget.reservation()
        try:
            await pixels_memory.grow(held, "this request's images")
            loop = asyncio.get_running_loop()
            tensors = []
            for file, cost in zip(files, costs):
                async with self.decoders:
                    await memory.grow(cost, f"decoding the {file.width}x{file.height} image {file.where}")
                    try:
                        tensors.append(await loop.run_in_executor(self.pool, to_pixels, self.pipeline, file))
                    finally:
                        memory.shrink(cost)
            return tensors, pixels_memory
        except BaseException:
            pixels_memory.release()
            raise
