"""The approval page in a real browser (Debian's Chromium driven by Playwright) against a real farm:
sign in, watch a job render, open a preview, reject a frame, see it re-render, approve, download the zip.
Plus the security rules: other creators, unapproved downloads, CSRF."""
from __future__ import annotations

import hashlib
import io
import re
import shutil
import zipfile

import httpx
import pytest

from tests.conftest import submit_sample, wait_for, wait_job, wait_workers

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def sign_in(page, url: str, token: str) -> None:
    page.goto(f"{url}/login")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r".*/jobs$"))


def settled_page(page, status: str, timeout: float = 60_000) -> None:
    """Wait for a document the server rendered in ``status``. The job page reloads itself once when the
    status changes (approved → paid re-renders the settlement); a screenshot taken while that reload is
    under way hangs, so the shot waits for the page rendered in the final state, which no longer reloads."""
    page.wait_for_selector(f"#job[data-live*='\"status\": \"{status}\"']", state="attached", timeout=timeout)


def test_review_flow_in_a_browser(farm, worker, browser, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    f = farm()
    worker(f, "w1")
    alice = f.creator("alice")
    wait_workers(alice, 1)
    job = submit_sample(alice, "1-4")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    sign_in(page, f.url, alice.token)
    page.screenshot(path=shots / "jobs.png", full_page=True)
    page.get_by_role("link", name=f"#{job['id']}").click()
    # the page follows the job live (SSE) and reloads itself when it is rendered
    page.wait_for_selector("#status:text('rendered')", timeout=120_000)
    page.wait_for_selector("#approve")
    assert page.locator(".gallery img").count() == 4
    page.screenshot(path=shots / "job-rendered.png", full_page=True)
    # a preview opens in the lightbox
    page.get_by_role("button", name="enlarge frame_0002.png").click()
    assert page.locator("dialog#lightbox").is_visible()
    page.screenshot(path=shots / "lightbox.png")
    page.get_by_role("button", name="Close").click()
    # reject frame 2: it is rendered again, then the job can be approved
    attempts_before = {t["frames"][0]: t["attempt"] for t in alice.job(job["id"])["task_list"]}
    page.get_by_label("Reason").nth(1).fill("flicker on the left edge")
    page.get_by_role("button", name="Reject frame 2").click()
    page.wait_for_selector("#approve", timeout=120_000)
    attempts_after = {t["frames"][0]: t["attempt"] for t in alice.job(job["id"])["task_list"]}
    assert attempts_after[2] == attempts_before[2] + 1
    assert all(attempts_after[fr] == attempts_before[fr] for fr in (1, 3, 4))
    # approve (a double click approves once) and download the full-resolution zip
    page.get_by_role("button", name="Approve all and pay the workers").click()
    page.wait_for_selector("#download")
    settled_page(page, "paid")  # the payout settles on the embedded chain; the page shows it
    assert page.locator("#status").inner_text() == "paid"
    page.screenshot(path=shots / "job-approved.png", full_page=True)
    with page.expect_download() as dl:
        page.get_by_role("link", name=re.compile("Download all full-resolution")).click()
    data = open(dl.value.path(), "rb").read()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = sorted(z.namelist())
        assert names == [f"frame_{i:04d}.png" for i in range(1, 5)]
        outputs = {o["name"]: o for o in alice.outputs(job["id"])}
        for n in names:
            assert hashlib.sha256(z.read(n)).hexdigest() == outputs[n]["sha256"], "zip holds the full frames"
    page.goto(f"{f.url}/workers")
    assert "w1" in page.content()
    page.screenshot(path=shots / "workers.png", full_page=True)
    # phone width: the job page still works
    phone = browser.new_page(viewport={"width": 390, "height": 800})
    sign_in(phone, f.url, alice.token)
    phone.goto(f"{f.url}/jobs/{job['id']}")
    assert phone.locator("#download").is_visible()
    phone.screenshot(path=shots / "phone.png", full_page=True)
    assert len(list(shots.iterdir())) == 6


def _session(url: str, token: str) -> httpx.Client:
    c = httpx.Client(base_url=url, follow_redirects=False)
    page = c.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = c.post("/login", data={"csrf": csrf, "token": token})
    assert r.status_code == 303 and r.headers["location"] == "/jobs"
    return c


def _csrf(c: httpx.Client, path: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', c.get(path).text).group(1)


def test_security_rules(farm, worker):
    f = farm()
    worker(f, "w1")
    alice, mallory = f.creator("alice"), f.creator("mallory")
    job = submit_sample(alice, "1-2")
    assert wait_job(alice, job["id"])["status"] == "rendered"
    name = alice.outputs(job["id"])[0]["name"]
    a, m = _session(f.url, alice.token), _session(f.url, mallory.token)
    jid = job["id"]

    # not signed in: pages redirect to sign-in, files are not served
    anon = httpx.Client(base_url=f.url)
    assert anon.get(f"/jobs/{jid}", follow_redirects=False).status_code == 303
    assert anon.get(f"/jobs/{jid}/previews/{name}", follow_redirects=False).status_code == 303

    # another creator: nothing of the job, not even its existence
    for path in (f"/jobs/{jid}", f"/jobs/{jid}/previews/{name}", f"/jobs/{jid}/download.zip"):
        assert m.get(path).status_code == 404, path
    csrf_m = _csrf(m, "/jobs")
    assert m.post(f"/jobs/{jid}/approve", data={"csrf": csrf_m}).status_code == 404
    assert alice.job(jid)["status"] == "rendered"

    # before approval: previews yes, full resolution nowhere (page zip, API download)
    assert a.get(f"/jobs/{jid}/previews/{name}").status_code == 200
    assert a.get(f"/jobs/{jid}/download.zip").status_code == 403
    api = httpx.get(f"{f.url}/api/jobs/{jid}/outputs/{name}", headers={"Authorization": f"Bearer {alice.token}"})
    assert api.status_code == 403 and "approve" in api.json()["detail"]
    assert b"\x89PNG" in a.get(f"/jobs/{jid}/previews/{name}").content[:8]

    # forms without the session's CSRF token are refused (a cross-site post carries the cookie, not the token)
    assert a.post(f"/jobs/{jid}/approve", data={}).status_code == 403
    assert a.post(f"/jobs/{jid}/approve", data={"csrf": "forged"}).status_code == 403
    assert a.post(f"/jobs/{jid}/reject", data={"csrf": "x", "frames": "1", "reason": "r"}).status_code == 403
    assert a.post("/login", data={"token": alice.token}).status_code == 403
    # the page's wallet calls (JSON, the API's wallet routes behind the cookie) need the CSRF header too
    sig = {"signature": "0x" + "11" * 65}
    for path, body in (("/wallet/challenge", {"address": "0x" + "22" * 20}), ("/wallet/move", {}),
                       (f"/jobs/{jid}/wallet/approve", sig),
                       (f"/jobs/{jid}/wallet/reject", {**sig, "frames": "1", "reason": "r"})):
        for headers in ({}, {"X-CSRF-Token": "forged"}):
            r = a.post(path, json=body, headers=headers)
            assert r.status_code == 403 and "reload the page" in r.text, (path, headers, r.status_code, r.text[:300])
    assert anon.get("/wallet/state", follow_redirects=False).status_code in (303, 401)
    assert m.get(f"/jobs/{jid}/wallet/approval").status_code in (404, 503)  # not hers (or payments off)
    assert alice.job(jid)["status"] == "rendered"

    # approve twice: approved once, then the files are released
    csrf = _csrf(a, f"/jobs/{jid}")
    assert a.post(f"/jobs/{jid}/approve", data={"csrf": csrf}).status_code == 303
    assert a.post(f"/jobs/{jid}/approve", data={"csrf": csrf}).status_code == 303
    approvals = [e for e in alice.job(jid)["events"] if e["new"] == "approved"]
    assert len(approvals) == 1
    assert a.get(f"/jobs/{jid}/download.zip").status_code == 200
    wait_for(lambda: alice.job(jid)["status"] in ("approved", "paid"), 30)
    api = httpx.get(f"{f.url}/api/jobs/{jid}/outputs/{name}", headers={"Authorization": f"Bearer {alice.token}"})
    assert api.status_code == 200 and api.content[:8] == b"\x89PNG\r\n\x1a\n"
