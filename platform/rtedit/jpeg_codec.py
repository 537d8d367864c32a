"""JPEG frames decoded and encoded on the GPU: nvJPEG through torchvision.io.

On an H200 the host codec (PIL) takes 2.64 ms to decode a 512x512 JPEG and 1.56 ms to encode one, nvJPEG 0.23 and
0.26 ms (bench/RESULTS.md, bench/jpeg_codecs.py). Like the attention kernel, the codec proves itself at start-up:
a probe decodes and encodes a test image on the device and compares the pixels with PIL's. `image_codec: auto`
keeps the host codec, said in stats and the log, when there is no CUDA device, no torchvision with nvJPEG, or the
probe fails; `nvjpeg` refuses to start instead. The host codec stays the only one for PNG and WebP, and for JPEG
frames that need resizing (the editor's resizing is PIL's, and must stay identical).
"""

from __future__ import annotations

import io
import logging

import numpy as np
import PIL.Image
import torch

from rtedit.errors import ConfigError
from rtedit.images import JPEG_QUALITY

log = logging.getLogger(__name__)

JPEG_SOI, JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"
# nvJPEG and libjpeg-turbo upsample chroma differently: 0.4-0.7 levels apart on average on photos, up to ~36 at
# edges (bench/RESULTS.md); a wrong decode (channel order, stride, colour space) is tens of levels off everywhere.
PROBE_MAX_MEAN_ABS_LEVELS = 2.0
PROBE_MIN_ENCODE_PSNR_DB = 30.0


def is_jpeg(data: object) -> bool:
    return isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[:3]) == JPEG_SOI


class DeviceJpeg:
    """nvJPEG on `device`: JPEG bytes <-> HxWx3 uint8 tensors on the device."""

    def __init__(self, device: torch.device) -> None:
        import torchvision.io as tvio  # the GPU image's torchvision is built with nvJPEG; CPU CI needs none

        self._io, self.device = tvio, device

    def decode(self, data: bytes) -> torch.Tensor:
        """RGB HxWx3 uint8 on the device; RuntimeError when nvJPEG cannot (the caller then lets PIL decide)."""
        if not bytes(data[-2:]) == JPEG_EOI:  # truncated: nvJPEG would return grey rows, PIL refuses it
            raise RuntimeError("the JPEG has no end-of-image marker")
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return self._io.decode_jpeg(raw, mode=self._io.ImageReadMode.RGB, device=self.device).permute(1, 2, 0)

    def encode(self, hwc: torch.Tensor, quality: int = JPEG_QUALITY) -> bytes:
        """HxWx3 uint8 on the device -> JPEG bytes (read back before the caller's buffers are reused)."""
        return self._io.encode_jpeg(hwc.permute(2, 0, 1).contiguous(), quality=quality).cpu().numpy().tobytes()


def probe_image(size: int = 256) -> np.ndarray:
    """Smooth colour gradients with a few edges: what a decoder with the wrong channel order or stride gets wrong."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    image = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * (x + y))], axis=2) * 255
    image[size // 4: size // 2, size // 4: size // 2] = (250, 30, 30)
    return image.astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def probe(codec: DeviceJpeg) -> dict:
    """Decode a PIL-encoded JPEG on the device against PIL's decode, and PIL's decode of the device's encode
    against the image; raises RuntimeError when either is off."""
    image = probe_image()
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    data = buf.getvalue()
    host = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))
    device = codec.decode(data).cpu().numpy()
    mean_abs = float(np.abs(host.astype(np.int16) - device.astype(np.int16)).mean())
    encoded = codec.encode(torch.from_numpy(image).to(codec.device))
    psnr = _psnr(np.asarray(PIL.Image.open(io.BytesIO(encoded)).convert("RGB")), image)
    result = {"decode_mean_abs_levels": round(mean_abs, 3), "encode_psnr_db": round(psnr, 2)}
    if device.shape != host.shape or mean_abs > PROBE_MAX_MEAN_ABS_LEVELS or psnr < PROBE_MIN_ENCODE_PSNR_DB:
        raise RuntimeError(f"nvJPEG disagrees with PIL on the probe image: {result} (limits: decode within "
                           f"{PROBE_MAX_MEAN_ABS_LEVELS} levels on average, encode >= {PROBE_MIN_ENCODE_PSNR_DB} dB)")
    return result


def select_codec(choice: str, device: torch.device) -> tuple[DeviceJpeg | None, dict]:
    """The device codec to use (None: the host's) and what stats() says about the choice."""
    if choice == "host":
        return None, {"codec": "host", "reason": "image_codec: host"}
    try:
        if device.type != "cuda":
            raise RuntimeError(f"nvJPEG needs a CUDA device; this editor runs on {device}")
        try:
            codec = DeviceJpeg(device)
        except ImportError as exc:
            raise RuntimeError(f"torchvision (with nvJPEG) is not importable: {exc}") from None
        checked = probe(codec)
    except RuntimeError as exc:
        if choice == "nvjpeg":
            raise ConfigError(f"image_codec: nvjpeg cannot run here: {exc}; use 'auto' or 'host'") from None
        log.warning("image_codec auto: JPEG stays on the host codec (%s)", exc)
        return None, {"codec": "host", "reason": str(exc)}
    log.info("image_codec %s: JPEG frames decoded and encoded on %s by nvJPEG (%s)", choice, device, checked)
    return codec, {"codec": "nvjpeg", "probe": checked}
