"""JPEG on the device (rtedit.jpeg_codec): validated and refused where it cannot run; the editor's routing (which
frames the device decodes, which stay on PIL, truncated and off-size ones) checked on a CPU with a stand-in codec
that decodes as PIL does, so its frames must equal the host path's bit for bit; with nvJPEG on a GPU, the probe,
closeness to the host codec and replays that never see a stale frame."""

import dataclasses
import io

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import random_image
from rtedit.config import EditorConfig, ShapeBuckets
from rtedit.editor import Editor
from rtedit.errors import ConfigError, InvalidImage
from rtedit.jpeg_codec import is_jpeg, select_codec
from rtedit.presets import build_preset

BUCKETS = ShapeBuckets(sizes=((64, 64),), references=(0,))
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU")


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_image_codec_is_validated_and_host_by_default():
    assert EditorConfig().image_codec == "host"
    with pytest.raises(ConfigError, match="image_codec"):
        EditorConfig(image_codec="gpu").validate()


def test_nvjpeg_on_a_cpu_is_refused_and_auto_keeps_the_host_codec_with_the_reason():
    with pytest.raises(ConfigError, match="nvjpeg cannot run here: nvJPEG needs a CUDA device"):
        select_codec("nvjpeg", torch.device("cpu"))
    codec, stats = select_codec("auto", torch.device("cpu"))
    assert codec is None and stats["codec"] == "host" and "CUDA device" in stats["reason"]
    editor = Editor.from_config(EditorConfig(model="tiny", device="cpu", image_codec="auto"))
    assert editor.jpeg is None and editor.stats()["image_codec"]["codec"] == "host"
    with pytest.raises(ConfigError, match="nvjpeg"):
        Editor.from_config(EditorConfig(model="tiny", device="cpu", image_codec="nvjpeg"))


class PILAsDevice:
    """Stands in for DeviceJpeg on a CPU: PIL's decode as an HxWx3 tensor view (as nvJPEG's is), PIL's encode."""

    def __init__(self):
        self.decoded = self.encoded = 0

    def decode(self, data: bytes) -> torch.Tensor:
        if data[-2:] != b"\xff\xd9":
            raise RuntimeError("the JPEG has no end-of-image marker")
        self.decoded += 1
        chw = torch.from_numpy(np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
        return chw.contiguous().permute(1, 2, 0)

    def encode(self, hwc: torch.Tensor, quality: int = 90) -> bytes:
        self.encoded += 1
        return jpeg(hwc.cpu().numpy(), quality)


@pytest.fixture(scope="module")
def editors():
    def make(buckets):
        bundle = build_preset("tiny", torch.device("cpu"), torch.float32, seed=0, text_encoder=True)
        return Editor(bundle, EditorConfig(buckets=buckets))

    host, routed = make(BUCKETS), make(BUCKETS)
    routed.jpeg = PILAsDevice()
    return host, routed


def test_bucket_sized_jpegs_take_the_device_path_and_equal_the_host_path(editors):
    host, routed = editors
    before = routed.jpeg.decoded, routed.jpeg.encoded
    for seed in (1, 2):
        data = jpeg(random_image(64, 64, seed=seed))
        a = host.edit(data, "make it blue", seed=seed, output_format="jpeg")
        b = routed.edit(data, "make it blue", seed=seed, output_format="jpeg")
        np.testing.assert_array_equal(b.array, a.array)
        assert b.data == a.data  # the stand-in encodes the device's quantised pixels as the host codec does
    assert (routed.jpeg.decoded, routed.jpeg.encoded) == (before[0] + 2, before[1] + 2)
    assert routed.stats()["image_codec"]["device decodes"] >= 2


def test_off_size_png_truncated_and_png_output_frames_stay_on_the_host_codec(editors):
    host, routed = editors
    decoded, encoded = routed.jpeg.decoded, routed.jpeg.encoded
    off_size = jpeg(random_image(80, 96, seed=3))  # resized into the bucket: PIL's resize, so PIL's decode
    a = host.edit(off_size, "make it blue", seed=0)
    b = routed.edit(off_size, "make it blue", seed=0)
    np.testing.assert_array_equal(b.array, a.array)
    frame = random_image(64, 64, seed=4)
    routed.edit(png(frame), "make it blue", seed=0, output_format="png")  # PNG in and out: never the device codec
    assert (routed.jpeg.decoded, routed.jpeg.encoded) == (decoded, encoded)
    assert routed.stats()["image_codec"]["host (resized or not RGB)"] >= 1
    truncated = jpeg(frame)[:-200]
    assert is_jpeg(truncated)
    with pytest.raises(InvalidImage, match="truncated or corrupt"):  # the stand-in refuses it, PIL says why
        routed.edit(truncated, "make it blue", seed=0)
    assert routed.stats()["image_codec"]["host (nvJPEG refused)"] >= 1


def test_without_buckets_only_sizes_the_pipeline_keeps_as_they_are_take_the_device_path():
    bundle = build_preset("tiny", torch.device("cpu"), torch.float32, seed=0, text_encoder=True)
    host = Editor(bundle, EditorConfig())
    routed = Editor(bundle, EditorConfig())
    routed.jpeg = PILAsDevice()
    for side, decoded in ((64, 1), (72, 1)):  # 72 is no multiple of 16: the pipeline crops it, on the host
        data = jpeg(random_image(side, side, seed=side))
        np.testing.assert_array_equal(routed.edit(data, "make it blue").array, host.edit(data, "make it blue").array)
        assert routed.jpeg.decoded == decoded
    assert routed.stats()["image_codec"]["host (resized or not RGB)"] == 1


# ---- on a GPU -------------------------------------------------------------------------------------------------
def gpu_editor(codec: str, graphs: bool) -> Editor:
    bundle = build_preset("tiny", torch.device("cuda"), torch.float32, seed=0, text_encoder=True)
    return Editor(bundle, EditorConfig(buckets=BUCKETS, cuda_graphs=graphs, image_codec=codec))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-12)))


@needs_gpu
def test_nvjpeg_passes_its_probe_and_stays_close_to_the_host_codec_through_replays():
    host, device = gpu_editor("host", graphs=True), gpu_editor("nvjpeg", graphs=True)
    stats = device.stats()["image_codec"]
    assert stats["codec"] == "nvjpeg" and stats["probe"]["decode_mean_abs_levels"] <= 2.0
    frames = [jpeg(random_image(64, 64, seed=s)) for s in (1, 2)]
    outputs = []
    for i in range(4):  # alternating frames: a replay must see each new one
        a = host.edit(frames[i % 2], "make it blue", seed=0, output_format="jpeg")
        b = device.edit(frames[i % 2], "make it blue", seed=0, output_format="jpeg")
        assert psnr(b.array, a.array) > 30.0  # the decoders differ slightly (chroma upsampling)
        decoded = np.asarray(PIL.Image.open(io.BytesIO(b.data)).convert("RGB"), np.float32) / 255
        assert psnr(decoded, b.array) > 30.0
        outputs.append(b.array)
    np.testing.assert_array_equal(outputs[0], outputs[2])
    np.testing.assert_array_equal(outputs[1], outputs[3])
    assert not np.array_equal(outputs[0], outputs[1])
    counts = device.stats()["image_codec"]
    assert counts["device decodes"] == 4 and counts["device encodes"] == 4
    assert device.stats()["cuda_graphs"]["unwarmed_runs"] == 0
    assert dataclasses.asdict(device.config)["image_codec"] == "nvjpeg"
