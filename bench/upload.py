"""Project upload cost: `farm submit`'s project path against a plain HTTP PUT of the same bytes, side by side.

    python bench/upload.py [--quick] [--textures N] [--mib M] [--keep]
    python bench/upload.py --small N [--bytes B]

A project of N textures (default 200) of random bytes behind a PNG signature, M MiB in all (default 1024;
``--quick``: 64), and a .blend built with bpy (in a child process) whose 200 images read ``//tex/t_NNN.png``.
The project is only traced and uploaded, never rendered. Against a real ``farm serve`` on loopback:

a. **first submit**: trace (BAT) + hash + ask which blobs are missing + upload them + create the job, in this
   process through ``client.project`` and ``client.api`` — what ``farm submit`` runs;
b. **resubmit after one change**: one texture gets a byte more, the same steps again;
c. **plain PUT**: every file of the project PUT once over one keep-alive connection (``http.client``) to a
   minimal ``http.server`` in a child process that writes each body to a file (no hash, no database).

Prints bytes sent and seconds of each, and their ratios to (c). Checks that the farm stored every blob of the
manifest with the right hash, that (b) sent exactly the changed texture, and that (c)'s server received
every byte. bpy runs only in a child process.

``--small N`` (2,000 is the case of issue 19) measures instead a project of N small textures (B bytes each,
default 500) against the farm's default upload rate (600 at once, then 600 a minute): the same project
uploaded by two users of one ``farm serve``, (d) one PUT a file, waiting out the 429s as the client does,
and (e) in batches (``POST /api/blobs/batch``, up to 100 files a request). Prints requests, bytes, seconds
and seconds waited of each, and checks every blob on the farm.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client import project as P  # noqa: E402
from client.api import Client  # noqa: E402
from client.localfarm import Coordinator, free_port  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"

BLEND = r"""
import os, sys
out = os.fdopen(os.dup(1), "w"); os.dup2(2, 1)
import bpy
root, n = sys.argv[-2], int(sys.argv[-1])
bpy.ops.wm.read_factory_settings(use_empty=True)
for i in range(n):
    im = bpy.data.images.new(f"t_{i:03d}", 4, 4)
    im.source = "FILE"
    im.filepath = f"//tex/t_{i:03d}.png"
    im.use_fake_user = True
bpy.ops.wm.save_as_mainfile(filepath=os.path.join(root, "scene.blend"))
out.write("ok\n"); out.flush()
"""

SINK = r"""
import http.server, os, sys
root = sys.argv[1]
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_PUT(self):
        left = int(self.headers["Content-Length"])
        with open(os.path.join(root, os.path.basename(self.path)), "wb") as f:
            while left:
                block = self.rfile.read(min(left, 1 << 20))
                f.write(block); left -= len(block)
        self.send_response(201); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Sink).serve_forever()
"""


def make_project(root: Path, textures: int, total: int) -> Path:
    (root / "tex").mkdir(parents=True)
    each = total // textures
    for i in range(textures):
        (root / "tex" / f"t_{i:03d}.png").write_bytes(PNG + os.urandom(each - len(PNG)))
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(root.parent / ".bu")}
    res = subprocess.run([sys.executable, "-c", BLEND, str(root), str(textures)], capture_output=True, text=True,
                         env=env, timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"building the .blend failed:\n{res.stderr[-2000:]}")
    return root / "scene.blend"


def submit(client: Client, scene: Path) -> dict:
    """What `farm submit scene.blend` does, timed: trace, hash, ask, upload, create the job."""
    t0 = time.perf_counter()
    pr = P.build(scene)
    try:
        stats = P.upload(client, pr)
        job = client.submit(scene_sha256=pr.manifest.files[pr.scene], scene_name=scene.name, frames="1",
                            project=pr.manifest.to_json())
        return {"seconds": time.perf_counter() - t0, "bytes": stats["bytes_sent"], "blobs": stats["blobs_sent"],
                "files": len(pr.manifest.files), "manifest": dict(pr.manifest.files), "job": job["id"],
                "trace_seconds": pr.seconds}
    finally:
        pr.close()


def plain_put(files: list[Path], port: int) -> dict:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = 0
    for i, path in enumerate(files):
        size = path.stat().st_size
        with open(path, "rb") as f:
            conn.request("PUT", f"/{i}", body=f, headers={"Content-Length": str(size)})
            resp = conn.getresponse()
            resp.read()
        if resp.status != 201:
            raise SystemExit(f"the plain server answered {resp.status}")
        sent += size
    conn.close()
    return {"seconds": time.perf_counter() - t0, "bytes": sent}


def small_files(tmp: Path, n: int, each: int) -> int:
    """(d) one PUT a file against (e) batches, for a project of ``n`` files of ``each`` bytes."""
    (tmp / "proj" / "tex").mkdir(parents=True)
    for i in range(n):
        (tmp / "proj" / "tex" / f"t_{i:03d}.png").write_bytes(PNG + i.to_bytes(4, "big") + os.urandom(each - 12))
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(tmp / ".bu")}
    res = subprocess.run([sys.executable, "-c", BLEND, str(tmp / "proj"), str(n)], capture_output=True, text=True,
                         env=env, timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"building the .blend failed:\n{res.stderr[-2000:]}")
    scene = tmp / "proj" / "scene.blend"
    farm = Coordinator(tmp / "farm").start()
    try:
        rows = {}
        for label, below in (("one PUT a file", 0), ("batches of <= 100", None)):
            client = Client(farm.url, farm.admin.create_user(f"bench{len(rows)}")["token"], timeout=600)
            t0 = time.perf_counter()
            pr = P.build(scene)
            try:
                stats = P.upload(client, pr, batch_below=below)
            finally:
                pr.close()
            rows[label] = {**stats, "seconds": time.perf_counter() - t0}
            blobs = farm.data / "blobs"
            for rel, sha in pr.manifest.files.items():
                with open(blobs / sha[:2] / sha, "rb") as f:
                    assert hashlib.file_digest(f, "sha256").hexdigest() == sha, rel
            if label.startswith("one PUT"):   # the second user's upload must send everything again:
                for sha in pr.manifest.files.values():   # drop the blobs (the farm dedups across users)
                    (blobs / sha[:2] / sha).unlink()
        print(f"project: {n + 1} files ({n} textures of {each} bytes + scene.blend), the farm's default upload rate; "
              "the machine was loaded by other work")
        print(f"{'':22}{'requests':>10}{'bytes sent':>12}{'seconds':>10}{'waited s':>10}")
        for label, r in rows.items():
            print(f"{label:22}{r['requests']:10}{r['bytes_sent']:12}{r['seconds']:10.2f}{r['waited_s']:10.0f}")
        a, b = rows.values()
        print(f"ratios (PUT a file / batches): requests {a['requests'] / b['requests']:.0f}x, seconds "
              f"{a['seconds'] / b['seconds']:.1f}x")
        print(json.dumps(rows, default=str))
        return 0
    finally:
        farm.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB instead of 1 GiB")
    ap.add_argument("--textures", type=int, default=200)
    ap.add_argument("--mib", type=float, default=None, help="total texture MiB (default 1024, --quick 64)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--small", type=int, default=0, help="instead: a project of this many small files")
    ap.add_argument("--bytes", type=int, default=500, help="bytes of each small file (--small)")
    args = ap.parse_args()
    if args.small:
        tmp = Path(tempfile.mkdtemp(prefix="renderhive-bench-upload-"))
        try:
            return small_files(tmp, args.small, args.bytes)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    total = int((args.mib or (64 if args.quick else 1024)) * (1 << 20))
    tmp = Path(tempfile.mkdtemp(prefix="renderhive-bench-upload-"))
    farm = sink = None
    try:
        scene = make_project(tmp / "proj", args.textures, total)
        files = [scene, *sorted((tmp / "proj" / "tex").iterdir())]
        farm = Coordinator(tmp / "farm").start()
        client = Client(farm.url, farm.admin.create_user("bench")["token"], timeout=600)
        (tmp / "sink").mkdir()
        port = free_port()
        sink = subprocess.Popen([sys.executable, "-c", SINK, str(tmp / "sink"), str(port)])
        time.sleep(0.5)

        first = submit(client, scene)
        changed = files[1]
        changed.write_bytes(changed.read_bytes() + b"\0")
        again = submit(client, scene)
        plain = plain_put(files, port)

        # correctness: every blob on the farm with its hash; the resubmit sent the changed file only
        blobs = farm.data / "blobs"
        for rel, sha in {**first["manifest"], **again["manifest"]}.items():
            with open(blobs / sha[:2] / sha, "rb") as f:
                assert hashlib.file_digest(f, "sha256").hexdigest() == sha, rel
        assert again["bytes"] == changed.stat().st_size and again["blobs"] == 1, again
        assert first["bytes"] == plain["bytes"] - 1 and first["blobs"] == len(files), (first, plain)
        assert sum(p.stat().st_size for p in (tmp / "sink").iterdir()) == plain["bytes"]

        mib = 1 << 20
        print(f"project: {len(files)} files, {plain['bytes'] / mib:.0f} MiB ({args.textures} textures + scene.blend)")
        print(f"{'':28}{'MiB sent':>10}{'seconds':>10}{'MiB/s':>9}{'bytes ratio':>13}{'time ratio':>12}")
        for label, r in (("first submit", first), ("resubmit after one change", again), ("plain PUT (baseline)", plain)):
            print(f"{label:28}{r['bytes'] / mib:10.1f}{r['seconds']:10.2f}{r['bytes'] / mib / r['seconds']:9.0f}"
                  f"{r['bytes'] / plain['bytes']:13.3f}{r['seconds'] / plain['seconds']:12.2f}")
        print(f"(tracing: {first['trace_seconds']:.2f} s first, {again['trace_seconds']:.2f} s again, hashing "
              "included; jobs " + f"{first['job']}, {again['job']})")
        print(json.dumps({"first": {k: first[k] for k in ("bytes", "seconds")},
                          "again": {k: again[k] for k in ("bytes", "seconds")}, "plain": plain}))
        return 0
    finally:
        if sink is not None:
            sink.kill()
            sink.wait()
        if farm is not None:
            farm.stop()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
