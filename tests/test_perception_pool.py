"""Perception in worker processes (`dpe.perception.pool`): same readings as in-process, recovery from a dead worker,
and no worker left behind when the process that started it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from dpe.perception import NotPerceived
from dpe.perception.pool import PerceptionPool, perceiving_in_processes
from dpe.perception.toolchain import TOOLCHAINS, build_toolchains
from dpe.world import generate_scene, render_scene

IMAGES = [render_scene(generate_scene(kind, level, seed=seed))
          for kind in ("shapes", "chart", "text", "formula") for level, seed in ((1, 3), (4, 8))]
BLANK = Image.new("RGB", (64, 64), (245, 245, 235))


@pytest.fixture(scope="module")
def pool():
    pool = PerceptionPool(2)
    pool.warm()
    yield pool
    pool.close()


def _same(a: object, b: object) -> bool:
    if isinstance(a, NotPerceived) or isinstance(b, NotPerceived):
        return type(a) is type(b) and (a.reason, a.detail) == (b.reason, b.detail)
    return a == b


@pytest.mark.parametrize("name", sorted(TOOLCHAINS))
def test_a_worker_reads_an_image_as_the_toolchain_does_here_refusals_included(pool, name: str) -> None:
    here = build_toolchains()[name]
    for image in [*IMAGES, BLANK]:
        assert _same(pool.read(name, image), here.read(image))
    refusal = pool.read(name, BLANK)
    assert isinstance(refusal, NotPerceived) and refusal.reason == "no_content"


def test_toolchains_read_in_the_pool_while_inside_and_here_after() -> None:
    toolchains = build_toolchains()
    sent: list[str] = []
    with perceiving_in_processes(1, toolchains) as pool:
        original = pool.read
        pool.read = lambda name, image: sent.append(name) or original(name, image)
        scene = toolchains["contours"].perceive(IMAGES[0])
        toolchains["contours"].perceive(IMAGES[0])
        with pytest.raises(NotPerceived):
            toolchains["regions"].perceive(BLANK)
    assert sent == ["contours", "regions"], "each image is sent once; the cache answers the second look"
    assert scene.objects
    toolchains["contours"].perceive(IMAGES[2])
    assert sent == ["contours", "regions"], "after the block the toolchains read here again"


def test_a_dead_worker_is_replaced_and_the_read_retried(pool) -> None:
    before = pool.pids()
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    time.sleep(0.5)
    assert _same(pool.read("regions", IMAGES[4]), build_toolchains()["regions"].read(IMAGES[4]))
    assert before[0] not in pool.pids()


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


def test_workers_exit_when_the_process_that_started_them_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from dpe.perception.pool import PerceptionPool\n"
        "if __name__ == '__main__':\n"
        "    pool = PerceptionPool(2)\n"
        "    pool.warm()\n"
        "    print(*pool.pids(), flush=True)\n"
        "    time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        workers = [int(pid) for pid in owner.stdout.readline().split()]
        assert len(workers) == 2 and not any(_gone(pid) for pid in workers)
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_gone(pid) for pid in workers), "a worker outlived the process that started it"
    finally:
        owner.kill()
