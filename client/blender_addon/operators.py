"""Operators: submit the scene, fetch a job's frames, refresh the job list; and the follow timer.

Threading (Flamenco's pattern): ``invoke()`` does the few things that need ``bpy`` on the main thread
(read settings, save a temporary copy), starts a :class:`remote.Runner` thread for the network work and
returns RUNNING_MODAL; a modal timer drains the runner's typed messages into the window manager state,
the status bar and reports; Esc asks the thread to stop at its next checkpoint. ``execute()`` runs the
very same job function synchronously, for scripts and background mode (``bpy.ops.renderhive.submit()``).

Invariants:
- the worker thread never touches ``bpy``; only :meth:`_Remote.apply` (main thread) writes Blender data;
- submit never modifies the user's open file or session: it ships the file as saved on disk, traced as a
  project by ``client/project.py`` (bundled) on the runner thread, without packing or re-saving anything;
  it has no UNDO flag, so no undo step is pushed that would mark the file modified;
- every failure is reported with ``self.report({"ERROR"}, …)`` and leaves nothing behind: checks that
  need no file come first, and the job function deletes the project's temporary files whatever happens.
- progress goes to the status bar, the panel and Blender's progress API (``window_manager.progress_*``).
"""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import bpy
from bpy.props import BoolProperty, FloatProperty, IntProperty

from . import props, remote

FOLLOW_INTERVAL = 3.0
"""Seconds between two polls of the job list while a listed job is still rendering."""
TIMER_STEP = 0.1


def _redraw(context) -> None:
    for window in getattr(context.window_manager, "windows", []):
        for area in window.screen.areas:
            if area.type in {"PROPERTIES", "IMAGE_EDITOR"}:
                area.tag_redraw()


def _connection(context, timeout: float = 60.0) -> remote.Connection:
    """Coordinator URL and token from the preferences, checked; raises UserError."""
    url, token = props.prefs(context).connection()
    if not url:
        raise remote.UserError("set the coordinator URL in Preferences > Add-ons > Renderhive")
    if not token:
        raise remote.UserError("set your API token in Preferences > Add-ons > Renderhive (the farm admin "
                               "creates one with `farm user NAME`)")
    if (msg := remote.check_online(url, bpy.app.online_access)) is not None:
        raise remote.UserError(msg)
    return remote.Connection(url, token, timeout)


class _Remote:
    """Mixin: run one remote job, on a thread with a modal timer (UI) or inline (scripts)."""

    remote_job = None  # the job function of remote.py (staticmethod), set by each operator
    _runner: remote.Runner | None = None
    _timer = None
    _result: set | None = None

    def invoke(self, context, event):
        return _guard(self, context, lambda: self.start(context, self.remote_job, self.request(context), modal=True))

    def execute(self, context):
        return _guard(self, context, lambda: self.start(context, self.remote_job, self.request(context), modal=False))

    def request(self, context):
        """Main thread: read settings, check them, prepare files; return the job's request (or UserError)."""
        raise NotImplementedError

    def start(self, context, fn, req, modal: bool) -> set:
        state = context.window_manager.renderhive
        state.last_error = state.last_warning = ""
        if not modal or bpy.app.background or context.window is None:
            state.busy = True
            try:
                for msg in remote.run_sync(fn, req):
                    self.apply(context, msg)
            finally:
                state.busy = False
            return self._result or {"CANCELLED"}
        self.begin(context, remote.Runner(fn, req).start())
        context.window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def begin(self, context, runner: remote.Runner) -> None:
        """Attach a started runner and the timer that drains it (modal() does the rest)."""
        state = context.window_manager.renderhive
        state.busy, state.progress, state.status_text = True, 0.0, "starting"
        self._runner, self._result = runner, None
        self._timer = context.window_manager.event_timer_add(TIMER_STEP, window=context.window)
        context.window_manager.progress_begin(0.0, 1.0)

    def modal(self, context, event):
        if event.type == "ESC" and event.value == "PRESS":
            self._runner.cancel()
            context.window_manager.renderhive.status_text = "canceling…"
            return {"RUNNING_MODAL"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        for msg in self._runner.drain():
            self.apply(context, msg)
        if self._result is None:
            return {"RUNNING_MODAL"}
        self._stop(context)
        return self._result

    def cancel(self, context) -> None:
        """Blender ends the modal operator (a file is loaded, Blender quits): stop the thread too."""
        if self._runner is not None:
            self._runner.cancel()
        self._stop(context)

    def _stop(self, context) -> None:
        wm = context.window_manager
        if self._timer is not None:
            wm.event_timer_remove(self._timer)
            wm.progress_end()
            self._timer = None
        if context.workspace is not None:
            context.workspace.status_text_set(None)
        wm.renderhive.busy = False
        _redraw(context)

    def apply(self, context, msg) -> None:
        """Main thread: one message from the job into the UI."""
        state = context.window_manager.renderhive
        if isinstance(msg, remote.Progress):
            state.progress = msg.fraction
            state.status_text = msg.text + (f" {_size(msg.done)} / {_size(msg.total)}"
                                            if msg.total > 1 << 16 else "")
            if self._timer is not None:
                context.window_manager.progress_update(msg.fraction)
            if self._timer is not None and context.workspace is not None:
                context.workspace.status_text_set(f"Renderhive: {state.status_text} (Esc cancels)")
                _redraw(context)
        elif isinstance(msg, remote.Note):
            state.last_warning = "; ".join(filter(None, (state.last_warning, msg.text)))
            self.report({"WARNING"}, f"Renderhive: {msg.text}")
        elif isinstance(msg, remote.Failed):
            state.last_error, state.status_text = msg.message, ""
            self.report({"ERROR"}, f"Renderhive: {msg.message}")
            self._result = {"CANCELLED"}
        elif isinstance(msg, remote.Canceled):
            state.status_text = ""
            self.report({"WARNING"}, f"Renderhive: {msg.message}")
            self._result = {"CANCELLED"}
        elif isinstance(msg, remote.TERMINAL):
            state.status_text, state.progress = "", 1.0
            self.finish(context, msg)
            self._result = {"FINISHED"}

    def finish(self, context, msg) -> None:
        raise NotImplementedError


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"


def _guard(op, context, prepare) -> set:
    """Run ``prepare`` (main thread) and report a UserError as an operator error."""
    if context.window_manager.renderhive.busy:
        op.report({"ERROR"}, "Renderhive: another submission or download is running; wait or press Esc")
        return {"CANCELLED"}
    try:
        return prepare()
    except remote.UserError as exc:
        context.window_manager.renderhive.last_error = str(exc)
        op.report({"ERROR"}, f"Renderhive: {exc}")
        return {"CANCELLED"}


# ------------------------------------------------------------------ submit
def job_fields(scene) -> tuple[dict, dict]:
    """The job request from the scene's settings: fields every coordinator accepts, and optional ones
    (tiles, minimum tier) that are sent only where the coordinator's API has them."""
    s = scene.renderhive
    fmt, depth = props.FORMATS[s.file_format]
    blend_name = bpy.path.basename(bpy.data.filepath) or "untitled.blend"
    job = {"frames": s.frames_spec(scene), "chunk": s.chunk, "format": fmt, "color_depth": depth,
           "samples": s.samples or None, "resolution_percent": s.resolution_percent or None,
           "priority": s.priority, "name": s.name.strip() or Path(blend_name).stem, "scene_name": blend_name}
    optional = {"tiles": s.tiles.strip(), "min_tier": "" if s.min_tier == "ANY" else s.min_tier}
    return job, optional


class RENDERHIVE_OT_submit(_Remote, bpy.types.Operator):
    """Ship this scene and the files it reads as a project, upload what the farm lacks, create a render job"""
    bl_idname = "renderhive.submit"
    bl_label = "Submit to Renderhive"
    bl_options = {"REGISTER"}  # no UNDO: an undo push would mark the user's file modified

    remote_job = staticmethod(remote.submit)

    def request(self, context) -> remote.SubmitRequest:
        conn = _connection(context)
        if not bpy.data.is_saved or not bpy.data.filepath:
            raise remote.UserError("save the .blend file first (File > Save): the farm renders a saved "
                                   "scene, and relative paths to textures need its folder")
        job, optional = job_fields(context.scene)
        s = context.scene.renderhive
        root = bpy.path.abspath(s.project_root) if s.project_root.strip() else ""
        # the farm renders the file as saved; in background mode is_dirty means nothing (always True)
        unsaved = bpy.data.is_dirty and not bpy.app.background
        return remote.SubmitRequest(conn, os.path.abspath(bpy.data.filepath), job, optional,
                                    client_key=uuid.uuid4().hex, project_root=root, allow_missing=s.allow_missing,
                                    blender=bpy.app.binary_path or "", unsaved=unsaved)

    def finish(self, context, msg: remote.Submitted) -> None:
        state = context.window_manager.renderhive
        state.last_job_id = msg.job["id"]
        state.upsert_job(msg.job)
        sent = (f"{msg.blobs_sent} of {msg.files} files uploaded, {_size(msg.uploaded)}" if msg.blobs_sent
                else f"all {msg.files} files already on the farm")
        self.report({"INFO"}, f"Renderhive: job {msg.job['id']} queued, {msg.job['frames_total']} frames "
                              f"({sent})")
        follow()


# ------------------------------------------------------------------ price estimate
class RENDERHIVE_OT_estimate(_Remote, bpy.types.Operator):
    """Ask the farm what this job would cost and which token deposit it needs"""
    bl_idname = "renderhive.estimate"
    bl_label = "Estimate price"
    bl_options = {"REGISTER"}

    remote_job = staticmethod(remote.estimate)

    def request(self, context) -> remote.EstimateRequest:
        conn = _connection(context, timeout=15.0)
        job, _optional = job_fields(context.scene)
        body = {k: v for k, v in job.items() if k not in ("name", "scene_name", "priority")}
        state = context.window_manager.renderhive
        state.estimate_text = state.deposit_text = "n/a"   # until this estimate arrives
        state.estimate_for = ""
        self._frames = job["frames"]
        return remote.EstimateRequest(conn, body)

    def finish(self, context, msg: remote.Estimated) -> None:
        state = context.window_manager.renderhive
        est = msg.estimate
        state.estimate_for = self._frames
        state.estimate_text = f"{est.get('cost_tokens', '?')} tokens"
        state.deposit_text = f"{est.get('deposit_tokens', '?')} tokens"
        self.report({"INFO"}, f"Renderhive: about {state.estimate_text} for frames {state.estimate_for}, "
                              f"deposit {state.deposit_text}")


# ------------------------------------------------------------------ fetch results
_FRAME_NUMBER = re.compile(r"(\d+)\.[A-Za-z0-9]+$")


class RENDERHIVE_OT_fetch_results(_Remote, bpy.types.Operator):
    """Download the job's frames into the output folder and show them in the Image Editor"""
    bl_idname = "renderhive.fetch_results"
    bl_label = "Fetch results"
    bl_options = {"REGISTER", "UNDO"}  # it adds an image to the file, which the user can undo

    job_id: IntProperty(name="Job", default=0, min=0, description="Job to fetch (0: the last submitted)")
    wait: BoolProperty(name="Wait", default=False, description="Wait until the job has rendered")
    timeout: FloatProperty(name="Timeout", default=0.0, min=0.0, description="With Wait: seconds (0: none)")

    remote_job = staticmethod(remote.fetch)

    def request(self, context) -> remote.FetchRequest:
        conn = _connection(context)
        job_id = self.job_id or context.window_manager.renderhive.last_job_id
        if not job_id:
            raise remote.UserError("no job to fetch: submit one first, or pick a job in the list")
        base = bpy.path.abspath(props.prefs(context).output_folder or "//renderhive/")
        if base.startswith("//"):
            raise remote.UserError("the output folder is relative to the .blend file, which is not saved: "
                                   "save the file or set an absolute folder in Preferences > Add-ons > Renderhive")
        return remote.FetchRequest(conn, job_id, str(Path(base) / f"job_{job_id}"), self.wait, self.timeout)

    def finish(self, context, msg: remote.Fetched) -> None:
        state = context.window_manager.renderhive
        state.upsert_job(msg.job)
        state.last_fetch_dir = msg.out_dir
        image = load_results(context, msg)
        shown = f", shown as image {image.name!r}" if image else ""
        self.report({"INFO"}, f"Renderhive: {len(msg.paths)} frames of job {msg.job['id']} in "
                              f"{state.last_fetch_dir}{shown}")


def load_results(context, msg: remote.Fetched):
    """Load the fetched frames as an image sequence (or the movie) and show it in open Image Editors."""
    if msg.movie:
        path, frames = msg.movie, []
    elif msg.paths:
        paths = sorted(msg.paths)
        path = paths[0]
        frames = [int(m.group(1)) for p in paths if (m := _FRAME_NUMBER.search(Path(p).name))]
    else:
        return None
    image = bpy.data.images.load(path, check_existing=True)
    if not msg.movie:
        image.source = "SEQUENCE"
    image.reload()
    image.name = f"Renderhive job {msg.job['id']}"
    image["renderhive_job"] = msg.job["id"]
    for window in context.window_manager.windows:
        for area in window.screen.areas:
            if area.type == "IMAGE_EDITOR":
                space = area.spaces.active
                space.image = image
                if frames:
                    space.image_user.frame_duration = frames[-1] - frames[0] + 1
                    space.image_user.frame_start = frames[0]
                    space.image_user.frame_offset = frames[0] - 1
                area.tag_redraw()
    return image


# ------------------------------------------------------------------ job list and the follow timer
class RENDERHIVE_OT_refresh(bpy.types.Operator):
    """Refresh the list of your recent Renderhive jobs"""
    bl_idname = "renderhive.refresh"
    bl_label = "Refresh"
    bl_options = {"REGISTER"}

    def invoke(self, context, event):
        try:
            _connection(context)
        except remote.UserError as exc:
            self.report({"ERROR"}, f"Renderhive: {exc}")
            return {"CANCELLED"}
        _follower.wanted = True
        follow(now=True)
        return {"FINISHED"}

    def execute(self, context):
        state = context.window_manager.renderhive
        try:
            msgs = remote.run_sync(remote.list_jobs, _connection(context, timeout=15.0))
        except remote.UserError as exc:
            msgs = [remote.Failed(str(exc))]
        for msg in msgs:
            if isinstance(msg, remote.JobsListed):
                state.set_jobs(msg.jobs)
            elif isinstance(msg, remote.Failed):
                state.jobs_error = msg.message
                self.report({"ERROR"}, f"Renderhive: {msg.message}")
                return {"CANCELLED"}
        return {"FINISHED"}


class _Follower:
    """Polls the job list off the main thread while a listed job is still rendering."""

    def __init__(self):
        self.runner: remote.Runner | None = None
        self.wanted = False   # a refresh was asked for
        self.polled_at = 0.0  # monotonic time of the last poll

    def tick(self):
        wm = bpy.context.window_manager
        state = wm.renderhive
        if self.runner is not None:
            for msg in self.runner.drain():
                if isinstance(msg, remote.JobsListed):
                    state.set_jobs(msg.jobs)
                elif isinstance(msg, remote.Failed):
                    state.jobs_error = msg.message
            if not self.runner.thread.is_alive() and self.runner.queue.empty():
                self.runner = None
        active = any(item.status not in remote.FINAL for item in state.jobs)
        now = time.monotonic()
        if self.runner is None and (self.wanted or (active and now - self.polled_at >= FOLLOW_INTERVAL)):
            self.wanted, self.polled_at = False, now
            try:
                self.runner = remote.Runner(remote.list_jobs, _connection(bpy.context, timeout=15.0)).start()
            except remote.UserError as exc:
                state.jobs_error = str(exc)
        _redraw(bpy.context)
        if self.runner is not None:
            return TIMER_STEP * 2   # an answer is on its way
        return FOLLOW_INTERVAL if active else None


_follower = _Follower()


def _follow_tick():
    return _follower.tick()


def follow(now: bool = False) -> None:
    """Make sure the follow timer runs (it stops by itself when no listed job is rendering)."""
    if now and bpy.app.timers.is_registered(_follow_tick):
        bpy.app.timers.unregister(_follow_tick)   # poll at once rather than at the next interval
    if not bpy.app.timers.is_registered(_follow_tick):
        bpy.app.timers.register(_follow_tick, first_interval=TIMER_STEP)


CLASSES = (RENDERHIVE_OT_submit, RENDERHIVE_OT_estimate, RENDERHIVE_OT_fetch_results, RENDERHIVE_OT_refresh)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    if bpy.app.timers.is_registered(_follow_tick):
        bpy.app.timers.unregister(_follow_tick)
    if _follower.runner is not None:
        _follower.runner.cancel()
        _follower.runner = None
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
