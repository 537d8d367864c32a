"""Images in and out: bytes/PIL/arrays -> checked uint8 arrays -> device tensors, and back to bytes."""

from __future__ import annotations

import io
import math
import warnings
from typing import Union

import numpy as np
import PIL.Image
import torch

from rtedit.config import ImageLimits
from rtedit.errors import InvalidImage, InvalidRequest
from rtedit.transport import OUTPUT_FORMATS, public_message

ImageInput = Union[PIL.Image.Image, np.ndarray, bytes, bytearray, memoryview]

DECODABLE_FORMATS = ("JPEG", "PNG", "WEBP")
# PIL's name of each output format (rtedit.transport.OUTPUT_FORMATS); "jpg" is accepted for "jpeg".
_PIL_FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# Flux2KleinPipeline shrinks larger inputs to about one megapixel before encoding them.
PIPELINE_MAX_AREA = 1024 * 1024
JPEG_QUALITY = 90  # of every JPEG the editor writes, on the host or by nvJPEG (rtedit.jpeg_codec)


def decode_image(data: bytes | bytearray | memoryview, limits: ImageLimits) -> np.ndarray:
    """Decodes JPEG/PNG/WebP bytes to an RGB uint8 array; refuses bombs from the header, before decoding."""
    img = open_checked(data, limits)
    try:
        img.load()
    except Exception as exc:
        raise InvalidImage(f"image data is truncated or corrupt ({type(exc).__name__}: {public_message(str(exc))})"
                           ) from None
    return np.asarray(img.convert("RGB"))


def open_checked(data: bytes | bytearray | memoryview, limits: ImageLimits) -> PIL.Image.Image:
    """The image's header read and checked (size in bytes, format, pixels, bombs), its pixels not yet decoded."""
    data = bytes(data)
    if not data:
        raise InvalidImage("image bytes are empty")
    if len(data) > limits.max_bytes:
        raise InvalidImage(f"encoded image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            img = PIL.Image.open(io.BytesIO(data))
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"image refused as a decompression bomb: {exc}") from None
    except PIL.UnidentifiedImageError:
        # PIL's own text names the BytesIO it read, memory address included.
        raise InvalidImage(f"image bytes could not be decoded: not an image PIL recognises; send one of "
                           f"{', '.join(DECODABLE_FORMATS)}") from None
    except Exception as exc:  # PIL raises many types for garbage input
        raise InvalidImage(f"image bytes could not be decoded ({type(exc).__name__}: {public_message(str(exc))})"
                           ) from None
    if img.format not in DECODABLE_FORMATS:
        raise InvalidImage(f"image format {img.format} is not accepted; send one of {', '.join(DECODABLE_FORMATS)}")
    width, height = img.size
    _check_pixels(width, height, limits)
    return img


def to_uint8_array(image: ImageInput, limits: ImageLimits, what: str = "image") -> np.ndarray:
    """Any accepted image input -> contiguous RGB uint8 HxWx3, with sizes checked."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        arr = decode_image(image, limits)
    elif isinstance(image, PIL.Image.Image):
        _check_pixels(image.width, image.height, limits, what)
        arr = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InvalidImage(f"{what} array must have dtype uint8, got {image.dtype}")
        if image.ndim != 3:
            raise InvalidImage(f"{what} array must be HxWx3, got rank {image.ndim} with shape {image.shape}")
        if image.shape[2] != 3:
            raise InvalidImage(f"{what} array must have 3 channels (RGB), got {image.shape[2]}")
        _check_pixels(image.shape[1], image.shape[0], limits, what)
        arr = image
    else:
        raise InvalidImage(
            f"{what} must be a PIL image, a uint8 HxWx3 numpy array or JPEG/PNG/WebP bytes, got {type(image).__name__}"
        )
    check_shape(arr.shape[1], arr.shape[0], limits, what)
    return np.ascontiguousarray(arr)


def _check_pixels(width: int, height: int, limits: ImageLimits, what: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise InvalidImage(f"{what} has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise InvalidImage(
            f"{what} is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}"
        )


def check_shape(width: int, height: int, limits: ImageLimits, what: str) -> None:
    _check_pixels(width, height, limits, what)
    if width < limits.min_side or height < limits.min_side:
        raise InvalidImage(f"{what} is {width}x{height}; both sides must be at least {limits.min_side} px")
    aspect = max(width / height, height / width)
    if aspect > limits.max_aspect:
        raise InvalidImage(f"{what} aspect ratio {aspect:.1f}:1 is over the limit of {limits.max_aspect}:1")


def fits_pipeline(height: int, width: int, multiple: int = 16) -> bool:
    """Whether fit_like_pipeline leaves an image of this size as it is (no resize, no crop)."""
    return width * height <= PIPELINE_MAX_AREA and height % multiple == 0 and width % multiple == 0


def fit_like_pipeline(arr: np.ndarray, multiple: int = 16) -> np.ndarray:
    """Resizes to ~1 MP when larger (LANCZOS) and centre-crops to a multiple of 16, as Flux2KleinPipeline does."""
    height, width = arr.shape[:2]
    if width * height > PIPELINE_MAX_AREA:
        scale = math.sqrt(PIPELINE_MAX_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
        arr = np.asarray(PIL.Image.fromarray(arr).resize((width, height), PIL.Image.Resampling.LANCZOS))
    crop_w, crop_h = (width // multiple) * multiple, (height // multiple) * multiple
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return np.ascontiguousarray(arr[top : top + crop_h, left : left + crop_w])


def to_pixel_tensor(arr: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 HxWx3 -> [1, 3, H, W] in [-1, 1]; pinned host memory and a non-blocking copy on a GPU."""
    return to_pixel_batch(arr[None], device, dtype)


def to_pixel_batch(arrays: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 BxHxWx3 -> [B, 3, H, W] in [-1, 1] in one copy (dataset encoding: one pinned buffer per batch)."""
    return uint8_to_pixels(stage_uint8(arrays, device), dtype)


def stage_uint8(arrays: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 BxHxWx3 on the host -> the same on the device: pinned memory and a non-blocking copy on a GPU (no host
    sync; the caching host allocator keeps the pinned block until the copy is done)."""
    host = torch.from_numpy(arrays if arrays.flags.writeable else arrays.copy())  # PIL-backed arrays are read-only
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def uint8_to_pixels(staged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 BxHxWx3 (on the device) -> [B, 3, H, W] in [-1, 1], on the device: graph-capturable."""
    # Contiguous NCHW as the pipeline hands it over: a channels-last view makes cuDNN pick other conv kernels.
    pixels = staged.permute(0, 3, 1, 2).contiguous()
    # Same float32 arithmetic as VaeImageProcessor (x / 255, then 2x - 1) so outputs match the pipeline exactly.
    pixels = pixels.to(torch.float32) / 255.0
    return (2.0 * pixels - 1.0).to(dtype)


def postprocess(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 3, H, W] in [-1, 1] -> (float32 HxWx3 in [0, 1], its uint8 quantisation), on the pixels' device.

    VaeImageProcessor.postprocess's float arithmetic, then numpy_to_pil's rounding (x * 255, round half to even,
    as numpy rounds): the same bits as the pipeline's PIL output, computed where the pixels are."""
    image = (pixels * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).float().contiguous()
    return image, (image * 255).round().to(torch.uint8)


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Device tensors -> numpy arrays: non-blocking copies into pinned buffers, then one wait for all of them."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu().numpy() for t in tensors]
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, t in zip(hosts, tensors):
        host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [host.numpy() for host in hosts]


def pixels_to_array(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [-1, 1] -> float32 HxWx3 in [0, 1], as VaeImageProcessor.postprocess computes it."""
    return to_host(postprocess(pixels)[0])[0]


def check_output_format(fmt: object) -> str:
    """The lower-case name of an output format, or InvalidRequest naming the ones there are."""
    key = fmt.lower() if isinstance(fmt, str) else fmt
    if key not in _PIL_FORMATS:
        raise InvalidRequest(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {fmt!r}")
    return key


def encode_image(image: PIL.Image.Image, fmt: str, quality: int = JPEG_QUALITY) -> bytes:
    """PIL -> JPEG/PNG/WebP bytes."""
    key = check_output_format(fmt)
    buf = io.BytesIO()
    kwargs = {"quality": quality} if _PIL_FORMATS[key] in ("JPEG", "WEBP") else {}
    image.save(buf, format=_PIL_FORMATS[key], **kwargs)
    return buf.getvalue()
