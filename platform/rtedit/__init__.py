"""rtedit: realtime instruction-based image editing on FLUX.2 [klein]. No Ray import lives here.

`from rtedit import Editor, EditorConfig, EditResult` works without importing torch until one of them is used.
"""

from rtedit.errors import (
    ConfigError,
    EditCancelled,
    EditError,
    EngineDead,
    InvalidImage,
    InvalidRequest,
    ModelLoadError,
    UnsupportedRequest,
)

_LAZY = {"Editor": "rtedit.editor", "EditResult": "rtedit.editor", "EditorConfig": "rtedit.config"}

__all__ = ["ConfigError", "EditCancelled", "EditError", "EngineDead", "InvalidImage", "InvalidRequest",
           "ModelLoadError", "UnsupportedRequest", *_LAZY]


def __getattr__(name: str):
    # The engine's classes import torch and diffusers: load them on first use, not with the package.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rtedit' has no attribute {name!r}")
