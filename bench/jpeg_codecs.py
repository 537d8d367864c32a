"""JPEG in and out of a frame: the host codec the engine uses today (PIL) against nvJPEG through torchvision.

    python3 bench/jpeg_codecs.py --sizes 512 1024 --repeats 200

Per size: a photo (skimage.data.astronaut, resized) as JPEG at quality 90, then medians (ms) of
- host decode: PIL bytes -> RGB uint8 array (images.decode_image's work) and its pinned copy to the device;
- device decode: torchvision.io.decode_jpeg(device="cuda") from the bytes (their host-to-device copy included);
- host encode: the device's uint8 frame copied to the host, PIL image, JPEG bytes (Editor._decode's work);
- device encode: torchvision.io.encode_jpeg of the device frame, the bytes copied back;
each between two synchronisations, and how far the two decoders' pixels are apart (max and mean abs difference),
and the PSNR of each encoder's bytes decoded against the frame. Needs only torch, torchvision, PIL, numpy and
scikit-image (the GPU image has them all); it measures the lever, it does not change the engine.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
import PIL.Image
import torch


def timed(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / mse) if mse > 0 else float("inf")


def measure(size: int, repeats: int) -> dict:
    import skimage.data
    import torchvision.io as tvio

    photo = np.asarray(PIL.Image.fromarray(skimage.data.astronaut()).resize((size, size), PIL.Image.BICUBIC))
    buf = io.BytesIO()
    PIL.Image.fromarray(photo).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def host_decode():
        arr = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))
        return torch.from_numpy(arr).pin_memory().to("cuda", non_blocking=True)

    def device_decode():
        return tvio.decode_jpeg(raw, mode=tvio.ImageReadMode.RGB, device="cuda")

    frame = torch.from_numpy(photo).to("cuda")  # HxWx3, as Editor._decode_pixels quantises it
    chw = frame.permute(2, 0, 1).contiguous()

    def host_encode():
        host = torch.empty(frame.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(frame, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        out = io.BytesIO()
        PIL.Image.fromarray(host.numpy()).save(out, format="JPEG", quality=90)
        return out.getvalue()

    def device_encode():
        return tvio.encode_jpeg(chw, quality=90).cpu().numpy().tobytes()

    decoded_host = host_decode().cpu().numpy()
    decoded_device = device_decode().permute(1, 2, 0).cpu().numpy()
    diff = np.abs(decoded_host.astype(np.int16) - decoded_device.astype(np.int16))
    by_host, by_device = host_encode(), device_encode()
    as_pixels = lambda b: np.asarray(PIL.Image.open(io.BytesIO(b)).convert("RGB"))
    return {
        "size": size, "jpeg_bytes": len(data),
        "host_decode_ms": timed(host_decode, repeats), "device_decode_ms": timed(device_decode, repeats),
        "host_encode_ms": timed(host_encode, repeats), "device_encode_ms": timed(device_encode, repeats),
        "decoders_max_abs_diff": int(diff.max()), "decoders_mean_abs_diff": float(diff.mean()),
        "host_encode_psnr_db": psnr(as_pixels(by_host), photo), "host_encode_bytes": len(by_host),
        "device_encode_psnr_db": psnr(as_pixels(by_device), photo), "device_encode_bytes": len(by_device),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("jpeg_codecs.py times nvJPEG: it needs a CUDA device")
    import torchvision

    card = torch.cuda.get_device_name(0)
    rows = [measure(size, args.repeats) for size in args.sizes]
    print(f"{card}, torch {torch.__version__}, torchvision {torchvision.__version__}, median of {args.repeats} (ms)")
    print("| size | host decode + copy | device decode | host encode (copy, PIL) | device encode | decoders max / mean "
          "abs diff | encode PSNR host / device |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['host_decode_ms']:.2f} | {r['device_decode_ms']:.2f} | {r['host_encode_ms']:.2f} | "
              f"{r['device_encode_ms']:.2f} | {r['decoders_max_abs_diff']} / {r['decoders_mean_abs_diff']:.3f} | "
              f"{r['host_encode_psnr_db']:.2f} / {r['device_encode_psnr_db']:.2f} dB |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"card": card, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
