"""Where the add-on keeps its settings and state: preferences, per-scene job settings, session state.

- :class:`RenderhivePreferences` (Preferences > Add-ons > Renderhive): coordinator URL, API token
  (a PASSWORD property: masked in the UI, but stored in userpref.blend like every preference), default
  output folder. ``RENDERHIVE_URL`` / ``RENDERHIVE_TOKEN`` fill empty fields, as for the CLI.
- :class:`RenderhiveSettings` on ``Scene.renderhive``: how to render this scene on the farm. Saved with
  the .blend, like Flamenco's job settings, so a scene keeps its farm settings.
- :class:`RenderhiveState` on ``WindowManager.renderhive``: recent jobs, progress of the running
  operation. Window-manager properties are never written to the .blend (measured: a value set, saved and
  reopened comes back as the default), so following jobs cannot modify the user's file.

Invariant: nothing here imports the network code; :mod:`operators` converts requests and messages.
"""
from __future__ import annotations

import os

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

FORMATS = {  # enum id -> (API format, color depth)
    "PNG": ("PNG", "8"),
    "PNG16": ("PNG", "16"),
    "EXR": ("EXR", "16"),
    "EXR32": ("EXR", "32"),
}
TIERS = [("ANY", "Any", "Any worker may render this job"),
         ("new", "New", "Workers of any reputation, new ones included"),
         ("trusted", "Trusted", "Only workers whose results have been verified"),
         ("top", "Top", "Only the most reliable workers")]
MAX_LISTED_JOBS = 10


def package() -> str:
    """The add-on's module name: ``renderhive`` (legacy) or ``bl_ext.<repo>.renderhive`` (extension)."""
    return __package__


def prefs(context=None) -> "RenderhivePreferences":
    context = context or bpy.context
    return context.preferences.addons[package()].preferences


class RenderhivePreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    url: StringProperty(name="Coordinator URL", default="http://127.0.0.1:8000",
                        description="HTTP address of the Renderhive coordinator (`farm serve --http`)")
    token: StringProperty(name="API token", subtype="PASSWORD", default="",
                          description="Your creator token (the farm admin creates it with `farm user NAME`)")
    output_folder: StringProperty(name="Output folder", subtype="DIR_PATH", default="//renderhive/",
                                  description="Where fetched frames go, one folder per job "
                                              "(// is the folder of the .blend file)")

    def connection(self) -> tuple[str, str]:
        return (self.url.strip() or os.environ.get("RENDERHIVE_URL", ""),
                self.token.strip() or os.environ.get("RENDERHIVE_TOKEN", ""))

    def draw(self, context):
        col = self.layout.column()
        col.prop(self, "url")
        col.prop(self, "token")
        col.prop(self, "output_folder")


class RenderhiveSettings(bpy.types.PropertyGroup):
    frames: StringProperty(name="Frames", default="",
                           description="Frames to render, like 1-24,30,40-50x2 (empty: the scene's frame range)")
    chunk: IntProperty(name="Chunk size", default=1, min=1, max=10000,
                       description="Consecutive frames per task (one worker renders a chunk)")
    tiles: StringProperty(name="Tiles", default="",
                          description="Split each frame into tiles, like 2x2 or 4x4 (empty: whole frames)")
    file_format: EnumProperty(name="Format", default="PNG", items=[
        ("PNG", "PNG 8-bit", "8-bit PNG with alpha"), ("PNG16", "PNG 16-bit", "16-bit PNG with alpha"),
        ("EXR", "OpenEXR half", "16-bit float OpenEXR"), ("EXR32", "OpenEXR float", "32-bit float OpenEXR")])
    samples: IntProperty(name="Samples", default=0, min=0, max=1 << 20,
                         description="Override the render samples (0: keep the scene's)")
    resolution_percent: IntProperty(name="Resolution %", default=0, min=0, max=1000, subtype="PERCENTAGE",
                                    description="Override the resolution scale (0: keep the scene's)")
    priority: IntProperty(name="Priority", default=0, min=-100, max=100,
                          description="Higher runs first among your jobs")
    min_tier: EnumProperty(name="Minimum worker tier", items=TIERS, default="ANY",
                           description="Lowest worker reputation tier allowed to render the job")
    name: StringProperty(name="Job name", default="", description="Name on the farm (empty: the file name)")
    project_root: StringProperty(name="Project root", default="", subtype="DIR_PATH",
                                 description="The folder whose files the scene may read, all shipped with it "
                                             "(empty: the folder of the .blend); nothing outside it is sent")
    allow_missing: BoolProperty(name="Render with missing files", default=False,
                                description="Submit although files the scene reads are missing (Blender renders "
                                            "missing textures pink); the job page lists them")

    def frames_spec(self, scene) -> str:
        if self.frames.strip():
            return self.frames.strip()
        spec = f"{scene.frame_start}-{scene.frame_end}"
        return spec + (f"x{scene.frame_step}" if scene.frame_step > 1 else "")


class RenderhiveJobItem(bpy.types.PropertyGroup):
    job_id: IntProperty(name="Job")
    job_name: StringProperty(name="Name")
    status: StringProperty(name="Status")
    progress: FloatProperty(name="Progress", min=0.0, max=1.0, subtype="FACTOR")
    frames_done: IntProperty()
    frames_total: IntProperty()
    error: StringProperty()


class RenderhiveState(bpy.types.PropertyGroup):
    jobs: CollectionProperty(type=RenderhiveJobItem)
    busy: BoolProperty(default=False, description="A submission or download is running")
    status_text: StringProperty(default="")
    progress: FloatProperty(default=0.0, min=0.0, max=1.0, subtype="FACTOR")
    last_job_id: IntProperty(default=0, description="The job submitted last in this session")
    last_error: StringProperty(default="")
    last_warning: StringProperty(default="", description="What the last submission could not honour")
    last_fetch_dir: StringProperty(default="", subtype="DIR_PATH")
    jobs_error: StringProperty(default="", description="Why the job list could not be refreshed")
    estimate_text: StringProperty(default="n/a", description="Price estimate of the last Estimate")
    deposit_text: StringProperty(default="n/a", description="Token deposit of the last Estimate")
    estimate_for: StringProperty(default="", description="The frames the estimate was made for")

    def set_jobs(self, jobs) -> None:
        self.jobs.clear()
        for j in list(jobs)[:MAX_LISTED_JOBS]:
            item = self.jobs.add()
            item.job_id, item.job_name, item.status = j["id"], j.get("name", ""), j["status"]
            item.progress = float(j.get("progress", 0.0))
            item.frames_done, item.frames_total = j.get("frames_done", 0), j.get("frames_total", 0)
            item.error = j.get("error") or ""
        self.jobs_error = ""

    def upsert_job(self, job) -> None:
        """Add or update one job, keeping the list newest first as the API returns it."""
        others = [_item_dict(i) for i in self.jobs if i.job_id != job["id"]]
        self.set_jobs(sorted([job, *others], key=lambda j: -j["id"]))


def _item_dict(item: RenderhiveJobItem) -> dict:
    return {"id": item.job_id, "name": item.job_name, "status": item.status, "progress": item.progress,
            "frames_done": item.frames_done, "frames_total": item.frames_total, "error": item.error}


CLASSES = (RenderhivePreferences, RenderhiveSettings, RenderhiveJobItem, RenderhiveState)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.renderhive = PointerProperty(type=RenderhiveSettings)
    bpy.types.WindowManager.renderhive = PointerProperty(type=RenderhiveState)


def unregister() -> None:
    del bpy.types.WindowManager.renderhive
    del bpy.types.Scene.renderhive
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
