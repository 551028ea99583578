"""The Renderhive panel in Properties > Output: job settings, Submit, and the list of recent jobs.

Drawing only: reads the scene settings, the preferences and the window-manager state; every action is
an operator. The price estimate and the token deposit show "n/a" until the coordinator has answered
``POST /api/estimate`` (payments, issue 6; older coordinators have no such endpoint) for the frames now
set; the approval page link is ``{url}/jobs/{id}`` (issue 7).
"""
from __future__ import annotations

import bpy

from . import props, remote

STATUS_ICONS = {"queued": "SORTTIME", "active": "RENDER_ANIMATION", "paused": "PAUSE", "rendered": "CHECKMARK",
                "approved": "CHECKMARK", "paid": "FUND", "failed": "ERROR", "canceled": "CANCEL",
                "rejected": "CANCEL"}


def job_page(url: str, job_id: int) -> str:
    """The job's page on the coordinator (where the creator reviews and approves it)."""
    return f"{url.rstrip('/')}/jobs/{int(job_id)}"


class RENDERHIVE_PT_submit(bpy.types.Panel):
    bl_label = "Renderhive"
    bl_idname = "RENDERHIVE_PT_submit"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "output"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        scene = context.scene
        s = scene.renderhive
        state = context.window_manager.renderhive
        url, token = props.prefs(context).connection()
        if not token:
            box = layout.box()
            box.label(text="Set the coordinator URL and your API token", icon="INFO")
            box.operator("preferences.addon_show", text="Open Preferences").module = props.package()

        col = layout.column()
        col.prop(s, "frames", placeholder=s.frames_spec(scene) + " (scene range)")
        col.prop(s, "chunk")
        col.prop(s, "tiles", placeholder="whole frames")
        col.prop(s, "file_format")
        col.prop(s, "samples", text="Samples (0: scene)")
        col.prop(s, "resolution_percent", text="Resolution % (0: scene)")
        col.prop(s, "priority")
        col.prop(s, "min_tier")
        col.prop(s, "name", placeholder=bpy.path.display_name_from_filepath(bpy.data.filepath) or "untitled")
        col.prop(s, "project_root", placeholder="the .blend's folder")
        col.prop(s, "allow_missing")

        # "n/a" until the coordinator has answered an estimate for these very frames
        current = state.estimate_for == s.frames_spec(scene)
        est = layout.column(align=True)
        row = est.row(align=True)
        row.label(text=f"Price estimate: {state.estimate_text if current else 'n/a'}", icon="FUND")
        row.operator("renderhive.estimate", text="", icon="FILE_REFRESH")
        est.label(text=f"Token deposit: {state.deposit_text if current else 'n/a'}")

        if state.busy:
            layout.progress(factor=state.progress, type="BAR", text=state.status_text or "working…")
            layout.label(text="Esc cancels", icon="EVENT_ESC")
        else:
            row = layout.row()
            row.scale_y = 1.4
            row.enabled = bool(url and token)
            row.operator("renderhive.submit", icon="RENDER_ANIMATION")
        if state.last_error:
            layout.label(text=state.last_error, icon="ERROR")
        if state.last_warning:
            layout.label(text=state.last_warning, icon="INFO")


class RENDERHIVE_PT_jobs(bpy.types.Panel):
    bl_label = "Jobs"
    bl_idname = "RENDERHIVE_PT_jobs"
    bl_parent_id = "RENDERHIVE_PT_submit"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "output"

    def draw(self, context):
        layout = self.layout
        state = context.window_manager.renderhive
        url, _token = props.prefs(context).connection()
        layout.operator("renderhive.refresh", icon="FILE_REFRESH")
        if state.jobs_error:
            layout.label(text=state.jobs_error, icon="ERROR")
        if not state.jobs:
            layout.label(text="No jobs yet (Refresh lists your recent jobs)")
        for item in state.jobs:
            box = layout.box()
            row = box.row(align=True)
            row.label(text=f"#{item.job_id} {item.job_name}", icon=STATUS_ICONS.get(item.status, "QUESTION"))
            row.operator("wm.url_open", text="", icon="URL").url = job_page(url, item.job_id)
            ready = item.status in remote.READY
            sub = row.row(align=True)
            sub.enabled = ready and not state.busy
            sub.operator("renderhive.fetch_results", text="", icon="IMPORT").job_id = item.job_id
            box.progress(factor=item.progress, type="BAR",
                         text=f"{item.status} · {item.frames_done}/{item.frames_total} frames")
            if item.error:
                box.label(text=item.error, icon="ERROR")
        if state.last_fetch_dir:
            layout.label(text=f"Last results: {state.last_fetch_dir}", icon="FILE_FOLDER")


CLASSES = (RENDERHIVE_PT_submit, RENDERHIVE_PT_jobs)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
