"""Comparing a result with its re-render, and the cheap checks every result passes.

Between like devices Cycles is bit-deterministic (BLENDER_NOTES: two CPU runs differ by 0, and a region
rendered with ``use_crop_to_border=False`` equals the same rectangle of the full frame), so the check is
equality of every sample. Across device types (CPU vs CUDA/OptiX/HIP…) float rounding differs, so a
region passes with a mean SSIM of at least CHECK_SSIM_MIN (structural similarity of each colour channel,
7×7 windows, the worst channel counting) and no 7×7 window below CHECK_SSIM_WINDOW_MIN (a small region painted over barely moves the
mean). bench/verify.py prints where each cheating mode lands; the thresholds are not yet calibrated
against a real GPU render (none was available to measure).

Cheap checks (:func:`inspect`) read the file: unreadable or absurd files are rejected outright; a uniform
image is suspicious (an empty scene can render black, so it forces a full check instead of a verdict).
Results are untrusted: the header is checked against the task's size (:func:`size_bound`) before a
pixel is decoded, and :func:`image_size` reads the header only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import limits as L
from common import rasters
from farm import constants as C

DEVICE_CLASS_CPU = "CPU"


@dataclass
class Inspection:
    problem: str = ""           # why the file cannot be a valid output ("" when it can)
    suspicious: str = ""        # why it deserves a full check
    width: int = 0
    height: int = 0


def size_bound(kind: str, spec: dict) -> tuple[int, int]:
    """The largest (width, height) a result of a task of ``kind`` with ``spec`` can be: a render's
    ``resolution`` × its percentage where the job gave one (a tile or region is smaller still), a
    diffusion image's ``width``×``height`` (times its upscaler's scale), else MAX_RESOLUTION (the scene's own size is not known here)."""
    cap = L.MAX_RESOLUTION
    if kind == "diffusion" and spec.get("width") and spec.get("height"):
        k = int((spec.get("upscale") or {}).get("scale") or 1)  # an upscaled image is k times the generated one
        return min(cap, int(spec["width"]) * k), min(cap, int(spec["height"]) * k)
    settings = spec.get("settings") or {}
    res, pct = settings.get("resolution"), settings.get("resolution_percent") or 100
    cap = min(cap, int(settings.get("max_resolution") or cap))
    if kind == "render" and isinstance(res, (list, tuple)) and len(res) == 2:
        return min(cap, int(res[0]) * int(pct) // 100), min(cap, int(res[1]) * int(pct) // 100)
    return cap, cap


def inspect(path: Path, name: str, max_size: tuple[int, int] | None = None) -> Inspection:
    """Read an output file: decodable as the format its name says, at most ``max_size`` (width, height; None:
    MAX_RESOLUTION) by its header before it is decoded, not one flat colour."""
    ext = Path(name).suffix.lower()
    if ext not in (".png", ".exr"):
        return Inspection()  # videos, contact sheets in other formats: no pixel checks here
    try:
        head = path.open("rb").read(8)
        if (ext == ".png") != (head[:8] == rasters.PNG_SIGNATURE) or (ext == ".exr") != (head[:4] == rasters.EXR_MAGIC):
            return Inspection(problem=f"{name} is not a {ext[1:].upper()} file")
        r = rasters.read(path, *(max_size or (L.MAX_RESOLUTION, L.MAX_RESOLUTION)), name=name)
    except (rasters.RasterError, OSError) as exc:
        return Inspection(problem=f"{name} cannot be read: {exc}")
    w, h = r.width, r.height
    flat = all(p.size == 0 or (p == p.reshape(-1, *p.shape[2:])[0]).all() for p in r.planes.values())
    return Inspection(suspicious=f"{name} is a single flat colour" if flat else "", width=w, height=h)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding it (raises RasterError)."""
    header = rasters.probe(path)
    return header.width, header.height


def _stack(r: rasters.Raster) -> np.ndarray:
    """H×W×C array of the raster's samples (EXR channels in name order, e.g. A, B, G, R)."""
    if r.kind == "png":
        a = r.planes[""]
        return a if a.ndim == 3 else a[:, :, None]
    return np.stack([r.planes[k] for k in sorted(r.planes)], axis=-1)


def _rgb(a: np.ndarray, kind: str) -> np.ndarray:
    """H×W×3 floats in 0..1 (HDR tone-mapped) of a PNG's or an EXR's colour channels."""
    f = a.astype(np.float64)
    if kind == "png":
        f /= 65535.0 if a.dtype == np.uint16 else 255.0
        return f[:, :, :3] if f.shape[2] >= 3 else np.repeat(f[:, :, :1], 3, axis=2)
    chans = {k: i for i, k in enumerate(sorted("ABGR"[: f.shape[2]]))}
    rgb = np.clip(np.stack([f[:, :, chans.get(c, 0)] for c in "RGB"], axis=-1), 0.0, None)
    return rgb / (1.0 + rgb)


def _box(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over k×k windows (valid positions only), by summed-area table."""
    c = np.pad(x, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def ssim(a: np.ndarray, b: np.ndarray, k: int = 7) -> float:
    """Mean structural similarity of two one-channel images in 0..1 (Wang et al. 2004, uniform window)."""
    return float(ssim_map(a, b, k).mean())


def ssim_map(a: np.ndarray, b: np.ndarray, k: int = 7) -> np.ndarray:
    """SSIM of every k×k window."""
    k = max(1, min(k, a.shape[0], a.shape[1]))
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ma, mb = _box(a, k), _box(b, k)
    va, vb = _box(a * a, k) - ma * ma, _box(b * b, k) - mb * mb
    cov = _box(a * b, k) - ma * mb
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))


def compare(reference: rasters.Raster, box: tuple[int, int, int, int] | None, candidate: rasters.Raster,
            exact: bool) -> dict:
    """Compare ``candidate`` with the ``box`` (x0, x1, y0, y1; None: all) of ``reference``.
    Returns {"passed", "equal", "ssim", "max_diff", "why"}."""
    if box is not None:
        x0, x1, y0, y1 = box
        if not (0 <= x0 < x1 <= reference.width and 0 <= y0 < y1 <= reference.height):
            return {"passed": False, "equal": False, "why": f"region {box} is outside the "
                    f"{reference.width}x{reference.height} result"}
        reference = reference.crop(x0, x1, y0, y1)
    if (reference.layout() != candidate.layout()
            or (reference.width, reference.height) != (candidate.width, candidate.height)):
        return {"passed": False, "equal": False,
                "why": f"the result is {reference.kind} {reference.width}x{reference.height}, the re-render "
                       f"{candidate.kind} {candidate.width}x{candidate.height} (a different size or format)"}
    a, b = _stack(reference), _stack(candidate)
    equal = bool(np.array_equal(a, b))
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    if equal:
        return {"passed": True, "equal": True, "ssim": 1.0, "max_diff": 0.0, "why": ""}
    ra, rb = _rgb(a, reference.kind), _rgb(b, reference.kind)
    m = np.minimum.reduce([ssim_map(ra[:, :, c], rb[:, :, c]) for c in range(3)])  # a colour change counts
    s, worst = float(m.mean()), float(m.min())
    if exact:
        return {"passed": False, "equal": False, "ssim": round(s, 6), "ssim_min": round(worst, 6),
                "max_diff": max_diff, "why": f"{int((diff.max(axis=-1) > 0).sum())} pixels differ (max "
                f"{max_diff:g}); renders on like devices must match exactly"}
    # the mean catches a frame that is wrong all over, the worst window a small region painted over
    passed = s >= C.CHECK_SSIM_MIN and worst >= C.CHECK_SSIM_WINDOW_MIN
    why = "" if passed else (f"SSIM {s:.4f} is below {C.CHECK_SSIM_MIN}" if s < C.CHECK_SSIM_MIN else
                             f"a 7x7 window has SSIM {worst:.3f}, below {C.CHECK_SSIM_WINDOW_MIN}")
    return {"passed": passed, "equal": False, "ssim": round(s, 6), "ssim_min": round(worst, 6),
            "max_diff": max_diff, "why": why}


def device_class(capabilities: dict) -> str:
    """What a worker renders on, for deciding between exact and SSIM comparison: CPU, or the GPU backend
    and model (two GPUs of one model and driver round alike)."""
    if not capabilities.get("gpu"):
        return DEVICE_CLASS_CPU
    devs = sorted(f"{d.get('type', '?')}:{d.get('name', '')}" for d in capabilities.get("devices", [])
                  if isinstance(d, dict) and d.get("type") != "CPU")
    return "|".join(devs) or DEVICE_CLASS_CPU
