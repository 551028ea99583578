"""Render passes as ControlNet conditions: Blender's view-layer passes of a rendered frame, normalised and
written as 8-bit RGB PNGs next to the frame.

Used by :mod:`worker.runtimes.blender` (with ``bpy``, after each whole-frame render) and by the tests (on a
direct bpy render). The render result is saved once as a multilayer EXR (``save_render``: no second
render) and read with the OpenEXR package. Conventions, for every pass pixels that no geometry covers
(Blender's depth there is 1e10) are black:

* ``depth``: the depth pass mapped to 0..1 per frame, the nearest surface white and the farthest black
  (inverted, as ControlNet depth models expect: MiDaS-style near = bright);
* ``normal``: the normal pass turned into camera space (x right, y up, z towards the camera) and mapped
  from -1..1 to 0..255 per channel, as ControlNet normal models expect;
* ``mask``: white where geometry is (an inpainting mask that repaints the objects, keeps the background).

Enabling the Z and Normal passes does not change the Combined pixels (Cycles), so a frame of a job with
passes equals the same frame without (tested).
"""
from __future__ import annotations

import os
from pathlib import Path

from common.limits import RENDER_PASSES, pass_output

BACKGROUND_DEPTH = 1e9
"""Depth at and beyond which a pixel is background (Cycles writes 1e10 where a ray hits nothing)."""


def enable(view_layer, passes: list[str]) -> None:
    """Turn on the view-layer passes that ``passes`` need (the file's own values are restored by the
    runtime's recorded overrides before the next task)."""
    view_layer.use_pass_z = True  # every pass needs depth: it says where geometry is
    if "normal" in passes:
        view_layer.use_pass_normal = True


def channels(exr: Path) -> dict[str, object]:
    """Every channel of a multilayer EXR by its full name (``ViewLayer.Depth.Z``), as float32 arrays."""
    import numpy as np
    import OpenEXR
    out = {}
    with OpenEXR.File(str(exr)) as f:
        for part in f.parts:
            for name, ch in part.channels.items():
                out[name] = np.asarray(ch.pixels, dtype=np.float32)
    return out


def normalised(chans: dict, passes: list[str], camera_rotation, layer: str) -> dict[str, object]:
    """{pass name: uint8 HxWx3 array} for ``passes`` from the EXR channels of view layer ``layer``.
    ``camera_rotation``: the camera's world rotation as a 3x3 matrix (rows), for the normal pass."""
    import numpy as np
    z = chans[f"{layer}.Depth.Z"]
    hit = z < BACKGROUND_DEPTH
    out = {}
    for name in passes:
        img = np.zeros((*z.shape, 3), np.uint8)
        if name == "depth" and hit.any():
            near, far = float(z[hit].min()), float(z[hit].max())
            v = np.ones_like(z) if far <= near else (far - z) / (far - near)
            img[hit] = np.round(np.clip(v[hit], 0, 1) * 255).astype(np.uint8)[:, None]
        elif name == "normal":
            world = np.stack([chans[f"{layer}.Normal.{c}"] for c in "XYZ"], axis=-1)
            cam = world @ np.asarray(camera_rotation, dtype=np.float32)  # R^T n for each pixel's row vector
            img[hit] = np.round(np.clip(cam[hit] * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)
        elif name == "mask":
            img[hit] = 255
        out[name] = img
    return out


def write(bpy, scene, layer: str, out_dir: str, frame: int, passes: list[str]) -> list[str]:
    """Save the passes of view layer ``layer`` in the render result of ``frame`` as PNGs in ``out_dir``;
    returns their paths."""
    from PIL import Image
    unknown = sorted(set(passes) - set(RENDER_PASSES))
    if unknown:
        raise ValueError(f"unknown render pass {unknown[0]!r}: choose from {', '.join(RENDER_PASSES)}")
    im = scene.render.image_settings
    saved = (im.media_type, im.file_format, im.color_depth, im.color_mode)
    exr = os.path.join(out_dir, f".passes_{frame:04d}.exr")
    try:
        im.media_type = "MULTI_LAYER_IMAGE"  # 5.0: before the file format (BLENDER_NOTES)
        im.file_format = "OPEN_EXR_MULTILAYER"
        im.color_depth = "32"
        bpy.data.images["Render Result"].save_render(exr, scene=scene)
    finally:
        im.media_type, im.file_format = saved[0], saved[1]
        im.color_depth, im.color_mode = saved[2], saved[3]
    try:
        rot = [list(row) for row in scene.camera.matrix_world.to_3x3().normalized()]
        images = normalised(channels(Path(exr)), passes, rot, layer)
    finally:
        os.remove(exr)
    paths = []
    for name in passes:
        path = os.path.join(out_dir, pass_output(name, frame))
        Image.fromarray(images[name], "RGB").save(path)
        paths.append(path)
    return paths
