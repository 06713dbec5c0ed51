"""Perception in worker processes, so that reading images uses every core.

The toolchains are NumPy, SciPy and OpenCV on small images: most of their time is Python holding the
interpreter lock, so threads of one process read one image at a time (measured: an agent worker used
1.3 to 1.6 of 2 cores while its crew waited on perception). `PerceptionPool` reads in spawned worker
processes instead; the calling thread waits without the lock. The toolchains' caches stay in the
calling process, so an image is sent once and every role that looks at it shares the reading.

`perceiving_in_processes` routes the process's toolchains (`TOOLCHAINS`) through a pool while
inside it. A worker exits when the process that started it is gone (killed included), and a pool
whose worker died is replaced on the next read, which is then retried once.

Example:
    >>> from dpe.world import generate_scene, render_scene
    >>> scene = generate_scene("formula", 2, seed=5)
    >>> with perceiving_in_processes(1):
    ...     seen = TOOLCHAINS["regions"].perceive(render_scene(scene))
    >>> seen.formula.value() == scene.formula.value()
    True
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from PIL import Image

from dpe.perception import NotPerceived
from dpe.perception.toolchain import TOOLCHAINS, Toolchain
from dpe.world import Scene, generate_scene, render_scene

log = logging.getLogger(__name__)

PARENT_CHECK_S = 1.0
"""How often a worker checks that the process that started it is still there."""


class PerceptionPool:
    """`workers` spawned processes that read images with their own copy of the toolchains."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"a perception pool needs at least one worker, got {workers}")
        self.workers = workers
        self._lock = threading.Lock()
        self._executor = self._spawn()

    def read(self, toolchain: str, image: Image.Image) -> Scene | NotPerceived:
        """The reading of an RGB `image` by the named toolchain in a worker (uncached: the caller caches)."""
        executor = self._executor
        try:
            return executor.submit(_read, toolchain, image.size, image.tobytes()).result()
        except BrokenProcessPool:
            log.warning("perception: a worker process died; starting a new pool and reading again")
            return self._replace(executor).submit(_read, toolchain, image.size, image.tobytes()).result()

    def warm(self) -> None:
        """Start every worker and load its readers (OCR models included), so the first reads are not slow."""
        list(self._executor.map(_warm, range(self.workers)))

    def pids(self) -> list[int]:
        """The ids of the worker processes running now."""
        return [process.pid for process in list(self._executor._processes.values()) if process.is_alive()]

    def close(self) -> None:
        """Stop the workers (reads in flight finish first)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _spawn(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_follow_parent, initargs=(os.getpid(),))

    def _replace(self, broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._executor = self._spawn()
            return self._executor


@contextlib.contextmanager
def perceiving_in_processes(workers: int, toolchains: Mapping[str, Toolchain] = TOOLCHAINS
                            ) -> Iterator[PerceptionPool]:
    """While inside, `toolchains` read uncached images in a warmed pool of `workers` processes."""
    pool = PerceptionPool(workers)
    try:
        pool.warm()
        for name, toolchain in toolchains.items():
            toolchain.read_elsewhere(lambda image, name=name: pool.read(name, image))
        yield pool
    finally:
        for toolchain in toolchains.values():
            toolchain.read_elsewhere(None)
        pool.close()


def _read(toolchain: str, size: tuple[int, int], pixels: bytes) -> Scene | NotPerceived:
    return TOOLCHAINS[toolchain].read(Image.frombytes("RGB", size, pixels))


def _warm(_: int) -> None:
    image = render_scene(generate_scene("text", 1, seed=0))
    for toolchain in TOOLCHAINS.values():
        toolchain.read(image)
    time.sleep(0.2)  # hold this task a moment, so that each worker takes one of the warm-up tasks


def _follow_parent(parent: int) -> None:
    """In a worker: exit once `parent` is gone, even when it was killed and never shut the pool down."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="perception-parent-watch", daemon=True).start()
