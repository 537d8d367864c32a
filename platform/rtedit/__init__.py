"""rtedit: realtime instruction-based image editing on FLUX.2 [klein]. No Ray import lives here."""

from rtedit.errors import ConfigError, EditError, InvalidImage, InvalidRequest, ModelLoadError, UnsupportedRequest

__all__ = ["ConfigError", "EditError", "InvalidImage", "InvalidRequest", "ModelLoadError", "UnsupportedRequest"]
