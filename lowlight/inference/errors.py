"""Errors a user can fix without reading a traceback; `lowlight.cli` prints them as one line.

Each message names the file or directory at fault and what was expected there.
"""

from __future__ import annotations


class InputError(ValueError):
    """An input image that cannot be used: unreadable, not an image, or without a face."""


class RunError(ValueError):
    """A model directory that is not a usable trained run (no config.json, wrong task, no or
    mismatched checkpoint)."""


class GalleryError(ValueError):
    """An on-disk gallery that is missing, corrupt, or enrolled with another model."""
