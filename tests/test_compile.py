"""Selective torch.compile on CPU with the eager backend: per-branch eager fallback, warm buckets never recompile."""

import pytest
import torch
from diffusers import AutoencoderKLFlux2
from torch._dynamo.backends.registry import list_backends, register_backend

from rtedit.accel.compile import CompileConfig, compile_regions
from rtedit.errors import ConfigError
from conftest import tiny_transformer


def _fails_to_compile(gm, example_inputs):
    raise RuntimeError("injected compile failure")


def _fails_to_run(gm, example_inputs):
    def run(*args):
        raise RuntimeError("injected run failure")

    return run


for _name, _fn in (("rtedit_test_fails_compile", _fails_to_compile), ("rtedit_test_fails_run", _fails_to_run)):
    if _name not in list_backends(exclude_tags=()):
        register_backend(_fn, name=_name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_vae() -> AutoencoderKLFlux2:
    torch.manual_seed(0)
    return AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), latent_channels=32, norm_num_groups=4,
                              layers_per_block=1).eval()


class Frame:
    """One synthetic frame of a bucket (output side in pixels, reference count): what the editor's stages see."""

    def __init__(self, side: int, refs: int, seed: int, text: int = 8):
        g = torch.Generator().manual_seed(seed)
        per_image = (side // 16) ** 2  # latent /8, then 2x2 patches
        n = per_image * (1 + refs)
        self.image = torch.rand(1, 3, side, side, generator=g) * 2 - 1
        self.refs = [torch.rand(1, 3, 40 + 8 * i, 24, generator=g) * 2 - 1 for i in range(refs)]  # odd sizes
        self.latent = torch.randn(1, 32, side // 8, side // 8, generator=g)
        img_ids = torch.zeros(1, n, 4)
        img_ids[0, :, 3] = torch.arange(n)
        txt_ids = torch.zeros(1, text, 4)
        txt_ids[0, :, 3] = torch.arange(text)
        self.transformer_kwargs = {
            "hidden_states": torch.randn(1, n, 128, generator=g),
            "encoder_hidden_states": torch.randn(1, text, 48, generator=g),
            "timestep": torch.tensor([0.6]), "img_ids": img_ids, "txt_ids": txt_ids, "return_dict": False}


@torch.no_grad()
def run_frame(frame: Frame, transformer, vae, regions=None):
    encoded = vae.encoder(frame.image)
    if regions is not None:
        with regions.eager("vae_encoder"):  # references: eager, so their sizes never compile anything
            refs = [vae.encoder(r) for r in frame.refs]
    else:
        refs = [vae.encoder(r) for r in frame.refs]
    velocity = transformer(**frame.transformer_kwargs)[0]
    decoded = vae.decoder(frame.latent)
    return [encoded, velocity, decoded, *refs]


def assert_outputs_equal(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branch, backend", [
    ("transformer", "rtedit_test_fails_compile"),
    ("vae_decoder", "rtedit_test_fails_run"),
], ids=["transformer-compile-fails", "decoder-run-fails"])
def test_a_failing_branch_drops_to_eager_alone(branch, backend):
    frame = Frame(32, 1, seed=1)
    expected = run_frame(frame, tiny_transformer(), tiny_vae())

    transformer, vae = tiny_transformer(), tiny_vae()
    regions = compile_regions(CompileConfig(backend="eager", branch_backends={branch: backend}),
                              transformer=transformer, vae_encoder=vae.encoder, vae_decoder=vae.decoder)
    assert all(b["state"] == "compiled" for b in regions.stats()["branches"].values())
    assert_outputs_equal(run_frame(frame, transformer, vae, regions), expected)

    stats = regions.stats()["branches"]
    assert stats[branch]["state"] == "eager" and "injected" in stats[branch]["failure"]
    others = [name for name in stats if name != branch]
    for name in others:
        assert stats[name]["state"] == "compiled" and stats[name]["failure"] is None and stats[name]["compiles"] >= 1

    # Later frames: the failed branch stays eager and is never compiled again; the others still run compiled.
    failed_compiles = stats[branch]["compiles"]
    frame2 = Frame(32, 1, seed=2)
    expected2 = run_frame(frame2, tiny_transformer(), tiny_vae())
    assert_outputs_equal(run_frame(frame2, transformer, vae, regions), expected2)
    stats = regions.stats()["branches"]
    assert stats[branch]["compiles"] == failed_compiles and stats[branch]["state"] == "eager"
    assert all(stats[name]["state"] == "compiled" for name in others)


def test_bad_inputs_fail_without_dropping_the_branch():
    vae = tiny_vae()
    regions = compile_regions(CompileConfig(backend="eager", transformer=False, vae_encoder=False),
                              vae_decoder=vae.decoder)
    with pytest.raises(RuntimeError), torch.no_grad():
        vae.decoder(torch.randn(1, 7, 4, 4))  # wrong channel count: eager fails the same way
    branch = regions.stats()["branches"]["vae_decoder"]
    assert branch["state"] == "compiled" and branch["failure"] is None
    with torch.no_grad():
        vae.decoder(torch.randn(1, 32, 4, 4))
    assert regions.stats()["branches"]["vae_decoder"]["compiles"] >= 1


BUCKETS = [(32, 0), (32, 1), (48, 0)]  # (output side, reference count)


def test_new_frames_inside_warmed_buckets_never_recompile():
    transformer, vae = tiny_transformer(), tiny_vae()
    regions = compile_regions(CompileConfig(backend="eager"), transformer=transformer, vae_encoder=vae.encoder,
                              vae_decoder=vae.decoder)
    report = regions.warm_up(BUCKETS, lambda bucket: run_frame(Frame(*bucket, seed=0), transformer, vae, regions))
    assert report["repeat_compiles"] == {"transformer": 0, "vae_encoder": 0, "vae_decoder": 0}
    # Static shapes: one graph per block class per token count, one per image size for each VAE half.
    assert report["compiles"] == {"transformer": 2 * 3, "vae_encoder": 2, "vae_decoder": 2}
    assert all(b["recompiles"] == 0 for b in regions.stats()["branches"].values())

    # New frames (new content, other reference sizes, other order) inside the buckets: nothing compiles.
    reference_t, reference_v = tiny_transformer(), tiny_vae()
    for seed, bucket in enumerate([(48, 0), (32, 1), (32, 0), (32, 1)], start=10):
        frame = Frame(*bucket, seed=seed)
        assert_outputs_equal(run_frame(frame, transformer, vae, regions), run_frame(frame, reference_t, reference_v))
    stats = regions.stats()
    assert stats["warm"] and stats["buckets"] == 3
    assert {n: b["recompiles"] for n, b in stats["branches"].items()} == {
        "transformer": 0, "vae_encoder": 0, "vae_decoder": 0}

    # Control: a size outside the buckets does compile, and is counted against the branch it hit.
    run_frame(Frame(64, 0, seed=99), transformer, vae, regions)
    branches = regions.stats()["branches"]
    assert branches["transformer"]["recompiles"] == 2
    assert branches["vae_encoder"]["recompiles"] == 1 and branches["vae_decoder"]["recompiles"] == 1
    assert all(b["state"] == "compiled" for b in branches.values())


def test_warm_up_refuses_more_buckets_than_the_recompile_limit():
    transformer = tiny_transformer()
    regions = compile_regions(CompileConfig(backend="eager", recompile_limit=8), transformer=transformer)
    limit = torch._dynamo.config.recompile_limit
    with pytest.raises(ConfigError, match="recompile_limit"):
        regions.warm_up([(16 * (i + 1), 0) for i in range(limit)], lambda bucket: None)


def test_disabled_and_unselected_branches_stay_eager():
    transformer, vae = tiny_transformer(), tiny_vae()
    regions = compile_regions(CompileConfig(enabled=False), transformer=transformer, vae_encoder=vae.encoder)
    assert all(b["state"] == "off" for b in regions.stats()["branches"].values())
    assert vae.encoder._compiled_call_impl is None
    regions = compile_regions(CompileConfig(backend="eager", transformer=False), transformer=transformer,
                              vae_encoder=vae.encoder)
    stats = regions.stats()["branches"]
    assert stats["transformer"]["state"] == "off" and stats["vae_encoder"]["state"] == "compiled"
    assert stats["vae_decoder"]["state"] == "off"  # no module given


@pytest.mark.parametrize("kwargs, field", [
    ({"backend": "nonsense"}, "backend"),
    ({"backend": "eager", "mode": "max-autotune"}, "mode"),
    ({"mode": "turbo"}, "mode"),
    ({"branch_backends": {"unet": "eager"}}, "branch_backends"),
    ({"branch_backends": {"vae_decoder": "nonsense"}}, "branch_backends"),
    ({"recompile_limit": 0}, "recompile_limit"),
    ({"fullgraph": "yes"}, "fullgraph"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        CompileConfig(**kwargs).validate()


@pytest.mark.slow
def test_inductor_smoke_on_the_vae_decoder():
    """One real inductor compile (C++ on CPU, slow on 2 cores): same output as eager, counted once."""
    vae = tiny_vae()
    latent = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = vae.decoder(latent)
        regions = compile_regions(CompileConfig(transformer=False, vae_encoder=False), vae_decoder=vae.decoder)
        got = vae.decoder(latent)
    branch = regions.stats()["branches"]["vae_decoder"]
    assert branch["state"] == "compiled" and branch["compiles"] == 1, branch
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_compiled_blocks_run_under_dbcache_without_graph_breaks_or_recompiles():
    """The transformer branch with cache-dit attached: fullgraph holds, warmed requests never recompile."""
    from rtedit.accel.dbcache import CachingConfig, attach_cache

    def two_steps(transformer, cache, frame):
        cache.refresh(2)
        kw = dict(frame.transformer_kwargs)
        x = kw.pop("hidden_states")
        with torch.no_grad():
            for t in (1.0, 0.5):
                kw["timestep"] = torch.tensor([t])
                x = x - 0.5 * transformer(hidden_states=x, **kw)[0]
        return x

    reference = tiny_transformer()
    reference_cache = attach_cache(reference, CachingConfig(policy="static"))
    transformer = tiny_transformer()
    cache = attach_cache(transformer, CachingConfig(policy="static"))
    regions = compile_regions(CompileConfig(backend="eager"), transformer=transformer)
    regions.warm_up([(32, 0)], lambda bucket: two_steps(transformer, cache, Frame(*bucket, seed=0)))
    for seed in (1, 2):
        frame = Frame(32, 0, seed=seed)
        torch.testing.assert_close(two_steps(transformer, cache, frame), two_steps(reference, reference_cache, frame),
                                   rtol=1e-5, atol=1e-5)
    branch = regions.stats()["branches"]["transformer"]
    assert branch["state"] == "compiled" and branch["failure"] is None and branch["recompiles"] == 0
    assert cache.stats()["groups"]["single_transformer_blocks"]["last"]["cached_steps"] == [1]
