"""Task executors: ``executors`` (task kind → what runs it, and in which runtime), ``assemble`` (tiles into a
frame, frames into a video) and ``diffusion`` (images and contact sheets).

May import: ``common`` and ``worker``.
"""
