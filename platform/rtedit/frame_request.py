"""One edit as its caller asked for it, and the checks every request passes before it reaches the model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from rtedit.config import EditorConfig
from rtedit.errors import InvalidRequest, UnsupportedRequest
from rtedit.images import ImageInput, check_output_format
from rtedit.prompts import PromptEmbedding

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class FrameRequest:
    """One edit as its caller asked for it; `Editor._check_request` checks every field."""

    image: ImageInput
    prompt: str | PromptEmbedding
    references: tuple[ImageInput, ...] = ()
    steps: int = 2
    seed: int = 0
    height: int | None = None
    width: int | None = None
    output_format: str | None = None


def check_request(request: FrameRequest, config: EditorConfig, allowed_steps: tuple[int, ...] | None) -> FrameRequest:
    """Raises InvalidRequest (UnsupportedRequest for steps the model was not trained for) naming the bad field;
    returns the request with references as a tuple and the seed as a Python int."""
    references, steps, seed = request.references, request.steps, request.seed
    height, width, output_format = request.height, request.width, request.output_format
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise InvalidRequest(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= config.max_steps:
        raise InvalidRequest(f"steps must be in 1..{config.max_steps}, got {steps}")
    if allowed_steps is not None and steps not in allowed_steps:
        raise UnsupportedRequest(f"this model was trained for steps {list(allowed_steps)}; got steps={steps}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidRequest(f"seed must be an integer, got {seed!r}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise InvalidRequest(f"seed must be in 0..{MAX_SEED}, got {seed}")
    if isinstance(references, (str, bytes)) or not isinstance(references, (list, tuple)):
        raise InvalidRequest(f"references must be a list of images, got {type(references).__name__}")
    if len(references) > config.images.max_references:
        raise InvalidRequest(
            f"{len(references)} references given; at most {config.images.max_references} are accepted"
        )
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"{name} must be an integer number of pixels, got {value!r}")
        if value < config.images.min_side:
            raise InvalidRequest(f"{name} must be at least {config.images.min_side}, got {value}")
    if height and width and height * width > config.images.max_pixels:
        raise InvalidRequest(f"{height}x{width} is over the limit of {config.images.max_pixels} pixels")
    if output_format is not None:
        check_output_format(output_format)
    return dataclasses.replace(request, references=tuple(references), seed=int(seed))
