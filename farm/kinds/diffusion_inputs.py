"""Uploaded images a diffusion job starts from — the init image and mask of an inpainting job, the control
images of its ControlNets — checked at submit and named for the worker.

The creator uploads each file as a blob (``farm submit-diffusion --image F --mask F`` does it) and the
request names it by sha256, never by path. Invariants:

* a blob is checked from its header before anything decodes it (:func:`common.rasters.check_header`): a
  PNG of at most :data:`farm.constants.MAX_DIFFUSION_SIDE` pixels a side and no longer than its pixels
  need; anything else is a :class:`JobError` saying what to upload instead;
* the mask has the init image's size (the pipeline would otherwise stretch one onto the other);
* each task gets both blobs as inputs and their names in ``input_names`` (``init.png``, ``mask.png``), so
  the worker fetches exactly them and nothing else; their hashes go into every image's metadata; control
  image i is ``control_i.png``.
"""
from __future__ import annotations

from typing import Any

from common import rasters
from farm import constants as C
from farm.kinds.jobs import JobError
from farm.store.blobs import BlobStore

INIT_NAME = "init.png"
MASK_NAME = "mask.png"
SHA_HEX = set("0123456789abcdef")


def image_blob(blobs: BlobStore | None, sha: Any, what: str) -> tuple[int, int]:
    """(width, height) of the uploaded PNG ``sha``; JobError when it is missing or not a fitting PNG."""
    if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= SHA_HEX:
        raise JobError(f"{what} must be the sha256 of an uploaded PNG (64 lowercase hex digits)")
    if blobs is None or not blobs.has(sha):
        raise JobError(f"{what} blob {sha[:12]}… is not uploaded: upload it first (POST /api/blobs/missing, "
                       "then PUT /api/blobs/{sha256}; farm submit-diffusion --image/--mask does it)", 409)
    try:
        head = rasters.check_header(blobs.path(sha), C.MAX_DIFFUSION_SIDE, C.MAX_DIFFUSION_SIDE, name=what)
    except rasters.RasterError as exc:
        raise JobError(f"{exc} (upload a PNG of at most {C.MAX_DIFFUSION_SIDE} pixels a side)") from None
    if head.kind != "png":
        raise JobError(f"{what} is an {head.kind.upper()} file: upload a PNG")
    return head.width, head.height


def inpaint_inputs(blobs: BlobStore | None, req: dict[str, Any]) -> tuple[dict[str, str], tuple[int, int]]:
    """({input name: sha256}, init image size) of an inpainting request (``init_image`` and ``mask``)."""
    if not req.get("init_image"):
        raise JobError("inpainting needs the image to paint into as well as the mask: give --image FILE "
                       "(API: init_image, the sha256 of an uploaded PNG)")
    size = image_blob(blobs, req["init_image"], "the init image")
    mask_size = image_blob(blobs, req["mask"], "the mask")
    if mask_size != size:
        raise JobError(f"the mask is {mask_size[0]}x{mask_size[1]} but the image is {size[0]}x{size[1]}: give a "
                       "mask of the image's size (white: repaint, black: keep)")
    return {INIT_NAME: req["init_image"], MASK_NAME: req["mask"]}, size


def control_inputs(blobs: BlobStore | None, controls: list[dict[str, Any]]) -> dict[str, str]:
    """{input name: sha256} of the control images (each checked like any image input)."""
    out = {}
    for i, c in enumerate(controls):
        if not c.get("image"):
            raise JobError(f"ControlNet {c['name']!r} needs a control image: give --control-image FILE after "
                           "its --control (API: image, the sha256 of an uploaded PNG)")
        image_blob(blobs, c["image"], f"the control image of {c['name']!r}")
        out[control_name(i)] = c["image"]
    return out


def control_name(i: int) -> str:
    return f"control_{i}.png"
