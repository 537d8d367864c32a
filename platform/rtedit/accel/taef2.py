"""TAEF2, the tiny autoencoder for FLUX.2 latents: our implementation of madebyollin's architecture (taesd.py,
MIT), loading the official MIT-licensed weights from a configured folder (third-party data, never committed).

Latent interface, settled: TAEF2_LATENT_SPACE = "bn_normalised".
TAEF2's encoder outputs, and its decoder expects, the *BN-normalised* FLUX.2 latent, unpatchified: the 32-channel
H/8 tensor you get by unpatchifying (2x2) the transformer's 128-channel latent after the FLUX.2 batch-norm has been
applied. It does *not* work on the raw AutoencoderKLFlux2 latent. Evidence:
- The official model card (hub madebyollin/taef2, "Using in diffusers") swaps TAEF2 into Flux2KleinPipeline with a
  wrapper whose `bn` is BatchNorm2d(128, affine=False) with default stats (mean 0, var 1) and batch_norm_eps 0.0, so
  the pipeline's BN (de)normalisation is the identity: the decoder receives the transformer's normalised latent,
  unpatchified, and encoder outputs become the normalised latent unchanged.
- ComfyUI's taesd.py wires TAEF2 the same way: the sampler's 128-channel FLUX.2 latent is unpatchified and
  decoded with no BN step (vae_scale 1, vae_shift 0), and encoder output patchified *is* the latent.
- Users who fed TAEF2 the de-normalised (raw) latent saw dark, oversaturated images and switched to the
  normalised one: IonDen/mlx-taef PR #41 (raw input: SSIM 0.59 vs the full VAE; normalised: 0.92; "the inverse
  widens the latent by about 1.8x per channel") and sd-webui-forge-classic PR #807 ("BN ... caused
  oversaturation"). madebyollin (taesd issue #35) notes BFL's reference VAE normalises inside encode/decode.
- Measured here (tests/test_taef2.py::test_latents_look_bn_normalised checks three of them): TAEF2 latents of the
  scikit-image photos astronaut, coffee, chelsea, rocket, immunohistochemistry, hubble_deep_field and retina
  (512x512), patchified to 128 channels, have per-channel means near 0 (median |mean| 0.12) and standard deviations
  0.54-1.03 (median 0.73, pooled 0.81): unit scale, as normalised latents are, not the ~1.8x wider raw scale.
  The decoder's soft clamp to +-3 also fits a unit-variance latent.
So the engine must skip the FLUX.2 BN for TAEF2: decode = unpack -> unpatchify -> TAEF2 decode; encode = TAEF2
encode -> patchify -> pack. (With the full VAE the BN stays on the patchified side as in the pipeline.)

Written by hand because diffusers' AutoencoderTiny (0.42.1) has no mid-block GroupNorm "pool" branch; module
names follow taesd.py so the official state dicts load with strict=True.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from rtedit.errors import InvalidImage, InvalidRequest, ModelLoadError
from rtedit.paths import taef2_dir

logger = logging.getLogger(__name__)

TAEF2_LATENT_SPACE = "bn_normalised"
TAEF2_LATENT_CHANNELS = 32
TAEF2_SCALE_FACTOR = 8
TAEF2_ENCODER_FILE = "taef2_encoder.pth"
TAEF2_DECODER_FILE = "taef2_decoder.pth"
# sha256 of the files at madebyollin/taesd commit 5cccb12 ("Add support for FLUX.2 VAE").
TAEF2_SHA256 = {
    TAEF2_ENCODER_FILE: "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
    TAEF2_DECODER_FILE: "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
}
TAEF2_HUB_REPO = "madebyollin/taef2"
TAEF2_HUB_FILE = "taef2.safetensors"

_WIDTH = 64
_POOL_WIDTH = 4 * _WIDTH
_OFFLINE_VALUES = ("1", "on", "yes", "true")


class _SoftClamp(nn.Module):
    """Smoothly limits decoder inputs to (-3, 3), as TAESD's decoders do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _conv3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


def _conv1(n_in: int, n_out: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 1, bias=False)


class _Block(nn.Module):
    """Three 3x3 convs with a residual; `pooled` adds FLUX.2's GroupNorm branch, which sees the whole image."""

    def __init__(self, pooled: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3(_WIDTH, _WIDTH), nn.ReLU(), _conv3(_WIDTH, _WIDTH), nn.ReLU(), _conv3(_WIDTH, _WIDTH)
        )
        # Every block keeps 64 channels, so the skip never needs a projection.
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = None
        if pooled:
            self.pool = nn.Sequential(
                _conv1(_WIDTH, _POOL_WIDTH), nn.GroupNorm(4, _POOL_WIDTH), nn.ReLU(), _conv1(_POOL_WIDTH, _WIDTH)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _build_encoder() -> nn.Sequential:
    """[B,3,H,W] in [0,1] -> [B,32,H/8,W/8]; the three deepest blocks carry the GroupNorm branch."""
    layers: list[nn.Module] = [_conv3(3, _WIDTH), _Block()]
    for stage in range(3):
        layers.append(_conv3(_WIDTH, _WIDTH, stride=2, bias=False))
        layers.extend(_Block(pooled=stage == 2) for _ in range(3))
    layers.append(_conv3(_WIDTH, TAEF2_LATENT_CHANNELS))
    return nn.Sequential(*layers)


def _build_decoder() -> nn.Sequential:
    """[B,32,h,w] -> [B,3,8h,8w] in about [0,1]; the three lowest-resolution blocks carry the GroupNorm branch."""
    layers: list[nn.Module] = [_SoftClamp(), _conv3(TAEF2_LATENT_CHANNELS, _WIDTH), nn.ReLU()]
    for stage in range(3):
        layers.extend(_Block(pooled=stage == 0) for _ in range(3))
        layers.extend([nn.Upsample(scale_factor=2), _conv3(_WIDTH, _WIDTH, bias=False)])
    layers.extend([_Block(), _conv3(_WIDTH, 3)])
    return nn.Sequential(*layers)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _where_to_get(folder: Path) -> str:
    return (
        f"Put {TAEF2_ENCODER_FILE} and {TAEF2_DECODER_FILE} in {folder} (or point RTEDIT_TAEF2_DIR / "
        f"RTEDIT_SHARED_DIR elsewhere). They are MIT-licensed third-party data by Ollin Boer Bohan: the files of "
        f"github.com/madebyollin/taesd (commit 5cccb12); the same weights are {TAEF2_HUB_FILE} on the hub repo "
        f"{TAEF2_HUB_REPO}, which load_taef2 fetches when the hub is reachable (HF_HUB_OFFLINE unset)."
    )


def _load_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{source} does not hold TAEF2 weights: {exc}") from exc


def _resolve(device: torch.device | str | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    dtype = torch.float32 if dtype is None else dtype
    if not dtype.is_floating_point:
        raise InvalidRequest(f"dtype must be a floating point dtype, got {dtype}")
    return torch.device("cpu" if device is None else device), dtype


class TAEF2Autoencoder(nn.Module):
    """Tiny FLUX.2 autoencoder on [-1,1] pixels (the diffusers convention) and BN-normalised 32-channel latents."""

    latent_channels = TAEF2_LATENT_CHANNELS
    scale_factor = TAEF2_SCALE_FACTOR
    latent_space = TAEF2_LATENT_SPACE

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _build_encoder()
        self.decoder = _build_decoder()
        # Where the weights came from ("random", a folder, or the hub), for model_info and stats.
        self.source = "random"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] pixels in [-1,1] (H, W multiples of 8) -> [B,32,H/8,W/8] latent, in the model's dtype."""
        if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
            raise InvalidImage(f"pixels must be a float [B,3,H,W] tensor, got {pixels.dtype} {tuple(pixels.shape)}")
        height, width = pixels.shape[-2:]
        if height == 0 or width == 0 or height % self.scale_factor or width % self.scale_factor:
            raise InvalidImage(f"pixel height and width must be positive multiples of 8, got {height}x{width}")
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        return self.encoder(pixels * 0.5 + 0.5)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B,32,h,w] latent -> [B,3,8h,8w] pixels clamped to [-1,1], in the model's dtype."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels or not latents.is_floating_point():
            raise InvalidRequest(
                f"latents must be a float [B,{self.latent_channels},h,w] tensor, "
                f"got {latents.dtype} {tuple(latents.shape)}"
            )
        latents = latents.to(device=self.device, dtype=self.dtype)
        return (self.decoder(latents) * 2 - 1).clamp(-1, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Round trip, for reconstruction checks."""
        return self.decode(self.encode(pixels))

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TAEF2Autoencoder:
        """Load the official .pth files from `folder` (default rtedit.paths.taef2_dir()) after checking their sha256."""
        device, dtype = _resolve(device, dtype)
        folder = Path(taef2_dir() if folder is None else folder).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"TAEF2 weights folder {folder} does not exist. {_where_to_get(folder)}")
        model = cls()
        for name, part in ((TAEF2_ENCODER_FILE, model.encoder), (TAEF2_DECODER_FILE, model.decoder)):
            path = folder / name
            if not path.is_file():
                raise ModelLoadError(f"TAEF2 weights file {path} is missing. {_where_to_get(folder)}")
            actual = _sha256(path)
            if actual != TAEF2_SHA256[name]:
                raise ModelLoadError(
                    f"TAEF2 weights file {path} has sha256 {actual}, expected {TAEF2_SHA256[name]}: "
                    f"it is corrupted or not the official file. {_where_to_get(folder)}"
                )
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a checksummed official file never gets here; keep the message typed anyway
                raise ModelLoadError(f"cannot read TAEF2 weights file {path}: {exc}") from exc
            _load_state_dict(part, state, str(path))
        model.source = str(folder)
        return model.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_safetensors(
        cls,
        path: str | os.PathLike[str],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TAEF2Autoencoder:
        """Load the hub's single-file layout (diffusers-style `encoder.layers.N` / `decoder.layers.N` keys)."""
        from safetensors.torch import load_file

        device, dtype = _resolve(device, dtype)
        path = Path(path)
        try:
            flat = load_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"cannot read TAEF2 safetensors file {path}: {exc}") from exc
        model = cls()
        _load_state_dict(model, convert_hub_state_dict(flat), str(path))
        model.source = str(path)
        return model.to(device=device, dtype=dtype).eval()


def convert_hub_state_dict(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub keys `encoder.layers.N.x` -> `encoder.N.x`, `decoder.layers.N.x` -> `decoder.(N+1).x`.

    The hub layout follows diffusers' AutoencoderTiny, whose decoder applies the soft clamp in forward instead of
    as layer 0, so decoder indices are one lower than in taesd.py (the model card's converter does the same).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        parts = key.split(".")
        if len(parts) < 4 or parts[0] not in ("encoder", "decoder") or not parts[2].isdigit():
            raise ModelLoadError(f"unexpected key {key!r} in a TAEF2 safetensors file")
        index = int(parts[2]) + (1 if parts[0] == "decoder" else 0)
        out[".".join([parts[0], str(index), *parts[3:]])] = value
    return out


def _hub_enabled() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in _OFFLINE_VALUES


def load_taef2(
    folder: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    allow_download: bool | None = None,
) -> TAEF2Autoencoder:
    """TAEF2 from `folder` (default rtedit.paths.taef2_dir()); if its files are absent, from the hub when allowed.

    allow_download=None means "when HF_HUB_OFFLINE is not set". A download is logged as a warning and recorded in
    the returned model's `source`; a folder holding either file is always loaded (and checked), never bypassed.
    """
    folder = Path(taef2_dir() if folder is None else folder).expanduser()
    present = [(folder / name).is_file() for name in (TAEF2_ENCODER_FILE, TAEF2_DECODER_FILE)]
    allow_download = _hub_enabled() if allow_download is None else allow_download
    # Download only into an empty slot: a folder holding one or wrong files is a mistake to report, not to paper over.
    if any(present) or not allow_download:
        return TAEF2Autoencoder.from_folder(folder, device=device, dtype=dtype)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(TAEF2_HUB_REPO, TAEF2_HUB_FILE)
    except Exception as exc:
        raise ModelLoadError(
            f"TAEF2 weights are missing in {folder} and the download of {TAEF2_HUB_REPO}/{TAEF2_HUB_FILE} "
            f"failed ({type(exc).__name__}: {exc}). {_where_to_get(folder)}"
        ) from exc
    logger.warning(
        "TAEF2 weights missing in %s; loaded %s/%s from the hub (sha256 %s)",
        folder, TAEF2_HUB_REPO, TAEF2_HUB_FILE, _sha256(Path(path)),
    )
    model = TAEF2Autoencoder.from_safetensors(path, device=device, dtype=dtype)
    model.source = f"hub:{TAEF2_HUB_REPO}/{TAEF2_HUB_FILE}"
    return model
