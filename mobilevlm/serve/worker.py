"""A bounded first-come-first-served queue in front of the model, run by one worker thread.

One generation runs at a time (the model holds one KV cache; on CPU, batching gains little and would tie
each answer's length to its batch), so every client gets exactly the answer it would get alone. `max_queue`
bounds the requests admitted (running + waiting): a request takes its place with `reserve` before any of its
images is fetched or decoded (beyond the limit QueueFull, and the server answers 429), then `submit`s its job
to that place. A request whose client goes away is cancelled: if it is still waiting its place (and the memory
its images hold) is freed at once, if it is running the generation is stopped at its next streamed piece.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

import torch

from mobilevlm.errors import MobileVLMError
from mobilevlm.serve.budget import Reservation

log = logging.getLogger("mobilevlm.serve")


class QueueFull(Exception):
    pass


@dataclass
class Job:
    loop: asyncio.AbstractEventLoop
    request_id: str
    prompt: str = ""
    pixels: list[torch.Tensor] = field(default_factory=list)  # one [1, 3, S, S] tensor per image
    settings: dict = field(default_factory=dict)
    seed: int | None = None
    memory: Reservation | None = None  # the budget bytes `pixels` hold
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    released: bool = False

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass

    async def next_event(self) -> tuple[str, object]:
        """("piece", text) ..., then ("done", None), ("error", exception) or ("cancelled", None)."""
        return await self.events.get()


class WorkQueue:
    def __init__(self, pipeline, max_queue: int):
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.pipeline, self.max_queue = pipeline, max_queue
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.pending = 0
        self.running = 0
        self.completed = 0
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name="mobilevlm-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def stats(self) -> dict:
        with self._lock:
            return {"pending": self.pending, "running": self.running, "limit": self.max_queue,
                    "completed": self.completed, "cancelled": self.cancelled}

    def _check_room(self) -> None:  # caller holds the lock
        if self.pending >= self.max_queue:
            raise QueueFull(f"the server is busy: {self.pending} requests are queued or running "
                            f"(limit {self.max_queue}); retry later")

    def ensure_room(self) -> None:
        """Raises QueueFull now, so that a request that would be refused does not even have its body read."""
        with self._lock:
            self._check_room()

    def reserve(self, request_id: str) -> Job:
        """Takes a place in the queue for a job to be submitted (or cancelled) later; QueueFull if there is none."""
        job = Job(asyncio.get_running_loop(), request_id)
        with self._lock:
            self._check_room()
            self.pending += 1
        return job

    def submit(self, job: Job, prompt: str, pixels: list[torch.Tensor], settings: dict, seed: int | None,
               memory: Reservation) -> None:
        job.prompt, job.pixels, job.settings, job.seed, job.memory = prompt, pixels, settings, seed, memory
        self._jobs.put(job)

    def unreserve(self, job: Job) -> None:
        """Gives back the place of a job that will not be submitted (its request was refused)."""
        with self._lock:
            if not job.released:
                self._release(job)

    def cancel(self, job: Job) -> None:
        """Called when the client is gone or has everything; harmless after the job ended."""
        job.cancelled.set()
        with self._lock:
            if not job.started and not job.released:
                self._release(job)
                self.cancelled += 1
                job.emit("cancelled")  # the worker will skip it: end the handler's wait here

    def _release(self, job: Job) -> None:  # caller holds the lock
        job.released = True
        self.pending -= 1
        job.pixels = []
        if job.memory is not None:
            job.memory.release()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                if job.released:  # cancelled while waiting
                    continue
                job.started = True
                self.running += 1
            stopped_early = False
            try:
                if job.seed is not None:
                    torch.manual_seed(job.seed)  # one job at a time, so the global generator is ours
                stream = self.pipeline.stream(job.prompt, job.pixels, **job.settings)
                try:
                    for piece in stream:
                        if job.cancelled.is_set():
                            stopped_early = True
                            break
                        job.emit("piece", piece)
                finally:
                    stream.close()  # stops the generation thread and waits for it: the model is free after this
                job.emit("done")
            except MobileVLMError as err:
                job.emit("error", err)
            except Exception as err:  # a bug must not kill the worker: report it to this client, keep serving
                log.exception("generation failed (request id %s)", job.request_id)
                job.emit("error", err)
            finally:
                with self._lock:
                    self.running -= 1
                    self._release(job)
                    if stopped_early:
                        self.cancelled += 1
                    else:
                        self.completed += 1
