"""Memory booking (farm/kinds/vram.py, common/model_size.py, worker/device_memory.py): the formula, the sizes
read from real weight files, what a worker advertises, and in process that the coordinator never leases a
task to a worker it does not fit and refuses at submit a job that fits no worker.

The end-to-end routing through real workers is tests/e2e/test_vram_routing.py.
"""
from __future__ import annotations

import pytest

from common import model_size
from common import protocol as P
from farm.kinds import vram
from farm.kinds.jobs import JobError
from farm.store.models import Job, Task
from tests.fixtures_inproc import Driver, make_engine_and_store, make_user, new_coordinator, of, rows

GiB = 1 << 30
RUNTIMES = ["blender", "contact_sheet", "diffusion"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from worker.runtimes.tiny_pipeline import build
    return build(tmp_path_factory.mktemp("models") / "tiny-sd")


# ------------------------------------------------------------------ the formula
def test_formula_written_out_for_sd15_at_512_on_cuda():
    m = {"family": "sd1", "params": 1_066_000_000, "unet_channels": 320, "vae_channels": 128}
    weights = 1_066_000_000 * 2
    unet = 230.0 * 320 * 64 * 64 * 1 * 2 * 2
    vae = 20.0 * 128 * 512 * 512 * 1 * 2
    want = int((weights + max(unet, vae)) * 1.25 + (768 << 20))
    assert vram.estimate(m, [], [], 512, 512, 1, "cuda") == want
    assert 3.5 * GiB < want < 6 * GiB  # published peak about 3.5 GB, plus the margin and the context


def test_need_grows_with_size_batch_pieces_family_and_float32():
    sd = {"family": "sd1", "params": 1_066_000_000, "unet_channels": 320, "vae_channels": 128}
    xl = {"family": "sdxl", **{k: v for k, v in vram.DEFAULTS["sdxl"].items()}}
    e = vram.estimate
    one, four = e(sd, [], [], 512, 512, 1, "cuda"), e(sd, [], [], 512, 512, 4, "cuda")
    # activations are linear in the micro-batch: need(4) - need(1) = 3 × (need(1) - weights and fixed)
    act1 = one - int((1_066_000_000 * 2) * 1.25 + (768 << 20))
    assert abs((four - one) - 3 * act1) < 16
    assert e(sd, [], [], 768, 768, 1, "cuda") > one
    assert e(sd, [], [], 512, 512, 1, "cpu") > 1.8 * (one - (768 << 20))  # float32 weights
    lora, net = {"params": 50_000_000}, {"params": 361_000_000, "unet_channels": 320}
    assert abs(e(sd, [lora], [], 512, 512, 1, "cuda") - one - 50_000_000 * 2 * 1.25) <= 1  # its weights
    assert e(sd, [], [net, net], 512, 512, 1, "cuda") > e(sd, [], [net], 512, 512, 1, "cuda") > one
    big = e(xl, [], [], 1024, 1024, 1, "cuda")
    assert 12 * GiB < big < 20 * GiB, big / GiB  # SDXL at 1024²: about 11-12 GB measured by others


def test_a_refiner_adds_its_weights_and_an_upscaler_its_weights_and_its_4x_decode():
    xl = {"family": "sdxl", **vram.DEFAULTS["sdxl"]}
    e = vram.estimate
    base = e(xl, [], [], 1024, 1024, 1, "cuda")
    refiner = {"family": "sdxl", "params": 2_300_000_000, "unet_channels": 384, "vae_channels": 128}
    assert abs(e(xl, [], [], 1024, 1024, 1, "cuda", refiner=refiner) - base - 2_300_000_000 * 2 * 1.25) <= 1
    sd = {"family": "sd1", "params": 1_066_000_000, "unet_channels": 320, "vae_channels": 128}
    up = {"params": 473_000_000, "unet_channels": 256, "vae_channels": 128}
    weights = (1_066_000_000 + 473_000_000) * 2
    up_unet = 230.0 * 256 * 512 * 512 * 2 * 2  # its UNet on latents at the image's own pixels
    up_vae = 20.0 * 128 * 2048 * 2048 * 2      # its VAE decoding the 2048² result
    want = int((weights + max(up_unet, up_vae)) * 1.25 + (768 << 20))
    assert e(sd, [], [], 512, 512, 1, "cuda", upscaler=up) == want
    assert want > e(sd, [], [], 512, 512, 4, "cuda")  # more than four 512² images: the x4 result dominates


# ------------------------------------------------------------------ sizes from real files
def test_sizes_of_a_real_pipeline_folder_match_the_loaded_models(tiny):
    import torch  # the test may load the model; the daemon and the coordinator only read headers
    from diffusers import StableDiffusionPipeline
    size = model_size.pipeline_size(tiny)
    p = StableDiffusionPipeline.from_pretrained(tiny, local_files_only=True, dtype=torch.float32)
    loaded = sum(x.numel() for m in (p.unet, p.text_encoder, p.vae) for x in m.state_dict().values())
    assert size["params"] == loaded
    assert (size["family"], size["unet_channels"], size["vae_channels"]) == \
        ("sd1", p.unet.config.block_out_channels[0], p.vae.config.block_out_channels[0])


def test_the_coordinators_own_refiner_and_upscaler_are_sized_from_their_folders(tiny, tmp_path, monkeypatch):
    from worker.runtimes.tiny_pipeline import build_refiner, build_upscaler
    models = tmp_path / "models"
    up = build_upscaler(models / "upscalers" / "x4")
    ref = build_refiner(models / "refiners" / "xl-ref")
    monkeypatch.setenv("RENDERHIVE_MODELS", str(models))
    assert vram.local_size("x4", "upscaler") == vram._clean(model_size.pipeline_size(up))
    assert vram.local_size("xl-ref", "refiner")["params"] == model_size.pipeline_size(ref)["params"] > 0
    assert vram.local_size("xl-ref", "upscaler") is None, "a refiner is not an upscaler"
    assert vram.local_size("../refiners/xl-ref", "upscaler") is None, "a name, never a path"
    assert vram.local_size(".", "refiner") is None


def test_a_hostile_header_counts_nothing(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")  # a header length far past the file
    assert model_size.safetensors_params(bad) == 0
    bad.write_bytes((20).to_bytes(8, "little") + b'{"a": {"shape": [-5]}}')
    assert model_size.safetensors_params(bad) == 0
    assert vram._clean({"params": True}) is None and vram._clean({"params": 10**30}) is None
    assert vram._clean({"params": 5, "family": "evil", "unet_channels": -1}) == {"params": 5}


# ------------------------------------------------------------------ the worker's advert
def test_worker_advert_splits_a_gpu_between_its_slots_and_the_limit_caps_it():
    from worker import device_memory as dm
    smi = dm.parse_smi("0, 81559, 80000\n1, 24564, 20000\n2, [N/A], [N/A]\n")
    assert smi == {0: (81559 << 20, 80000 << 20), 1: (24564 << 20, 20000 << 20)}
    assert dm.advert(["cuda:0", "cuda:0"], 8 * GiB, None, smi) == \
        {"device": "cuda", "bytes": (80000 << 20) // 2, "source": "nvidia-smi free memory split between slots"}
    assert dm.advert(["cuda:0", "cuda:1"], 8 * GiB, None, smi)["bytes"] == 20000 << 20  # the smaller GPU
    assert dm.advert(["cuda:0"], 8 * GiB, 6 * GiB, smi) == {"device": "cuda", "bytes": 6 * GiB, "source": "--vram-limit"}
    assert dm.advert(["cuda:2"], 8 * GiB, None, smi)["bytes"] == 0  # unknown GPU: nothing booked to it
    assert dm.advert(["cpu"], 8 * GiB, None, smi) == {"device": "cpu", "bytes": 8 * GiB, "source": "sandbox memory limit"}
    assert dm.advert(["cpu"], 8 * GiB, 2 * GiB, smi)["bytes"] == 2 * GiB
    assert [dm.parse_limit(x) for x in ("6", "1.5", "512M", "6G", "6GiB", "4096MB")] == \
        [6 * GiB, 3 * GiB // 2, 512 << 20, 6 * GiB, 6 * GiB, 4 * GiB]
    for bad in ("", "-1", "lots", "0"):
        with pytest.raises(ValueError, match="give GiB"):
            dm.parse_limit(bad)


def test_hello_with_memory_round_trips_and_old_or_malformed_adverts_count_as_a_small_cpu():
    caps = {"runtimes": RUNTIMES, "memory": {"device": "cuda", "bytes": 24 * GiB, "source": "nvidia-smi"},
            "models": [{"name": "m", "hash": "ab" * 32, "size": {"params": 10, "family": "sd1"}}]}
    hello = P.Hello("w", "0x", 1, caps)
    assert P.decode(P.encode(hello)) == hello
    assert vram.worker_memory(caps) == ("cuda", 24 * GiB)
    for bad in ({}, {"memory": {"device": "tpu", "bytes": 5}}, {"memory": {"device": "cuda", "bytes": "9"}},
                {"memory": {"device": "cuda", "bytes": True}}, {"memory": [1]}, None):
        assert vram.worker_memory(bad) == ("cpu", vram.UNADVERTISED_BYTES)
    need = {"cuda": 5 * GiB, "cpu": 9 * GiB}
    assert vram.fits(need, ("cuda", 6 * GiB)) and not vram.fits(need, ("cpu", 6 * GiB))
    assert vram.fits(None, ("cpu", 0)) and vram.fits({"cuda": "x"}, ("cuda", 0))


# ------------------------------------------------------------------ in process: leasing and submit
@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("RENDERHIVE_MODELS", str(tmp_path / "none"))  # the coordinator holds no model copy
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    user, _ = make_user(engine, "alice")
    coord = new_coordinator(engine, blobs)
    return engine, user, coord, Driver(coord)


def _create(engine, user, **req):
    from farm.kinds import diffusion
    from farm.store.db import session
    with session(engine) as s:
        job = diffusion.create_diffusion_job(s, user, {"model": "tiny-sd", "prompts": ["a cat"], "steps": 4,
                                                       "width": 64, "height": 64, **req})
        s.commit()
        return job.id


TINY_SIZE = {"params": 938_499, "family": "sd1", "unet_channels": 32, "vae_channels": 8}
TINY = {"name": "tiny-sd", "hash": "ab" * 32, "size": TINY_SIZE}


def test_tasks_go_only_to_workers_they_fit_and_a_job_nobody_fits_is_refused(env):
    engine, user, coord, d = env
    d.hello(b"small", runtimes=RUNTIMES, models=[TINY], memory={"device": "cpu", "bytes": 2 * GiB})
    d.hello(b"big", runtimes=RUNTIMES, models=[TINY], memory={"device": "cpu", "bytes": 16 * GiB})
    small_need = vram.estimate(TINY_SIZE, [], [], 64, 64, 1, "cpu")
    big_need = vram.estimate(TINY_SIZE, [], [], 512, 512, 4, "cpu")
    assert small_need < 2 * GiB < big_need < 16 * GiB
    big = _create(engine, user, width=512, height=512, per_task=4, count=8, seed=1)
    job = rows(engine, Job, Job.id == big)[0]
    assert job.spec["memory_need"] == {"cuda": vram.estimate(TINY_SIZE, [], [], 512, 512, 4, "cuda"), "cpu": big_need}
    for _ in range(3):  # the small worker asks again and again: never one of the big job's tasks
        assert not of(d.send((b"small", P.Ready(1))), P.Task)
    got = of(d.send((b"big", P.Ready(2))), P.Task, b"big")
    assert got and all(t.job_id == big and t.spec["memory_need"]["cpu"] == big_need for t in got)
    small = _create(engine, user, count=2, seed=5)
    (t,) = of(d.send((b"small", P.Ready(1))), P.Task, b"small")
    assert t.job_id == small
    assert {r.job_id for r in rows(engine, Task, Task.worker_id == "small")} == {small}
    with pytest.raises(JobError, match=r"needs \d+\.\d GiB on a GPU worker .* largest worker holding 'tiny-sd' "
                                       r"has 16\.0 GiB \(big, cpu\)") as e:
        _create(engine, user, width=2048, height=2048, per_task=4)
    assert e.value.status == 422
    # an earlier worker (no memory advert) is booked as a 4 GiB CPU: a 6 GiB job's tasks never go to it
    huge = _create(engine, user, width=1024, height=1024, per_task=4, count=4)
    assert 4 * GiB < rows(engine, Job, Job.id == huge)[0].spec["memory_need"]["cpu"] < 16 * GiB
    d.hello(b"old", runtimes=RUNTIMES, models=[{"name": "tiny-sd", "hash": "ab" * 32}])
    for _ in range(3):
        assert not any(t.job_id == huge for t in of(d.send((b"old", P.Ready(4))), P.Task, b"old"))
    assert not rows(engine, Task, Task.job_id == huge, Task.worker_id.in_(["old", "small"]))


def test_a_model_whose_size_nobody_advertised_books_nothing(env):
    engine, user, coord, d = env
    d.hello(b"old", runtimes=RUNTIMES, models=[{"name": "tiny-sd", "hash": "ab" * 32}])
    job_id = _create(engine, user, width=1024, height=1024, per_task=8)
    assert "memory_need" not in rows(engine, Job, Job.id == job_id)[0].spec
    assert of(d.send((b"old", P.Ready(1))), P.Task, b"old")
