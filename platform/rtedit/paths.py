"""Where third-party data lives: the shared folder beside a checkout, or wherever RTEDIT_SHARED_DIR points."""

import os
from pathlib import Path

SHARED_ENV = "RTEDIT_SHARED_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]  # platform/rtedit/paths.py -> the checkout


def shared_dir() -> Path:
    """The shared data folder (TAEF2 weights...): $RTEDIT_SHARED_DIR, else ../shared beside the repository."""
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return (REPO_ROOT.parent / "shared").resolve()


def taef2_dir() -> Path:
    """Folder holding taef2_encoder.pth and taef2_decoder.pth ($RTEDIT_TAEF2_DIR overrides)."""
    env = os.environ.get("RTEDIT_TAEF2_DIR")
    return Path(env).expanduser().resolve() if env else shared_dir() / "weights" / "taef2"
