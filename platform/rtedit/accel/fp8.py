"""FP8 linear layers in the transformer's blocks: torchao's float8 quantisation of activations and weights.

Off by default (`EditorConfig.fp8`). torchao is imported only when it is on, so a CPU install never needs it (the
GPU host gets it carried, bench/lent_host.sh); a device without FP8 tensor cores (CUDA compute capability below
8.9, or no CUDA) is refused with a ConfigError rather than run through a slow emulation. Only the linear layers of
the double- and single-stream blocks are converted: they hold the GEMM time, while the embedders and the output
layer are small and set the precision of what enters and leaves the blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rtedit.errors import ConfigError

logger = logging.getLogger(__name__)

GRANULARITIES = ("rowwise", "tensorwise")
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


@dataclass
class FP8Config:
    """FP8 (e4m3) linear layers: dynamic per-row (or per-tensor) scales for activations and weights."""

    enabled: bool = False
    granularity: str = "rowwise"  # "rowwise": torchao PerRow (one scale per row), "tensorwise": PerTensor

    def validate(self) -> "FP8Config":
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"fp8.enabled must be true or false, got {self.enabled!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"fp8.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        return self


def check_fp8_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError(f"fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or higher); the "
                          f"editor runs on {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ConfigError(f"fp8 needs FP8 tensor cores (compute capability 8.9 or higher); "
                          f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")


def in_blocks(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and name.split(".", 1)[0] in BLOCK_LISTS


def quantize_blocks(transformer: torch.nn.Module, config: FP8Config) -> dict:
    """Converts the blocks' linear layers in place; returns what `Editor.stats()["fp8"]` shows."""
    config.validate()
    check_fp8_device(transformer.device)
    try:
        import torchao
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
    except ImportError as exc:
        raise ConfigError(f"fp8 needs torchao (pip install torchao): {exc}") from exc
    granularity = PerRow() if config.granularity == "rowwise" else PerTensor()
    layers = [name for name, module in transformer.named_modules() if in_blocks(module, name)]
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=granularity), filter_fn=in_blocks)
    logger.info("fp8: %d linear layers of the transformer's blocks converted (torchao %s, %s)", len(layers),
                torchao.__version__, config.granularity)
    return {"enabled": True, "granularity": config.granularity, "layers": len(layers),
            "torchao": torchao.__version__}
