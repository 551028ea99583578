"""Renderhive for Blender: submit the scene to a Renderhive farm, follow the job, bring the frames back.

An extension (``blender_manifest.toml``; ``make addon`` builds the installable zip) that also loads as a
legacy add-on (``bl_info``; the folder copied or linked into ``scripts/addons/renderhive``).

Modules: :mod:`props` (preferences, scene settings, session state), :mod:`operators` (submit, fetch
results, refresh, the follow timer), :mod:`panel` (Properties > Output), :mod:`remote` (HTTP work and project
tracing, never touches bpy). ``renderhive_*.py`` are the client code shared with the CLI, bundled by
``make addon`` (``client/build_addon.py``).

Invariant: ``register()``/``unregister()`` are exact inverses; nothing else is registered (no app
handlers; the follow timer is removed on unregister), so enabling and disabling repeatedly leaks nothing.
"""

bl_info = {
    "name": "Renderhive",
    "author": "Renderhive developers",
    "version": (0, 1, 0),
    "blender": (4, 2, 0),
    "location": "Properties > Output > Renderhive",
    "description": "Render on a Renderhive farm and bring the frames back",
    "category": "Render",
}

from . import operators, panel, props  # noqa: E402  (bl_info first, as Blender expects)

_MODULES = (props, operators, panel)


def register() -> None:
    for mod in _MODULES:
        mod.register()


def unregister() -> None:
    for mod in reversed(_MODULES):
        mod.unregister()
