"""What prepare and decode are made of: each part of the two stages timed alone, with and without CUDA graphs.

    python bench/stage_breakdown.py --size 512 --repeats 50 [--json out/breakdown-512.json]
    python bench/stage_breakdown.py --model tiny --size 64 --repeats 3          # CPU dry run (no graph column)

The serving configuration (deployments/serve-gpu.yaml's replica config, step-2 reuse off, one bucket), built
through Editor.from_config. Each part runs on the editor's own functions, between two device synchronisations,
and is timed on the host clock: its cost when nothing overlaps it (median of --repeats). Parts of prepare: the
frame's JPEG bytes decoded and checked (what /ws/predict receives), fitting, the staging copy to the device, the
TAEF2 encode (through its CUDA graph in the graphs column), packing, the seed's noise; of decode: TAEF2 decode with
unpacking and quantisation on the device, the copy to the host, the PIL image and the JPEG encode of the reply.
Beside them, the stage medians of whole frames from `Editor.edit` (CUDA events, as every bench reports them).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import statistics
import sys
import time

import PIL.Image
import torch

import frame_latency as fl  # bench/ is the script's folder, so its sibling imports by name
from rtedit.fast_path import warm_prompt
from rtedit.images import encode_image, fit_like_pipeline, stage_uint8, to_host, to_uint8_array
from rtedit.model.packing import pack
from rtedit.model.schedule import initial_noise

PARTS = ("decode JPEG bytes", "fit", "staging copy", "autoencoder encode", "pack", "noise",
         "autoencoder decode + quantise", "copy to host", "PIL image", "JPEG encode")


def timed(fn, repeats: int, sync) -> float:
    samples = []
    for _ in range(repeats + 2):  # two unrecorded runs: caches and allocator warm
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples[2:])


def breakdown(editor, image_bytes: bytes, repeats: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if editor.device.type == "cuda" else (lambda: None)
    limits = editor.config.images
    arr = fit_like_pipeline(to_uint8_array(image_bytes, limits))
    staged = stage_uint8(arr[None], editor.codec.device)
    encode = (lambda: editor._encode_condition(arr, is_input=True))
    latent = encode()
    lat_h, lat_w = latent.shape[2], latent.shape[3]
    tokens = pack(latent)
    image, quantised = editor._decode_pixels(lat_h, lat_w, tokens)

    def decode_on_device():
        if editor.graphs is not None:
            return editor.graphs.run("decode", (lat_h, lat_w), lambda t: editor._decode_pixels(lat_h, lat_w, t),
                                     [tokens])
        return editor._decode_pixels(lat_h, lat_w, tokens)

    host_pixels = to_host(quantised)[0]
    pil = PIL.Image.fromarray(host_pixels)
    channels = editor.transformer.config.in_channels
    parts = {
        "decode JPEG bytes": lambda: to_uint8_array(image_bytes, limits),
        "fit": lambda: fit_like_pipeline(arr),
        "staging copy": lambda: stage_uint8(arr[None], editor.codec.device),
        "autoencoder encode": encode,
        "pack": lambda: pack(latent),
        "noise": lambda: initial_noise(0, (1, channels, lat_h, lat_w), editor.dtype, editor.device),
        "autoencoder decode + quantise": decode_on_device,
        "copy to host": lambda: to_host(image, quantised),
        "PIL image": lambda: PIL.Image.fromarray(host_pixels),
        "JPEG encode": lambda: encode_image(pil, "jpeg"),
    }
    assert tuple(parts) == PARTS and staged.shape[0] == 1
    return {name: timed(fn, repeats, sync) for name, fn in parts.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--frames", type=int, default=30, help="whole frames for the stage medians")
    p.add_argument("--model", default="klein-4b-random", choices=["klein-4b-random", "tiny"])
    p.add_argument("--json", default=None)
    p.add_argument("--image-codec", default="host", choices=["host", "nvjpeg", "auto"],
                   help="the engine's JPEG codec for the whole-frame rows (rtedit.jpeg_codec); the part rows time "
                        "the host codec's functions")
    args = p.parse_args()
    serving = fl.serving_config({**fl.engine_overrides(args.model, args.size), "image_codec": args.image_codec})
    # serve-gpu.yaml captures CUDA graphs: the "no graphs" column sets them aside itself.
    base = dataclasses.replace(serving, dbcache=dataclasses.replace(serving.dbcache, enabled=False), cuda_graphs=False,
                               buckets=dataclasses.replace(serving.buckets, sizes=((args.size, args.size),)))
    columns = {"no graphs": base}
    if torch.cuda.is_available():
        columns["graphs"] = dataclasses.replace(base, cuda_graphs=True)
    buf = io.BytesIO()
    PIL.Image.fromarray(fl.frame(args.size)).save(buf, format="JPEG", quality=90)
    image_bytes = buf.getvalue()
    results, stages, codecs = {}, {}, {}
    for name, config in columns.items():
        editor = fl.build(config)
        emb = warm_prompt(editor)
        with torch.inference_mode():
            results[name] = breakdown(editor, image_bytes, args.repeats)
        frames = [editor.edit(image_bytes, emb, output_format="jpeg").timings for _ in range(args.frames + 3)][3:]
        stages[name] = {s: statistics.median(t[s] for t in frames) for s in ("prepare", "denoise", "decode", "total")}
        codecs[name] = editor.stats()["image_codec"]  # which codec the whole-frame rows ran, and its counts
        del editor
        fl.release()
    card, uuid = fl.card()
    print(f"{card} ({uuid}), {datetime.date.today()}, {args.model}, {args.size}x{args.size}, median of "
          f"{args.repeats}, each part between two synchronisations (ms)")
    print("| part | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for part in PARTS:
        print(f"| {part} | " + " | ".join(f"{results[c][part]:.2f}" for c in columns) + " |")
    for stage in ("prepare", "denoise", "decode", "total"):
        print(f"| frame stage: {stage} (CUDA events) | " + " | ".join(f"{stages[c][stage]:.2f}" for c in columns) + " |")
    for name, codec in codecs.items():
        print(f"image codec of the frame rows, {name}: {json.dumps(codec, default=str)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"card": card, "card_uuid": uuid, "date": str(datetime.date.today()), "size": args.size,
                       "parts": results, "stages": stages,
                       "image_codec": codecs}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
