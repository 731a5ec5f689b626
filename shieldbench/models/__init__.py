"""Models: open_clip CLIPs wrapped so attacks work in pixel space.

``build_model`` is imported on first use: the factory imports open_clip (and
through it transformers), which validating a plugin's options should not pay for.
"""

from typing import Any

from shieldbench.models.clip import ClipModel, ImageOutput


def __getattr__(name: str) -> Any:
    if name == "build_model":
        from shieldbench.models.factory import build_model

        return build_model
    raise AttributeError(f"module 'shieldbench.models' has no attribute {name!r}")


__all__ = ["ClipModel", "ImageOutput", "build_model"]
