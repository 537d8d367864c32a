"""Instructions -> embeddings: Qwen3 run only up to its deepest tapped layer, and a bounded PromptCache."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass

import torch

from rtedit.config import PromptConfig
from rtedit.errors import InvalidRequest, ModelLoadError
from rtedit.lru import CountingLRU
from rtedit.model.packing import text_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptEmbedding:
    """What the transformer needs of an instruction; small enough to cross a process boundary once per prompt."""

    embeds: torch.Tensor  # [1, L, len(layers) * hidden]
    text_ids: torch.Tensor  # [1, L, 4]
    key: str  # hash of the prompt and the encoder settings
    truncated: bool = False  # the prompt had more tokens than prompt.max_length and was cut, as the pipeline cuts it

    @property
    def nbytes(self) -> int:
        return self.embeds.numel() * self.embeds.element_size() + self.text_ids.numel() * self.text_ids.element_size()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PromptEmbedding":
        embeds = self.embeds.to(device=device, dtype=dtype or self.embeds.dtype)
        return PromptEmbedding(embeds, self.text_ids.to(device), self.key, self.truncated)


def check_prompt(prompt: object, config: PromptConfig) -> str:
    """Rejects what no encoder should see: non-strings, blank prompts, absurd lengths."""
    if not isinstance(prompt, str):
        raise InvalidRequest(f"prompt must be a string or a PromptEmbedding, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InvalidRequest("prompt is empty; say what the edit should do, e.g. 'make it winter'")
    if len(prompt) > config.max_chars:
        raise InvalidRequest(f"prompt has {len(prompt)} characters, over the limit of {config.max_chars}")
    return prompt


class _DeepestLayerReached(Exception):
    """Raised by a hook to stop Qwen3 after the deepest tapped layer: later layers and lm_head are never run."""


def settings_key(model_name: str, config: PromptConfig) -> str:
    """What decides the embedding of a string, known without the text encoder (editor replicas compute it too).

    The dtype is left out on purpose: a float32 encoder on a CPU and a bf16 editor on a GPU must agree on keys.
    """
    return f"{model_name}|{config.max_length}|{tuple(config.layers)}"


def model_prompt_settings(config: PromptConfig, sidecar, model_name: str) -> tuple[PromptConfig, str]:
    """The prompt settings a model serves with, and their cache settings key: the folder's own prompt length and
    tapped layers (rtedit.json) override the config. The text-encoder service and every editor replica call
    this, so their keys agree."""
    config = dataclasses.replace(config, max_length=sidecar.prompt_length, layers=tuple(sidecar.text_encoder_layers))
    return config, settings_key(model_name, config)


def prompt_key(settings: str, prompt: str) -> str:
    return hashlib.sha256(f"{settings}\x00{prompt}".encode()).hexdigest()


class PromptEncoder:
    """Tokenises like Flux2KleinPipeline and stacks the tapped Qwen3 hidden states, computing nothing past them."""

    def __init__(self, text_encoder, tokenizer, config: PromptConfig, name: str = "") -> None:
        if text_encoder is None or tokenizer is None:
            raise ModelLoadError("a PromptEncoder needs both a text encoder and a tokenizer")
        layers = text_encoder.model.layers
        if max(config.layers) > len(layers):
            raise ModelLoadError(f"prompt.layers {config.layers} exceed the text encoder's {len(layers)} layers")
        self.text_encoder, self.tokenizer, self.config = text_encoder, tokenizer, config
        self.settings_key = settings_key(name, config)

    def key(self, prompt: str) -> str:
        return prompt_key(self.settings_key, prompt)

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for p in prompts
        ]
        full = self.tokenizer(texts, truncation=False)["input_ids"]
        truncated = [len(ids) > self.config.max_length for ids in full]
        inputs = self.tokenizer(
            texts, return_tensors="pt", padding="max_length", truncation=True, max_length=self.config.max_length
        )
        return inputs["input_ids"], inputs["attention_mask"], truncated

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[PromptEmbedding]:
        """Encodes a batch of prompts (the Serve text encoder batches concurrent cache misses)."""
        input_ids, attention_mask, truncated = self._tokenize(prompts)
        device = self.text_encoder.device
        captured: dict[int, torch.Tensor] = {}
        deepest = max(self.config.layers)

        def tap(index: int):
            def hook(_module, _args, output):
                captured[index] = output[0] if isinstance(output, tuple) else output
                if index == deepest:
                    raise _DeepestLayerReached

            return hook

        layers = self.text_encoder.model.layers
        handles = [layers[k - 1].register_forward_hook(tap(k)) for k in sorted(set(self.config.layers))]
        try:
            self.text_encoder.model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
            )
        except _DeepestLayerReached:
            pass
        finally:
            for handle in handles:
                handle.remove()
        # hidden_states[k] of the pipeline is the output of decoder layer k (layers[k - 1]).
        out = torch.stack([captured[k] for k in self.config.layers], dim=1).to(self.text_encoder.dtype)
        b, n, length, hidden = out.shape
        embeds = out.permute(0, 2, 1, 3).reshape(b, length, n * hidden)
        ids = text_ids(length).to(device)
        results = []
        for i, prompt in enumerate(prompts):
            if truncated[i]:
                log.warning("prompt truncated to %d tokens, as Flux2KleinPipeline does", self.config.max_length)
            results.append(PromptEmbedding(embeds[i : i + 1].clone(), ids, self.key(prompt), truncated[i]))
        return results


class PromptCache(CountingLRU[str, PromptEmbedding]):
    """Bounded LRU of PromptEmbeddings keyed by prompt hash, in entries and bytes; a hit returns the same tensors."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.max_entries = max_entries

    def put(self, entry: PromptEmbedding) -> None:
        if entry.nbytes > self.max_bytes:
            return  # larger than the whole cache: serve it, never store it
        with self._lock:
            self._replace(entry.key, entry)
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._evict_oldest()

    def stats(self) -> dict:
        with self._lock:
            return self.counters()


class PromptService:
    """Instructions -> cached embeddings: the PromptCache in front of a PromptEncoder (which may be absent).

    An Editor owns one; the Serve text encoder builds one alone (`from_config`), without the transformer or VAE.
    """

    def __init__(self, encoder: PromptEncoder | None, config: PromptConfig, settings: str) -> None:
        self.encoder, self.config, self.settings_key = encoder, config, settings
        self.cache = PromptCache(config.cache_entries, config.cache_bytes)

    @classmethod
    def from_config(cls, config) -> "PromptService":
        """The text encoder of `config.model` only (an EditorConfig), for a service that only encodes prompts."""
        from rtedit.device import resolve_device, resolve_dtype
        from rtedit.presets import PRESETS, build_text_encoder, load_text_encoder

        config.validate()
        device = resolve_device(config.device, prefer_gpu=config.model != "tiny")
        dtype = resolve_dtype(config.dtype, device)
        loader = build_text_encoder if config.model in PRESETS else load_text_encoder
        text_encoder, tokenizer, sidecar = loader(config.model, device, dtype)
        name = sidecar.name or config.model  # what the editor's ModelBundle.name is for the same model
        prompt_cfg, settings = model_prompt_settings(config.prompt, sidecar, name)
        return cls(PromptEncoder(text_encoder, tokenizer, prompt_cfg, name=name), prompt_cfg, settings)

    def key(self, prompt: str) -> str:
        return prompt_key(self.settings_key, prompt)

    def encode_prompts(self, prompts) -> list[PromptEmbedding]:
        """Several instructions at once; the cache misses go through the text encoder as one batch."""
        if self.encoder is None:
            raise InvalidRequest(
                "this editor has no text encoder; pass a PromptEmbedding made by an editor or text-encoder service"
            )
        prompts = [check_prompt(p, self.config) for p in prompts]
        keys = [self.key(p) for p in prompts]
        found = {k: self.cache.get(k) for k in dict.fromkeys(keys)}
        missing = list(dict.fromkeys(p for p, k in zip(prompts, keys) if found[k] is None))
        if missing:
            for entry in self.encoder.encode(missing):
                self.cache.put(entry)
                found[entry.key] = entry
        return [found[k] for k in keys]

    def encode_prompt(self, prompt: str) -> PromptEmbedding:
        return self.encode_prompts([prompt])[0]

    def stats(self) -> dict:
        return self.cache.stats()
