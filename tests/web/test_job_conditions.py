"""The job page shows, beside each image of a diffusion job, what made it: prompt, seed, LoRAs with weights,
ControlNets with weights and their condition image as a thumbnail, the inpainting mask and image. Real app
(create_app), real coordinator stepping real messages, real PNG uploads; the page read as HTML figure by
figure, and the thumbnails fetched and decoded. Only the job's own inputs are served as thumbnails.
"""
from __future__ import annotations

import io
import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from common import protocol as P
from farm.web.app import create_app
from tests.fixtures_inproc import Driver, make_engine_and_store, make_user, new_coordinator, of, sha256

RUNTIMES = ["blender", "contact_sheet", "diffusion"]
MODELS = [{"name": "tiny-sd", "hash": "ab" * 32}, {"name": "ink", "hash": "cd" * 32, "kind": "lora"},
          {"name": "depth", "hash": "ef" * 32, "kind": "controlnet"},
          {"name": "canny", "hash": "12" * 32, "kind": "controlnet"}]


def png(color, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


class Figures(HTMLParser):
    """Each <figure> of the gallery: its preview's src, and the conditions list's text and image srcs."""
    def __init__(self):
        super().__init__()
        self.figures, self.cur, self.in_dl, self.key = [], None, False, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self.cur = {"preview": None, "image": None, "text": {}, "thumbs": []}
        elif self.cur is None:
            return
        elif tag == "img" and not self.in_dl:
            self.cur["preview"] = a.get("src")
        elif tag == "dl" and "conditions" in (a.get("class") or ""):
            self.in_dl, self.cur["image"] = True, a.get("data-image")
        elif tag == "img" and self.in_dl:
            self.cur["thumbs"].append((self.key, a.get("src")))
        elif tag == "dd" and self.in_dl:
            self.key = a.get("class")
            self.cur["text"].setdefault(self.key, []).append("")

    def handle_endtag(self, tag):
        if tag == "dl":
            self.in_dl = False
        elif tag == "dd":
            self.key = None
        elif tag == "figure" and self.cur is not None:
            self.figures.append(self.cur)
            self.cur = None

    def handle_data(self, data):
        if self.in_dl and self.key and self.cur["text"].get(self.key):
            self.cur["text"][self.key][-1] += data


def text(fig, key):
    return [" ".join(t.split()) for t in fig["text"].get(key, [])]


@pytest.fixture
def site(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    _, admin = make_user(engine, "admin", admin=True)
    app = create_app(engine, blobs, broker=None)
    d = Driver(new_coordinator(engine, blobs))
    d.hello(b"w1", runtimes=RUNTIMES, models=MODELS)
    with TestClient(app) as alice, TestClient(app) as bob:
        hdr = {"Authorization": f"Bearer {admin}"}
        tokens = {n: alice.post("/api/users", json={"name": n}, headers=hdr).json()["token"] for n in ("alice", "bob")}
        for c, n in ((alice, "alice"), (bob, "bob")):
            csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
            assert c.post("/login", data={"csrf": csrf, "token": tokens[n]}).status_code in (200, 303)
        yield {"alice": alice, "bob": bob, "auth": {"Authorization": f"Bearer {tokens['alice']}"}, "d": d,
               "blobs": blobs}


def upload(http, auth, data: bytes) -> str:
    sha = sha256(data)
    assert http.put(f"/api/blobs/{sha}", content=data, headers=auth).status_code in (200, 201)
    return sha


def finish(site, job_id: int) -> None:
    """Lease every image task to the worker and hand in a real PNG for each image."""
    d, blobs = site["d"], site["blobs"]
    for _ in range(10):
        tasks = [t for t in of(d.send((b"w1", P.Ready(8))), P.Task) if t.job_id == job_id]
        if not tasks:
            break
        for t in tasks:
            names = [im["name"] for im in t.spec["images"]] if t.kind == "diffusion" else t.spec["outputs"]
            outs = []
            for i, name in enumerate(names):  # a real picture, one colour an image
                data = png((40 * i, 120, 200 if name.startswith("image_") else 20))
                outs.append({"frame": i, "sha256": blobs.write_bytes(data), "size": len(data), "name": name,
                             "seconds": 0.1})
            assert of(d.send((b"w1", P.Result(t.task_id, t.attempt, outs, 0.1))), P.Ack)[0].accepted


def test_each_image_shows_its_own_prompt_seed_loras_and_controlnets_beside_it(site):
    alice, auth = site["alice"], site["auth"]
    depth, edges = upload(alice, auth, png((90, 90, 90))), upload(alice, auth, png((255, 255, 255)))
    r = alice.post("/api/jobs/diffusion", headers=auth, json={
        "model": "tiny-sd", "prompts": ["a red robot", "a blue castle"], "count": 2, "seed": 100, "steps": 4,
        "width": 64, "height": 64, "per_task": 2, "loras": [{"name": "ink", "weight": 0.7}],
        "controls": [{"name": "depth", "weight": 0.8, "image": depth}, {"name": "canny", "weight": 0.5, "image": edges}]})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    finish(site, job_id)
    page = alice.get(f"/jobs/{job_id}")
    assert page.status_code == 200
    parser = Figures()
    parser.feed(page.text)
    figs = {f["image"]: f for f in parser.figures if f["image"]}
    assert sorted(figs) == [f"image_{k:04d}.png" for k in range(4)]
    for k in range(4):
        fig = figs[f"image_{k:04d}.png"]
        assert fig["preview"] == f"/jobs/{job_id}/previews/image_{k:04d}.png"  # beside its own image
        assert text(fig, "prompt") == [["a red robot", "a blue castle"][k // 2]]
        assert text(fig, "seed") == [str(100 + k)]
        assert text(fig, "lora") == ["ink × 0.7"]
        assert text(fig, "control") == ["depth × 0.8", "canny × 0.5"]
        assert fig["thumbs"] == [("control", f"/jobs/{job_id}/conditions/{depth}"),
                                 ("control", f"/jobs/{job_id}/conditions/{edges}")]
    assert len(parser.figures) == 5  # the contact sheet too, with no conditions list
    thumb = alice.get(f"/jobs/{job_id}/conditions/{depth}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert max(im.size) <= 64
    # only this job's inputs, only to its creator
    assert site["bob"].get(f"/jobs/{job_id}/conditions/{depth}").status_code == 404
    other = upload(alice, auth, png((1, 2, 3)))
    assert alice.get(f"/jobs/{job_id}/conditions/{other}").status_code == 404


def test_an_inpainting_image_shows_its_mask_and_init_image(site):
    alice, auth = site["alice"], site["auth"]
    init, mask = upload(alice, auth, png((10, 200, 10))), upload(alice, auth, png((0, 0, 0)))
    r = alice.post("/api/jobs/diffusion", headers=auth, json={
        "model": "tiny-sd", "prompts": ["a garden"], "seed": 7, "steps": 4, "init_image": init, "mask": mask,
        "strength": 0.9})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    finish(site, job_id)
    parser = Figures()
    parser.feed(alice.get(f"/jobs/{job_id}").text)
    (fig,) = [f for f in parser.figures if f["image"]]
    assert fig["image"] == "image_0000.png" and text(fig, "seed") == ["7"] and text(fig, "strength") == ["0.9"]
    assert fig["thumbs"] == [("mask", f"/jobs/{job_id}/conditions/{mask}"), ("init", f"/jobs/{job_id}/conditions/{init}")]
    for sha in (mask, init):
        assert alice.get(f"/jobs/{job_id}/conditions/{sha}").status_code == 200
