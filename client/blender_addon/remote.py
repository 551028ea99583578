"""The add-on's network side: submit, list and fetch jobs. Never imports or touches ``bpy``.

Everything here runs either on a background thread (the modal operators, the follow timer) or, for
scripts and background mode, synchronously on the caller's thread; the code is the same. A job
function takes a frozen request (plain data captured on the main thread), an ``emit`` callback and a
``cancelled`` predicate, and emits small typed messages: any number of :class:`Progress` and
:class:`Note`, then **exactly one** terminal message (:class:`Submitted`, :class:`Fetched`,
:class:`JobsListed`, :class:`Failed` or :class:`Canceled`). The main thread drains them into the UI.

Submitting ships the scene's *project* as ``farm submit`` does, with the same code (``client/project.py``,
bundled): the saved .blend is traced (BAT, else Blender in a child process), every file it reads is hashed
into a manifest, only the blobs the farm lacks are uploaded (big ones resumably), and the job names the
manifest. Nothing is packed or re-saved: the scene blob is the saved file itself, or BAT's copy of it with
absolute paths made relative.

Invariants:
- the submission's temporary files (a rewritten copy of the scene) are deleted by :func:`submit` whatever
  happens, before its last message goes out;
- no job is created after a failure or a cancel seen before the create request; a cancel that arrives
  while the create request is in flight cancels the job it created, so Esc never leaves a job behind;
- a retried create request carries the same ``client_key``, so the farm never queues the job twice.

The HTTP client (``client/api.py``) and the project tracer (``client/project.py``, with ``common/manifest.py``
and ``common/hashing.py``) are the repository's own: ``make addon`` bundles them as ``renderhive_*.py``
(:data:`SHARED`); straight from the source tree they are loaded from the repository by path.
"""
from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import queue
import sys
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SHARED = (("renderhive_hashing", "common/hashing.py"), ("renderhive_manifest", "common/manifest.py"),
          ("renderhive_project", "client/project.py"), ("renderhive_api", "client/api.py"))
"""The client code bundled into the add-on (client/build_addon.py), in import order: name, source."""


def _load(name: str, source: str):
    """The bundled copy ``name``, or its source in the repository when running from the source tree."""
    here = Path(__file__).resolve().parent
    if (here / f"{name}.py").is_file() and __package__:
        return importlib.import_module(f"{__package__}.{name}")
    for src in (here / f"{name}.py", here.parents[1] / source):
        if src.is_file():
            full = f"{__package__}.{name}" if __package__ else name
            spec = importlib.util.spec_from_file_location(full, src)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[full] = mod
            spec.loader.exec_module(mod)
            return mod
    raise ImportError(f"renderhive: {name}.py is missing from the add-on; build it with `make addon`")


_shared = {name: _load(name, source) for name, source in SHARED}
api, project = _shared["renderhive_api"], _shared["renderhive_project"]

FINAL = frozenset({"rendered", "approved", "paid", "canceled", "failed", "rejected"})
"""Job statuses after which nothing renders any more (the follow timer stops polling them)."""
READY = frozenset({"rendered", "approved", "paid"})
"""Job statuses whose frames can be fetched."""
MOVIE_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm")
TIER_FIELDS = ("min_tier", "min_worker_tier")
"""Names under which a coordinator's JobCreate may accept a minimum worker tier (sent only if present)."""
OPTIONAL_LABELS = {"tiles": "tiles", "min_tier": "a minimum worker tier"}
CREATE_ATTEMPTS = 3
"""Create requests tried on a connection error; the same client_key makes a retry safe."""
MISSING_ADVICE = "or tick Render with Missing Files (Output > Renderhive) to render without them"


class Cancelled(Exception):
    """Raised inside a job function when the user pressed Esc."""


class UserError(Exception):
    """An expected failure; its message is shown as it is and says what to do next."""


# ------------------------------------------------------------------ messages (thread -> main thread)
@dataclass(frozen=True)
class Progress:
    text: str
    done: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


@dataclass(frozen=True)
class Note:
    """Something the user should know that does not stop the work (reported as a warning)."""
    text: str


@dataclass(frozen=True)
class Submitted:
    job: dict
    uploaded: int
    scene_sha256: str
    files: int = 1
    blobs_sent: int = 0


@dataclass(frozen=True)
class Fetched:
    job: dict
    out_dir: str
    paths: tuple[str, ...]
    movie: str = ""


@dataclass(frozen=True)
class Estimated:
    estimate: dict                # the coordinator's answer: cost_tokens, deposit_tokens, basis, ...


@dataclass(frozen=True)
class JobsListed:
    jobs: tuple[dict, ...]


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class Canceled:
    message: str


TERMINAL = (Submitted, Fetched, Estimated, JobsListed, Failed, Canceled)


# ------------------------------------------------------------------ requests (main thread -> thread)
@dataclass(frozen=True)
class Connection:
    url: str
    token: str
    timeout: float = 60.0

    def client(self):
        return api.Client(self.url, self.token or None, timeout=self.timeout)


@dataclass(frozen=True)
class SubmitRequest:
    conn: Connection
    blend: str                    # the saved .blend (absolute): traced, never modified
    job: dict                     # JobCreate fields the farm always accepts (scene_sha256 added here)
    optional: dict = field(default_factory=dict)  # fields sent only if the coordinator accepts them
    client_key: str = ""
    project_root: str = ""        # the folder whose files the scene may read ("": the scene's folder)
    allow_missing: bool = False   # render although files are missing (listed on the job page)
    blender: str = ""             # Blender's binary, to trace files BAT cannot read ("": bpy module)
    unsaved: bool = False         # the session has changes the saved file lacks


@dataclass(frozen=True)
class EstimateRequest:
    conn: Connection
    job: dict                     # the JobCreate fields of the job that would be submitted


@dataclass(frozen=True)
class FetchRequest:
    conn: Connection
    job_id: int
    out_dir: str
    wait: bool = False
    timeout: float = 0.0          # with wait: give up after this many seconds (0: never)
    poll: float = 1.0


# ------------------------------------------------------------------ helpers
def check_online(url: str, online_access: bool) -> str | None:
    """An error message when ``url`` needs Internet access that Blender's preferences do not allow.

    Blender asks extensions to honour *Allow Online Access*; a farm on this machine or on the local
    network is not "online", so loopback and private addresses are always allowed."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if not host or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        return (f"the coordinator URL {url!r} is not an http(s) URL: set it in Preferences > Add-ons > "
                "Renderhive (for example http://127.0.0.1:8000)")
    if online_access or host == "localhost":
        return None
    try:
        addr = ipaddress.ip_address(host)
        if addr.is_loopback or addr.is_private or addr.is_link_local:
            return None
    except ValueError:
        pass
    return (f"Blender's online access is off, so the add-on will not contact {host}: enable "
            "Preferences > System > Network > Allow Online Access, or use a farm on your local network")


def explain(exc: Exception, conn: Connection) -> str:
    """A message for the user that says what to do next."""
    if isinstance(exc, api.ApiError):
        if exc.status == 0:
            return (f"cannot reach the Renderhive coordinator at {conn.url}: check the URL in Preferences > "
                    "Add-ons > Renderhive and that the farm is running (`farm serve`)")
        if exc.status == 401:
            return ("the coordinator rejected the API token: paste a valid token in Preferences > Add-ons > "
                    "Renderhive (the farm admin creates one with `farm user NAME`)")
        return str(exc)
    if isinstance(exc, UserError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


CANCELED_TEXT = {"submit": "submission canceled: no job was created",
                 "fetch": "download canceled: the frames already downloaded stay in the folder"}


def run_guarded(fn: Callable, req, emit: Callable, cancelled: Callable[[], bool]) -> None:
    """Run a job function so that it always ends with exactly one terminal message."""
    conn = getattr(req, "conn", req)
    try:
        fn(req, emit, cancelled)
    except Cancelled:
        emit(Canceled(CANCELED_TEXT.get(fn.__name__, "canceled")))
    except api.ApiError as exc:
        emit(Failed(explain(exc, conn)))
    except Exception as exc:  # a bug or an OS error: say what it was, keep Blender alive
        if not isinstance(exc, UserError):
            traceback.print_exc()
        emit(Failed(explain(exc, conn)))


def _check(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise Cancelled()


def accepted_fields(client) -> set[str] | None:
    """JobCreate fields the coordinator accepts, from its OpenAPI document (None if it has none)."""
    try:
        doc = client.request("GET", "/openapi.json")
        return set(doc["components"]["schemas"]["JobCreate"]["properties"])
    except (api.ApiError, KeyError, TypeError, ValueError):
        return None


# ------------------------------------------------------------------ submit
def submit(req: SubmitRequest, emit: Callable, cancelled: Callable[[], bool]) -> None:
    """Check the farm, trace and hash the project, upload what is missing, create the job. Deletes the
    project's temporary files before the last message goes out: when the caller hears that the submission
    ended, they are gone."""
    last: list = []

    def hold_the_end(msg) -> None:
        if isinstance(msg, (Submitted, Canceled)):
            last.append(msg)
        else:
            emit(msg)
    holder: list = []
    try:
        _submit(req, hold_the_end, cancelled, holder)
    finally:
        for pr in holder:
            pr.close()
    for msg in last:
        emit(msg)


def _counter(emit: Callable, cancelled: Callable[[], bool], text: str, total: int = 0) -> Callable[..., None]:
    """A progress callback that emits Progress (done of total) and stops the work on Esc."""
    done = [0]

    def tick(*args) -> None:
        _check(cancelled)   # raising here aborts hashing or the upload mid-body
        done[0] += args[-1]
        name = args[0] if len(args) > 1 else ""
        emit(Progress(f"{text} {name}".strip(), done[0], total))
    return tick


def _submit(req: SubmitRequest, emit: Callable, cancelled: Callable[[], bool], holder: list) -> None:
    client = req.conn.client()
    emit(Progress("contacting the farm"))
    client.request("GET", "/api/me")          # unreachable or a wrong token: fail before any work
    _check(cancelled)
    if req.unsaved:
        emit(Note("the farm renders the file as saved on disk: save (File > Save) to include your latest changes"))
    emit(Progress("tracing the files the scene reads"))
    try:
        pr = project.build(Path(req.blend), Path(req.project_root) if req.project_root else None,
                           _counter(emit, cancelled, "hashing the scene and its files"), req.blender or None)
    except project.ProjectError as exc:
        raise UserError(str(exc).replace("submit with --project-root set to",
                                         "set Project Root (Output > Renderhive) to")) from None
    holder.append(pr)
    if pr.missing and not req.allow_missing:
        raise UserError(str(project.missing_error(pr, MISSING_ADVICE)))
    if pr.missing:
        emit(Note(f"rendering without {len(pr.missing)} missing file(s): "
                  + ", ".join(repr(d.written) for d in pr.missing[:10])))
    _check(cancelled)
    emit(Progress("asking the farm which files it lacks"))
    todo = project.lacking(client, pr)
    total = sum(p.stat().st_size for p in todo.values())
    client.on_wait = lambda message: emit(Progress(message))   # a 429/503 from the farm, waited out

    def sleep(seconds: float) -> None:   # the wait is in slices, so that Esc ends it at once
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            _check(cancelled)
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
    client.sleep = sleep
    stats = project.upload(client, pr, _counter(emit, cancelled, "uploading", total), todo=todo)
    _check(cancelled)
    sha = pr.manifest.files[pr.scene]
    body = {**req.job, "scene_sha256": sha, "client_key": req.client_key, "project": pr.manifest.to_json()}
    if pr.missing:
        body["missing"] = pr.missing_report()
    wanted = {k: v for k, v in req.optional.items() if v not in (None, "")}
    if wanted:
        fields = accepted_fields(client) or set()
        for key, value in wanted.items():
            names = TIER_FIELDS if key == "min_tier" else (key,)
            name = next((n for n in names if n in fields), None)
            if name:
                body[name] = value
            else:
                emit(Note(f"this coordinator does not support {OPTIONAL_LABELS.get(key, key)} yet: "
                          f"{value!r} was not sent"))
    emit(Progress("creating the job"))
    job = _create(client, body)
    if cancelled():   # Esc while the job was being created: take it back
        client.cancel(job["id"])
        emit(Canceled(f"canceled: job {job['id']} was created and canceled at once"))
        return
    emit(Submitted(job, stats["bytes_sent"], sha, stats["files"], stats["blobs_sent"]))


def _create(client, body: dict) -> dict:
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return client.submit(**body)
        except api.ApiError as exc:
            if exc.status != 0 or attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ estimate, list and fetch
def estimate(req: EstimateRequest, emit: Callable, cancelled: Callable[[], bool]) -> None:
    """What the job would cost and the deposit it needs (``POST /api/estimate``, where the farm has it)."""
    emit(Progress("asking the farm for a price estimate"))
    try:
        est = req.conn.client().request("POST", "/api/estimate", req.job)
    except api.ApiError as exc:
        if exc.status in (404, 405):
            raise UserError("this coordinator offers no price estimate yet (n/a)") from None
        raise
    emit(Estimated(est))


def list_jobs(conn: Connection, emit: Callable, cancelled: Callable[[], bool]) -> None:
    emit(JobsListed(tuple(conn.client().jobs())))


def fetch(req: FetchRequest, emit: Callable, cancelled: Callable[[], bool]) -> None:
    """Wait for the job if asked, then download its results into req.out_dir (only what is missing)."""
    client = req.conn.client()
    job = client.job(req.job_id)
    started = time.monotonic()
    while req.wait and job["status"] not in FINAL:
        emit(Progress(f"job {job['id']} {job['status']}: {job['frames_done']}/{job['frames_total']} frames",
                      job["frames_done"], job["frames_total"]))
        if req.timeout and time.monotonic() - started > req.timeout:
            raise UserError(f"job {job['id']} is still {job['status']} after {req.timeout:.0f} s: "
                               "fetch its results later")
        deadline = time.monotonic() + req.poll
        while time.monotonic() < deadline:
            _check(cancelled)
            time.sleep(0.05)
        job = client.job(req.job_id)
    if job["status"] == "rendered":
        raise UserError(f"job {job['id']} is rendered: review the previews and approve it at "
                        f"{client.url}/jobs/{job['id']} (full-resolution frames are released on approval), "
                        "then fetch again")
    if job["status"] not in READY:
        if job["status"] in FINAL:
            raise UserError(f"job {job['id']} {job['status']}" + (f": {job['error']}" if job.get("error") else "")
                               + " (no frames to fetch; fix the scene and submit again)")
        raise UserError(f"job {job['id']} is still {job['status']} ({job['frames_done']}/{job['frames_total']} "
                           "frames): fetch its results when it has rendered")
    outputs = client.outputs(job["id"])
    done = [0]

    def progress(_name: str) -> None:
        done[0] += 1
        emit(Progress("downloading frames", done[0], len(outputs)))
        _check(cancelled)
    paths = client.download_results(job["id"], Path(req.out_dir), progress)
    movie = next((str(p) for p in paths if p.suffix.lower() in MOVIE_SUFFIXES), "")
    frames = tuple(str(p) for p in paths if p.suffix.lower() not in MOVIE_SUFFIXES)
    emit(Fetched(job, req.out_dir, frames, movie))


# ------------------------------------------------------------------ running off the main thread
class Runner:
    """One job function on a daemon thread; the main thread drains its messages (never blocks on it)."""

    def __init__(self, fn: Callable, req):
        self.queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self.thread = threading.Thread(target=run_guarded, args=(fn, req, self.queue.put, self._cancel.is_set),
                                       name=f"renderhive-{fn.__name__}", daemon=True)

    def start(self) -> "Runner":
        self.thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def drain(self) -> list:
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out


def run_sync(fn: Callable, req) -> list:
    """The same job on the calling thread (scripts, background mode): all its messages, in order."""
    out: list = []
    run_guarded(fn, req, out.append, lambda: False)
    return out
