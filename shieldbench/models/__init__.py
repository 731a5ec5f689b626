"""Models: open_clip CLIPs wrapped so attacks work in pixel space."""

from shieldbench.models.clip import ClipModel, ImageOutput
from shieldbench.models.factory import build_model

__all__ = ["ClipModel", "ImageOutput", "build_model"]
