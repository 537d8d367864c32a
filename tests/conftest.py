"""Shared fixtures: the shared data folder (skips locally when absent, fails in CI) and tiny editors."""

import os
import types

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from rtedit.paths import shared_dir as _shared_dir  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def shared_dir():
    """The ../shared folder (or $RTEDIT_SHARED_DIR); CI must have it, a laptop may not."""
    path = _shared_dir()
    if not path.is_dir():
        if IN_CI:
            pytest.fail(f"shared data folder {path} is missing in CI; set RTEDIT_SHARED_DIR")
        pytest.skip(f"shared data folder {path} is absent; set RTEDIT_SHARED_DIR to run this test")
    return path


@pytest.fixture(scope="session")
def taef2_weights(shared_dir):
    """Folder with the official TAEF2 encoder and decoder weights."""
    folder = shared_dir / "weights" / "taef2"
    for name in ("taef2_encoder.pth", "taef2_decoder.pth"):
        if not (folder / name).is_file():
            if IN_CI:
                pytest.fail(f"{folder / name} is missing in CI")
            pytest.skip(f"{folder / name} is absent")
    return folder


@pytest.fixture(scope="session")
def tiny_editor():
    """One tiny editor (random weights, CPU, float32) shared by the engine tests; tests must not mutate it."""
    from rtedit.editor import Editor

    return Editor.from_preset("tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_editor):
    """The stock diffusers pipeline over the very same modules: the reference for exactness."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(
        scheduler=tiny_editor.scheduler,
        vae=tiny_editor.vae,
        text_encoder=tiny_editor.text_encoder,
        tokenizer=tiny_editor.tokenizer,
        transformer=tiny_editor.transformer,
        is_distilled=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(height: int, width: int, seed: int = 0):
    """A smooth-ish random RGB uint8 image (noise alone would be an unrealistic VAE input)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.random((height // 8 + 1, width // 8 + 1, 3))
    img = np.kron(base, np.ones((8, 8, 1)))[:height, :width]
    return (np.clip(img + 0.1 * rng.random((height, width, 3)), 0, 1) * 255).astype(np.uint8)


def tiny_transformer(num_layers: int = 2, num_single_layers: int = 2, seed: int = 0):
    """The tiny preset's transformer geometry with enough blocks for DBCache to skip some (seeded)."""
    import torch
    from diffusers import Flux2Transformer2DModel

    from rtedit.presets import TINY_TRANSFORMER

    torch.manual_seed(seed)
    config = {**TINY_TRANSFORMER, "num_layers": num_layers, "num_single_layers": num_single_layers}
    return Flux2Transformer2DModel(**config).eval()


def tiny_transformer_inputs(n: int = 16, length: int = 8, seed: int = 1) -> dict:
    """Random target tokens [1, n, 128], text [1, length, 48] and their 4-axis position ids for tiny_transformer."""
    import torch

    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(1, n, 4)
    img_ids[0, :, 2] = torch.arange(n) // 4
    img_ids[0, :, 3] = torch.arange(n) % 4
    txt_ids = torch.zeros(1, length, 4)
    txt_ids[0, :, 3] = torch.arange(length)
    return {
        "hidden_states": torch.randn(1, n, 128, generator=g),
        "encoder_hidden_states": torch.randn(1, length, 48, generator=g),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }


class FakeResponse:
    """Stands in for a Serve DeploymentResponse in router tests: awaitable, cancellable."""

    def __init__(self, value):
        self.value = value

    def __await__(self):
        if False:
            yield
        return self.value

    def cancel(self):
        pass


def via_serve_handle(router_args):
    """Router arguments whose frames go through the (fake) editor handle, not over a replica's frame channel."""
    return router_args.model_copy(update={"frame_channel": "serve"})


class FakeAdmission:
    """The admission side of an editor handle (deployments/editor.py's admission_state broadcast, admit and
    close_session) for router tests over fake handles: one replica that has room unless `full` is set."""

    def __init__(self, replica: str = "fake", capacity: int = 64, slots: int = 4):
        self.full = False
        self._book = {"replica": replica, "capacity": capacity, "sessions": 0, "one_shots": 0, "slots": slots,
                      "draining": None}
        self.admit = types.SimpleNamespace(
            remote=lambda session, replica=None: FakeResponse({"admitted": not self.full, **self.book}))
        self.close_session = types.SimpleNamespace(
            remote=lambda session, replica=None: FakeResponse({"closed": True, "replica": self.book["replica"]}))

    @property
    def book(self) -> dict:
        return {**self._book, "sessions": self._book["capacity"] if self.full else 0}

    def broadcast(self, method: str):
        assert method == "admission_state", method

        async def results(**_):
            return [dict(self.book)]

        return types.SimpleNamespace(results_async=results)


@pytest.fixture
def one_thread():
    """One torch thread for tiny models and 2-D toys: a second only adds synchronisation (and competes with other
    work on a 2-core machine: a DMDR toy run took 180 s on two contended threads, 11 s on one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
