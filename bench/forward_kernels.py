"""What one klein-4b forward is made of at a frame size: its attention and GEMM kernels timed alone, in TFLOP/s.

    python bench/forward_kernels.py --size 1024 [--autotune] [--json out/kernels-1024.json]
    python bench/forward_kernels.py --size 1024 --attention-only --attention-repeats 2000   # sustained clock

The 1024x1024 serving row is two 8,704-token forwards (4,096 target + 4,096 input + 512 text tokens); this names
what bounds them. Attention at the forward's shape [1, 24 heads, N, 128] under each SDPA backend torch has (and
flex attention, compiled), with contiguous inputs and with the strides a single-stream block gives them, and
each linear layer's GEMM under cuBLAS (and inductor's max-autotune templates with --autotune), so a lever is
chosen by its kernel's measured rate. Shapes come from the klein-4b preset's config.
The sum of the parts, layer by layer, is what a forward would take if nothing else ran: set it beside the serving
row's denoise (two forwards a frame) and bench/profile_frame.py's kernel split at the same size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.nn.functional as F

import frame_latency as fl  # bench/ is the script's folder, so its sibling imports by name
from rtedit.presets import KLEIN_4B_TRANSFORMER as K4B

TEXT_TOKENS = 512
PIXELS_PER_TOKEN = 16  # 8x VAE, 2x2 patches


def cuda_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def attention_rows(n: int, heads: int, head_dim: int, repeats: int = 20) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flop = 4 * n * n * heads * head_dim
    rows = []
    for layout, (q, k, v) in attention_layouts(n, heads, head_dim).items():
        candidates = [("sdpa default", None)] + [(f"sdpa {b.name.lower()}", b) for b in (
            SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)]
        for name, backend in candidates:
            def run(backend=backend, q=q, k=k, v=v):
                if backend is None:
                    return F.scaled_dot_product_attention(q, k, v)
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v)
            rows.append({**timed_row(name, run, flop, repeats), "layout": layout})
        if layout == "bhnd contiguous":
            from torch.nn.attention.flex_attention import flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
            rows.append({**timed_row("flex attention (compiled)", lambda: flex(q, k, v), flop, repeats),
                         "layout": layout})
    return rows


def attention_layouts(n: int, heads: int, head_dim: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """[1, heads, n, head_dim] views of q, k, v: contiguous, and as a single-stream block hands them to SDPA
    (diffusers' native backend permutes BSHD views: q and k written by the norm + RoPE kernel, v a column slice of
    the fused qkv + MLP projection's output), since a kernel's rate can depend on its inputs' strides."""
    def bhnd():
        return torch.randn(1, heads, n, head_dim, device="cuda", dtype=torch.bfloat16)

    d = heads * head_dim
    fused = torch.randn(1, n, 3 * d + 2 * int(d * K4B["mlp_ratio"]), device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.unflatten(-1, (heads, head_dim)) for t in fused[..., :3 * d].chunk(3, dim=-1))
    as_block = tuple(t.permute(0, 2, 1, 3) for t in (q.contiguous(), k.contiguous(), v))
    return {"bhnd contiguous": (bhnd(), bhnd(), bhnd()), "as a single block lays them out": as_block}


def timed_row(name: str, fn, flop: float, repeats: int = 20) -> dict:
    try:
        with torch.inference_mode():
            ms = cuda_ms(fn, repeats)
    except Exception as exc:  # a backend this torch/card lacks is a row that says so, not a failed bench
        return {"kernel": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    return {"kernel": name, "ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1)}


def linear_shapes(size: int) -> list[tuple[str, int, int, int, int]]:
    """(name, M tokens, K in, N out, uses per forward) of every linear layer in the blocks, from the preset."""
    d = K4B["num_attention_heads"] * K4B["attention_head_dim"]
    mlp = int(d * K4B["mlp_ratio"])
    image = 2 * (size // PIXELS_PER_TOKEN) ** 2
    double, single = K4B["num_layers"], K4B["num_single_layers"]
    all_tokens = image + TEXT_TOKENS
    return [
        ("double: image q|k|v (3 GEMMs)", image, d, d, 3 * double),
        ("double: image q,k,v fused", image, d, 3 * d, 0),  # what fuse_qkv_projections would run instead
        ("double: image out", image, d, d, double),
        ("double: image ff in (SwiGLU)", image, d, 2 * mlp, double),
        ("double: image ff out", image, mlp, d, double),
        ("double: text q|k|v, out", TEXT_TOKENS, d, d, 4 * double),
        ("double: text ff in", TEXT_TOKENS, d, 2 * mlp, double),
        ("double: text ff out", TEXT_TOKENS, mlp, d, double),
        ("single: qkv + ff in", all_tokens, d, 3 * d + 2 * mlp, single),
        ("single: out + ff out", all_tokens, d + mlp, d, single),
    ]


def gemm_rows(size: int, autotune: bool) -> list[dict]:
    rows = []
    tuned = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False) if autotune else None
    for name, m, k, n, uses in linear_shapes(size):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        flop = 2 * m * k * n
        row = {"gemm": name, "m": m, "k": k, "n": n, "uses": uses, **_rate("cublas", lambda: F.linear(x, w), flop)}
        if tuned is not None:
            row.update(_rate("autotuned", lambda: tuned(x, w), flop))
        rows.append(row)
    return rows


def _rate(label: str, fn, flop: float) -> dict:
    row = timed_row(label, fn, flop)
    return {f"{label}_{k}": v for k, v in row.items() if k != "kernel"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--autotune", action="store_true", help="also inductor max-autotune GEMMs (minutes of autotuning)")
    p.add_argument("--attention-repeats", type=int, default=20,
                   help="calls per attention timing; ~2,000 at 1024 keeps the card busy for seconds, at its "
                        "sustained clock rather than a burst's")
    p.add_argument("--attention-only", action="store_true", help="skip the GEMM rows")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.attention_repeats < 1:
        p.error(f"--attention-repeats must be at least 1, got {args.attention_repeats}")
    if not torch.cuda.is_available():
        raise SystemExit("forward_kernels needs a CUDA GPU")
    heads, head_dim = K4B["num_attention_heads"], K4B["attention_head_dim"]
    tokens = 2 * (args.size // PIXELS_PER_TOKEN) ** 2 + TEXT_TOKENS
    card, uuid = fl.card()
    print(f"{card} ({uuid}), {datetime.date.today()}, torch {torch.__version__}, klein-4b shapes at "
          f"{args.size}x{args.size}: {tokens} tokens a forward")
    attention = attention_rows(tokens, heads, head_dim, args.attention_repeats)
    for row in attention:
        print("attention", row)
    gemms = [] if args.attention_only else gemm_rows(args.size, args.autotune)
    for row in gemms:
        print("gemm", row)
    best_attention = min(r["ms"] for r in attention if "ms" in r)
    layers = K4B["num_layers"] + K4B["num_single_layers"]
    gemm_ms = sum(r["uses"] * r["cublas_ms"] for r in gemms if "cublas_ms" in r)
    parts = {"attention_ms": round(layers * best_attention, 2), "gemm_ms": round(gemm_ms, 2)}
    parts["sum_ms"] = round(parts["attention_ms"] + parts["gemm_ms"], 2)
    print("one forward, sum of parts (fastest attention, cuBLAS GEMMs):", parts)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"card": card, "card_uuid": uuid, "date": str(datetime.date.today()), "size": args.size,
                       "tokens": tokens, "attention": attention, "gemms": gemms, "forward": parts}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
