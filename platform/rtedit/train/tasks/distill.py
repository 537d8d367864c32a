"""Causal distillation: a student with a causal mask (`kv` or `session`) learns a full-attention teacher's edits.

- teacher: a served model folder (Flux2KleinPipeline layout + rtedit.json), e.g. the toy editor; its transformer
  runs full attention in the targets-first order (X, I, R), exactly as the editor serves it, and stays frozen;
- student: a copy of the teacher's transformer with the mode's processors (rtedit.model.causal), fed the same tokens
  in the conditions-first order (I, R, X) with I and R modulated at `condition_timestep`: the masked single pass
  (`causal_velocity`) that the cached serving path is held to;
- loss = output_weight * loss/output + attention_weight * loss/attention:
  loss/output: MSE between the student's and the teacher's velocity on X's tokens;
  loss/attention: the mean over every attention layer (double-stream, then single-stream blocks) of the MSE between
  the student's and the teacher's attention output on X's tokens (`AttentionTap` says which tensor of each block).
- export: the teacher's folder with the student's transformer, and its rtedit.json plus "causal" and
  "condition_timestep", which Editor.from_pretrained serves in that mode.

The data are the teacher's own training cache (rtedit.train.tasks.teacher): the teacher folder's
training_config.json names its settings, so the latents are its codec's and the batches drawn as it was trained;
the instruction embeddings are recomputed with the folder's own text encoder (`folder_embeddings`), as served.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rtedit.device import DTYPES
from rtedit.errors import ConfigError
from rtedit.model.inputs import TokenLayout, token_layout, transformer_inputs
from rtedit.train.config import section_check

TRAINING_CONFIG = "training_config.json"
# What a served folder holds beside the transformer that describes the teacher only: not copied into the student's.
TEACHER_ONLY = ("transformer", "training_config.json", "rtedit.json", "metrics.csv", "metrics.png", "README.md")
# Flow-sampling fields of TeacherTaskConfig a distillation run may change (None keeps the teacher's).
SAMPLING_FIELDS = ("logit_mean", "logit_std", "focus_steps", "focus_share", "family_weights")


@dataclass
class DistillTaskConfig:
    """The `task` section of jobs/configs/distill_toy.yaml."""

    teacher: str = "models/toy-editor"
    """A full-attention served folder with training_config.json (the toy editor, or a teacher job's export)."""
    data_dir: str = "data/toy"
    """Toy-world folder written by jobs.make_toy_data (train/)."""
    cache_dir: str | None = None
    """Latent cache folder; default DATA_DIR/teacher-cache (a teacher job's cache of the same data is reused)."""
    taef2_dir: str | None = None
    encode_device: str | None = None
    encode_batch: int = 256
    mode: typing.Literal["kv", "session"] = "session"
    """The student's causal mask (rtedit.model.causal): kv (klein-9B-KV's) or session (ours)."""
    condition_timestep: float = 0.0
    """The timestep in [0, 1] the student modulates its condition tokens at (T, R and I in session mode)."""
    output_weight: float = 1.0
    """Weight of loss/output, the velocity MSE on X (0: not trained; still logged, it costs nothing)."""
    attention_weight: float = 1.0
    """Weight of loss/attention, the attention-output MSE on X (0: no hooks, no term, no column)."""
    logit_mean: float | None = None
    """The flow's sigma draws (TeacherTaskConfig's fields of the same names); None: the teacher's training ones."""
    logit_std: float | None = None
    focus_steps: tuple[int, ...] | None = None
    focus_share: float | None = None
    family_weights: dict[str, float] | None = None
    gradient_checkpointing: bool = False
    export_dtype: typing.Literal["float32", "bfloat16", "float16"] | None = None
    """dtype of the exported transformer; None: the teacher folder's."""
    name: str | None = None
    """The exported model's name; None: the teacher's with the mode."""

    def validate(self) -> None:
        need = section_check("task")

        need(bool(self.teacher), "teacher", self.teacher, "a model folder")
        need(bool(self.data_dir), "data_dir", self.data_dir, "a folder")
        need(self.mode in ("kv", "session"), "mode", self.mode, "one of ['kv', 'session']")
        need(math.isfinite(self.condition_timestep) and 0 <= self.condition_timestep <= 1, "condition_timestep",
             self.condition_timestep, "in [0, 1]")
        for name in ("output_weight", "attention_weight"):
            value = getattr(self, name)
            need(math.isfinite(value) and value >= 0, name, value, "a finite number >= 0")
        if self.output_weight == 0 and self.attention_weight == 0:
            raise ConfigError("task.output_weight and task.attention_weight are both 0: nothing would be trained; "
                              "give at least one a positive weight")
        need(self.encode_batch >= 1, "encode_batch", self.encode_batch, ">= 1")


# ---------------------------------------------------------------------------------------------------------------
# The teacher folder


def teacher_training_config(folder: str | Path) -> dict[str, Any]:
    """The teacher folder's training_config.json (the job config it was trained with)."""
    path = Path(folder) / TRAINING_CONFIG
    if not path.is_file():
        raise ConfigError(f"task.teacher: {folder} has no {TRAINING_CONFIG}; distillation trains on the toy teacher's "
                          "cache, whose text-encoder settings that file names (a FLUX.2 klein folder would need a "
                          "cache built from its own text encoder and VAE, which this task does not build yet)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"task.teacher: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("task"), dict):
        raise ConfigError(f"task.teacher: {path} has no task section")
    return data


def cache_config(cfg: DistillTaskConfig):
    """The TeacherTaskConfig of the teacher's training run, with this run's data paths and sampling overrides: its
    build_cache/FlowBatcher give the very embeddings, latents and layouts the teacher was trained on."""
    from rtedit.config_parsing import from_dict
    from rtedit.train.tasks.teacher import TeacherTaskConfig

    task = dict(teacher_training_config(cfg.teacher)["task"])
    task.update(data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, taef2_dir=cfg.taef2_dir,
                encode_device=cfg.encode_device, encode_batch=cfg.encode_batch)
    task.update({k: getattr(cfg, k) for k in SAMPLING_FIELDS if getattr(cfg, k) is not None})
    out = from_dict(TeacherTaskConfig, task, "teacher training_config.json task")
    out.validate()
    return out


def folder_embeddings(folder: str | Path, instructions: list[str]) -> torch.Tensor:
    """The instructions' embeddings [U, L, D] from the folder's own text encoder (float32, CPU), with the prompt
    settings of its rtedit.json: what Editor.from_pretrained(folder).encode_prompt gives on a CPU.

    The toy teacher's cache holds the embeddings of build_text_encoder's model, whose rotary inv_freq buffer is
    rounded through export_dtype along with the weights; the saved folder's is not (a bfloat16 toy editor's
    embeddings differ by up to ~0.1). The student is served with the folder's encoder, so both models train on its.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rtedit.config import PromptConfig
    from rtedit.presets import PACKAGE_TOKENIZER, Sidecar, load_qwen3_tokenizer
    from rtedit.prompts import PromptEncoder

    folder = Path(folder)
    sidecar = Sidecar.load(folder) or Sidecar()
    tokenizer = (load_qwen3_tokenizer() if sidecar.tokenizer == PACKAGE_TOKENIZER
                 else AutoTokenizer.from_pretrained(folder / "tokenizer"))
    encoder = AutoModelForCausalLM.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval()
    prompts = PromptEncoder(encoder, tokenizer, PromptConfig(max_length=sidecar.prompt_length,
                                                             layers=tuple(sidecar.text_encoder_layers)))
    embeddings = prompts.encode(list(instructions))
    if any(e.truncated for e in embeddings):
        raise ConfigError(f"task.teacher: {folder}'s prompt_length {sidecar.prompt_length} truncates some instructions")
    return torch.cat([e.embeds for e in embeddings]).float()


def load_distill_cache(cfg: DistillTaskConfig, data=None) -> dict[str, Any]:
    """The teacher's latent cache of the train split (built by the job's prepare), its instruction embeddings
    replaced by the teacher folder's own (`folder_embeddings`)."""
    from rtedit.train.tasks.teacher import cache_file, load_cache

    cache = load_cache(cache_file(data or cache_config(cfg), "train"))
    cache["embeds"] = folder_embeddings(cfg.teacher, cache["instructions"])
    return cache


def load_teacher(folder: str | Path) -> torch.nn.Module:
    """The teacher's transformer (float32, frozen by the runtime); a causal folder is refused: teachers see all."""
    from diffusers import Flux2Transformer2DModel

    from rtedit.presets import SIDECAR_NAME

    folder = Path(folder)
    if not (folder / "transformer").is_dir():
        raise ConfigError(f"task.teacher: {folder} is not a model folder (no transformer/)")
    sidecar = folder / SIDECAR_NAME
    if sidecar.is_file() and json.loads(sidecar.read_text()).get("causal"):
        raise ConfigError(f"task.teacher: {folder} is a causal model (rtedit.json causal="
                          f"{json.loads(sidecar.read_text())['causal']!r}); the teacher must run full attention")
    return Flux2Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)


def saved_dtype(folder: str | Path) -> torch.dtype:
    """The dtype of a saved transformer's weights (its first tensor's)."""
    from safetensors import safe_open

    files = sorted((Path(folder) / "transformer").glob("*.safetensors"))
    if not files:
        raise ConfigError(f"task.teacher: {folder}/transformer holds no .safetensors weights")
    with safe_open(files[0], "pt") as f:
        name = next(iter(f.keys()))
        return f.get_tensor(name).dtype


# ---------------------------------------------------------------------------------------------------------------
# Attention outputs on X


class AttentionTap:
    """Forward hooks on every attention layer of a transformer that keep X's attention output while collecting.

    Double-stream blocks: the image stream's output of `block.attn` (after its to_out projection, before the gate),
    [B, N_X, dim]. Single-stream blocks: the attention output before it is fused with the MLP branch, i.e. the first
    `attn.inner_dim` channels of the input of `attn.to_out` (a pre-hook), [B, N_X, inner_dim]; their stream is
    [T, image stream], so X sits `text_tokens` further on. Outside `collect` the hooks do nothing (gradient
    checkpointing's recomputation in backward calls them again).
    """

    def __init__(self, transformer: torch.nn.Module):
        doubles, singles = transformer.transformer_blocks, transformer.single_transformer_blocks
        self.layers = len(doubles) + len(singles)
        self._where: tuple[slice, int] | None = None
        self._outputs: list[torch.Tensor | None] = []
        self.handles = [block.attn.register_forward_hook(partial(self._double, i)) for i, block in enumerate(doubles)]
        self.handles += [block.attn.to_out.register_forward_pre_hook(partial(self._single, len(doubles) + i,
                                                                             block.attn.inner_dim))
                         for i, block in enumerate(singles)]

    def _double(self, index: int, module, args, output) -> None:
        if self._where is not None:
            image = output[0] if isinstance(output, tuple) else output
            self._outputs[index] = image[:, self._where[0]]

    def _single(self, index: int, inner_dim: int, module, args) -> None:
        if self._where is not None:
            x, text = self._where
            self._outputs[index] = args[0][:, text + x.start:text + x.stop, :inner_dim]

    @contextlib.contextmanager
    def collect(self, layout: TokenLayout) -> Iterator[list[torch.Tensor]]:
        """Collects one pass over `layout`'s tokens; the list holds one tensor per layer once the block exits."""
        out: list[torch.Tensor] = []
        self._outputs, self._where = [None] * self.layers, (layout.target, layout.text_tokens)
        try:
            yield out
        finally:
            self._where = None
        missing = [i for i, t in enumerate(self._outputs) if t is None]
        if missing:
            raise RuntimeError(f"attention layers {missing} produced no output in this pass")
        out.extend(self._outputs)
        self._outputs = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def attention_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """The mean over layers of the per-layer MSE of X's attention outputs."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student and {len(teacher)} teacher attention layers")
    return torch.stack([torch.nn.functional.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)]).mean()


# ---------------------------------------------------------------------------------------------------------------
# One step's passes


def student_layout(layout: TokenLayout, condition_timestep: float | None) -> TokenLayout:
    """The same tokens and ids as the teacher's (targets-first) layout, conditions first, for the causal pass."""
    groups = ([layout.input] if layout.input is not None else []) + list(layout.references)
    return token_layout(layout.ids(layout.target), [layout.ids(g) for g in groups], layout.text_ids,
                        order="conditions_first", condition_timestep=condition_timestep)


@dataclass
class TeacherTargets:
    velocity: torch.Tensor  # the teacher's velocity on X [B, N, C]
    attention: list[torch.Tensor] | None  # X's attention output per layer (None: no attention term)


def _collecting(tap: AttentionTap | None, layout: TokenLayout):
    return tap.collect(layout) if tap is not None else contextlib.nullcontext(None)


def velocity_pass(transformer: torch.nn.Module, mode: str | None, layout: TokenLayout, batch: dict[str, Any],
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """X's velocity: the mode's masked pass (rtedit.model.causal), or full attention in `layout`'s order (None)."""
    from rtedit.model.causal import causal_velocity

    args = (layout, batch["noisy"].to(device), batch["cond"].to(device), batch["sigma"].to(device),
            batch["embeds"].to(device), dtype)
    if mode is None:
        return transformer(**transformer_inputs(*args))[0][:, layout.target]
    return causal_velocity(transformer, mode, *args)


@torch.no_grad()
def teacher_targets(teacher: torch.nn.Module, tap: AttentionTap | None, batch: dict[str, Any],
                    device: torch.device, dtype: torch.dtype) -> TeacherTargets:
    """The teacher's full-attention pass over the batch's own (targets-first) layout."""
    layout = batch["layout"].to(device)
    with _collecting(tap, layout) as attention:
        velocity = velocity_pass(teacher, None, layout, batch, device, dtype)
    return TeacherTargets(velocity, attention)


def distill_losses(transformer: torch.nn.Module, mode: str | None, layout: TokenLayout, batch: dict[str, Any],
                   targets: TeacherTargets, tap: AttentionTap | None, output_weight: float,
                   attention_weight: float, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the weighted total, {"loss/output", "loss/attention" (with a tap)}) of the student's pass over `layout`."""
    layout = layout.to(device)
    with _collecting(tap, layout) as attention:
        velocity = velocity_pass(transformer, mode, layout, batch, device, dtype)
    output = torch.nn.functional.mse_loss(velocity.float(), targets.velocity.float())
    parts = {"loss/output": output}
    total = output_weight * output if output_weight > 0 else None
    if attention is not None:
        if targets.attention is None:
            raise ValueError("the student collects attention outputs but the teacher's targets have none")
        parts["loss/attention"] = attention_loss(attention, targets.attention)
        term = attention_weight * parts["loss/attention"]
        total = term if total is None else total + term
    if total is None:
        raise ConfigError("no loss term has a positive weight")
    return total, {k: v.detach() for k, v in parts.items()}


class DistillStudent(torch.nn.Module):
    """The student's transformer behind a forward that returns the distillation loss: the job's DeepSpeed engine
    wraps this module, so the whole masked pass (diffusers' forward or the session glue) runs inside engine(...)
    and the engine's backward hooks see the loss (also when only the attention term trains)."""

    def __init__(self, transformer: torch.nn.Module, cfg: DistillTaskConfig, tap: AttentionTap | None):
        super().__init__()
        self.transformer = transformer
        self.mode, self.output_weight, self.attention_weight = cfg.mode, cfg.output_weight, cfg.attention_weight
        self.tap = tap

    def forward(self, batch: dict[str, Any], targets: TeacherTargets, layout: TokenLayout, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return distill_losses(self.transformer, self.mode, layout, batch, targets, self.tap, self.output_weight,
                              self.attention_weight, device, dtype)


def build_student(teacher: torch.nn.Module, cfg: DistillTaskConfig) -> DistillStudent:
    """A copy of the teacher's transformer with the mode's processors (and hooks when the attention term trains)."""
    from rtedit.model.causal import install_causal_processors

    # Built from the teacher's config and weights, not deep-copied: no hooks or processors of the teacher come along.
    transformer = type(teacher).from_config(teacher.config)
    transformer.load_state_dict(teacher.state_dict())
    transformer = transformer.to(next(teacher.parameters()).dtype).train().requires_grad_(True)
    install_causal_processors(transformer, cfg.mode)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return DistillStudent(transformer, cfg, AttentionTap(transformer) if cfg.attention_weight > 0 else None)


def hook_count(module: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks on a module and its submodules (tests: a weight of 0 installs none)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# ---------------------------------------------------------------------------------------------------------------
# Export


def export_student(transformer: torch.nn.Module, cfg: DistillTaskConfig, folder: str | Path,
                   job_config: dict[str, Any] | None = None) -> Path:
    """The teacher's folder with the student's transformer and an rtedit.json saying how it attends: the teacher's
    sidecar fields plus "causal" (the mode) and "condition_timestep"."""
    from rtedit.presets import SIDECAR_NAME

    teacher, folder = Path(cfg.teacher), Path(folder)
    shutil.copytree(teacher, folder, ignore=lambda d, names: [n for n in names if Path(d) == teacher
                                                               and n in TEACHER_ONLY])
    dtype = DTYPES[cfg.export_dtype] if cfg.export_dtype else saved_dtype(teacher)
    student = copy.deepcopy(transformer).cpu().to(dtype)
    student.save_pretrained(folder / "transformer", safe_serialization=True)
    sidecar_path = teacher / SIDECAR_NAME
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
    teacher_name = sidecar.get("name") or teacher.name
    sidecar["name"] = cfg.name or f"{teacher_name} ({cfg.mode} causal student)"
    sidecar["description"] = (
        f"{sidecar.get('description') or teacher_name} Causal student ({cfg.mode} mask, conditions modulated at "
        f"timestep {cfg.condition_timestep}) distilled from it by rtedit's distill job.")
    sidecar["causal"], sidecar["condition_timestep"] = cfg.mode, float(cfg.condition_timestep)
    (folder / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")
    record = dict(job_config or {})
    record["teacher_training_config"] = teacher_training_config(teacher)
    (folder / TRAINING_CONFIG).write_text(json.dumps(record, indent=2, default=list) + "\n")
    return folder
