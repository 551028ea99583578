"""Memory booking end to end: a real `farm serve`, two real sandboxed `farm worker`s holding the same tiny
model but advertising different memory (``--vram-limit``), real diffusion jobs. A job too big for the small
worker runs only on the big one, task after task, while the small worker stays busy with a small job; the
queue ETA counts only the workers a job fits; a job no worker fits is refused at submit with the figures.
"""
from __future__ import annotations

import pytest

from client.api import ApiError
from common import model_size
from farm.kinds import vram
from farm.store.db import make_engine
from farm.store.models import Attempt, Output, Task
from tests.conftest import wait_job, wait_workers
from tests.fixtures_inproc import rows

SD_ENV = {"RENDERHIVE_DIFFUSION_THREADS": "1"}
GiB = 1 << 30


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from worker.runtimes.tiny_pipeline import build
    return build(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.mark.slow
def test_a_big_job_goes_only_to_the_worker_it_fits(farm, worker, tiny_model):
    size = model_size.pipeline_size(tiny_model)
    small_need = vram.estimate(size, [], [], 64, 64, 1, "cpu")
    big_need = vram.estimate(size, [], [], 256, 256, 2, "cpu")
    limit = (small_need + big_need) // 2  # the small worker fits the small job, not the big one
    f = farm()
    worker(f, "small", env=SD_ENV, models=[tiny_model.parent], args=["--vram-limit", f"{limit >> 20}M"])
    worker(f, "big", env=SD_ENV, models=[tiny_model.parent], args=["--vram-limit", "8G"])
    alice = f.creator("alice")
    wait_workers(alice, 2)
    common = dict(model="tiny-sd", prompts=["a red robot in a forest"], steps=2, seed=40)
    big = alice.submit_diffusion(**common, count=12, width=256, height=256, per_task=2)
    small = alice.submit_diffusion(**common, count=8, width=64, height=64, per_task=1)
    assert big["spec"]["memory_need"]["cpu"] == big_need > limit >= small_need
    assert alice.job(big["id"])["queue"]["workers_able"] == 1, "the ETA counted a worker the job does not fit"
    assert alice.job(small["id"])["queue"]["workers_able"] == 2
    with pytest.raises(ApiError, match=r"largest worker holding 'tiny-sd' has 8\.0 GiB \(big, cpu\)") as e:
        alice.submit_diffusion(**common, width=2048, height=2048, per_task=4)
    assert e.value.status == 422
    for j in (big, small):
        assert wait_job(alice, j["id"], timeout=300)["status"] == "rendered"
    engine = make_engine(f"sqlite:///{f.data / 'farm.db'}", upgrade=False)
    try:
        big_tasks = rows(engine, Task, Task.job_id == big["id"], Task.kind == "diffusion")
        attempts = rows(engine, Attempt, Attempt.job_id == big["id"])
        outputs = rows(engine, Output, Output.job_id == big["id"])
        small_by = {a.worker_id for a in rows(engine, Attempt, Attempt.job_id == small["id"])
                    if a.task_id in {t.id for t in rows(engine, Task, Task.job_id == small["id"],
                                                        Task.kind == "diffusion")}}
    finally:
        engine.dispose()
    image_ids = {t.id for t in big_tasks}
    big_attempts = [a for a in attempts if a.task_id in image_ids]
    assert len(image_ids) == 6 and len(big_attempts) >= 6
    assert {a.worker_id for a in big_attempts} == {"big"}, "a big task was leased to the small worker"
    assert {o.worker_id for o in outputs if o.name.startswith("image_")} == {"big"}
    assert "small" in small_by, "the small worker did none of the small job (it was never tried)"
