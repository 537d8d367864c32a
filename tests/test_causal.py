"""The causal-attention core (rtedit.model.causal): both modes' masks bit for bit, the processors get their arguments,
the cached two-pass path equals one masked pass per step, and `kv` equals diffusers' Flux2KleinKVPipeline.

Float32 on CPU with tiny random transformers; every model here is a private copy (installing processors mutates a
transformer), so the shared fixtures stay untouched.
"""

import copy
import logging

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import Flux2KleinKVPipeline
from diffusers.models.attention_dispatch import AttentionBackendName

from conftest import random_image, tiny_transformer
from rtedit.errors import ConfigError
from rtedit.frame_request import FrameRequest
from rtedit.model.causal import (
    FrameCache,
    SessionCache,
    causal_denoise,
    causal_processors,
    causal_velocity,
    encode_frame,
    encode_session,
    install_causal_processors,
    kv_extract,
    kv_step,
    restore_processors,
    session_step,
    split_conditions,
)
from rtedit.model.causal_attention import (
    LayerPass,
    SessionAttnProcessor,
    SessionParallelSelfAttnProcessor,
)
from rtedit.model.inputs import token_layout, transformer_inputs
from rtedit.model.packing import LatentIdCache, grid_ids, text_ids
from rtedit.model.schedule import TimestepCache, euler_step

CPU = torch.device("cpu")
F32 = torch.float32
TEXT, SIDE = 8, 4  # 8 text tokens, a 4x4 target and input grid; references are 3x4 and 2x4
CT = 0.0  # the condition timestep, as Flux2KleinKVPipeline uses it


def sharpened(model, factor: float):
    """Default init leaves the modulation gates near zero, so attention (and any mask) barely moves the velocity
    (~1e-4); larger modulation and timestep-embedding weights make the tests here sensitive to what attends to what."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or "time_guidance_embed" in name:
                p.mul_(factor)
    return model


@pytest.fixture(scope="module")
def base():
    return sharpened(tiny_transformer(num_layers=2, num_single_layers=2), 3.0)


@pytest.fixture(scope="module")
def models(base):
    """The same weights three times: stock processors, kv's, session's."""
    out = {"stock": copy.deepcopy(base)}
    for mode in ("kv", "session"):
        out[mode] = copy.deepcopy(base)
        install_causal_processors(out[mode], mode)
    return out


def frame(refs: int, batch: int = 1, seed: int = 0, ct: float | None = CT):
    """A conditions-first layout (I, then `refs` references, then X) and random tokens for it."""
    shapes = ((SIDE, SIDE),) + tuple((3 - i, 4) for i in range(refs))
    ids = LatentIdCache().references(shapes, CPU)[0]  # I at T=10, R at 20, 30: the editor's ids
    per_image = torch.split(ids, [h * w for h, w in shapes])
    layout = token_layout(grid_ids(0, SIDE, SIDE), per_image, text_ids(TEXT)[0], "conditions_first", ct)
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, SIDE * SIDE, 128, generator=g)
    conditions = torch.randn(batch, layout.condition_tokens, 128, generator=g)
    prompt = torch.randn(batch, TEXT, 48, generator=g)
    return layout, target, conditions, prompt


def block_states(model, layout, run) -> list[dict]:
    """Every block's output split into T, I, R and X (forward hooks), for a pass whose streams are [T] and [I, R, X]."""
    outs = []
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    hooks = [b.register_forward_hook(lambda module, args, out: outs.append(out)) for b in blocks]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    assert len(outs) == len(blocks)
    refs = slice(layout.references[0].start, layout.references[-1].stop)
    states = []
    for out in outs:
        text, stream = out if isinstance(out, tuple) else (out[:, :layout.text_tokens], out[:, layout.text_tokens:])
        states.append({"T": text, "I": stream[:, layout.input], "R": stream[:, refs], "X": stream[:, layout.target]})
    return states


def unchanged(a: list[dict], b: list[dict], group: str) -> bool:
    return all(torch.equal(x[group], y[group]) for x, y in zip(a, b))


def changed(a: list[dict], b: list[dict], group: str) -> bool:
    return not torch.equal(a[-1][group], b[-1][group])


def perturb(x: torch.Tensor, where: slice = slice(None), seed: int = 5) -> torch.Tensor:
    y = x.clone()
    y[:, where] += torch.randn(y[:, where].shape, generator=torch.Generator().manual_seed(seed))
    return y


# ---- processors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["kv", "session"])
def test_install_keeps_backends_and_full_path_and_restore_puts_back(base, mode):
    model = copy.deepcopy(base)
    layout, target, conditions, prompt = frame(refs=1)
    inputs = transformer_inputs(layout, target, conditions, torch.full((1,), 0.6), prompt, F32)
    originals = model.attn_processors
    for p in originals.values():  # as the attention probe leaves them
        p._attention_backend = AttentionBackendName("_native_math")
    with torch.inference_mode():
        full = model(**inputs)[0]
    previous = install_causal_processors(model, mode)
    installed = model.attn_processors
    assert all(type(p).__name__.endswith(("KVAttnProcessor", "KVParallelSelfAttnProcessor")) if mode == "kv" else
               isinstance(p, (SessionAttnProcessor, SessionParallelSelfAttnProcessor)) for p in installed.values())
    assert all(p._attention_backend == AttentionBackendName("_native_math") for p in installed.values())
    with torch.inference_mode():  # without causal arguments they compute full attention: the full path is unchanged
        assert torch.equal(model(**inputs)[0], full)
    restore_processors(model, previous)
    assert all(model.attn_processors[k] is v for k, v in originals.items())
    with causal_processors(model, mode):
        assert not any(p is originals[k] for k, p in model.attn_processors.items())
    assert all(model.attn_processors[k] is v for k, v in originals.items())


def test_causal_passes_refuse_what_would_run_full_attention(models):
    layout, target, conditions, prompt = frame(refs=1)
    sigma = torch.full((1,), 0.5)
    image, references = split_conditions(layout, conditions)
    stock = models["stock"]
    for mode in ("kv", "session"):  # the stock processors would drop the causal arguments
        with pytest.raises(ConfigError, match="install_causal_processors"):
            causal_velocity(stock, mode, layout, target, conditions, sigma, prompt, F32)
    with pytest.raises(ConfigError, match="install_causal_processors"):
        encode_session(stock, layout, references, prompt, F32)
    plain = token_layout(layout.ids(layout.target), [layout.ids(layout.input), layout.ids(layout.references[0])],
                         layout.text_ids, "conditions_first")  # no condition timestep: diffusers gets no num_ref_tokens
    for mode in ("kv", "session"):
        with pytest.raises(ConfigError, match="condition_timestep"):
            causal_velocity(models[mode], mode, plain, target, conditions, sigma, prompt, F32)
    with pytest.raises(ConfigError, match="causal mode"):
        causal_velocity(models["kv"], "bidirectional", layout, target, conditions, sigma, prompt, F32)
    with torch.inference_mode():
        session = encode_session(models["session"], layout, references, prompt, F32)
        other = frame(refs=2)[0]  # another frame's layout does not fit this session's references
        with pytest.raises(ConfigError, match="does not fit the session"):
            encode_frame(models["session"], session, other, image, F32)


def dense_mask(mode: str, layout) -> torch.Tensor:
    """The mode's mask as a dense [S, S] boolean (True: may attend) over the joint sequence [T, I, R, X]."""
    n, L = layout.text_tokens + layout.img_ids.shape[0], layout.text_tokens
    groups = {"T": slice(0, L), "I": slice(L + layout.input.start, L + layout.input.stop),
              "R": slice(L + layout.references[0].start, L + layout.references[-1].stop),
              "X": slice(L + layout.target.start, L + layout.target.stop)}
    sees = ({"T": "TIRX", "I": "IR", "R": "IR", "X": "TIRX"} if mode == "kv" else
            {"T": "TR", "R": "TR", "I": "TRI", "X": "TIRX"})
    mask = torch.zeros(n, n, dtype=torch.bool)
    for query, keys in sees.items():
        for k in keys:
            mask[groups[query], groups[k]] = True
    return mask


@pytest.mark.parametrize("mode", ["kv", "session"])
def test_masked_pass_is_the_dense_mask_and_not_full_attention(models, mode):
    """With the condition timestep equal to the step's, modulation is uniform and only the mask remains: the masked
    pass equals the stock forward given the mode's dense mask, and differs from it without one."""
    sigma = 0.75
    layout, target, conditions, prompt = frame(refs=2, batch=2, ct=sigma)
    t = torch.full((2,), sigma)
    inputs = transformer_inputs(layout, target, conditions, t, prompt, F32)
    with torch.inference_mode():
        masked = causal_velocity(models[mode], mode, layout, target, conditions, t, prompt, F32)
        stock = models["stock"]
        reference = stock(**inputs, joint_attention_kwargs={"attention_mask": dense_mask(mode, layout)})[0]
        full = stock(**inputs)[0]
    x = layout.target
    assert (masked - reference[:, x]).abs().max().item() <= 1e-5
    assert (masked - full[:, x]).abs().max().item() > 1e-3


def test_processors_receive_their_arguments(models):
    """No pass logs diffusers' "will be ignored" (its processors would then run full attention); the stock
    processors given the same argument do log it, so the capture works."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger("diffusers")  # its records do not propagate to the root logger
    root.addHandler(handler)
    layout, target, conditions, prompt = frame(refs=1)
    sigma = torch.full((1,), 0.5)
    image, references = split_conditions(layout, conditions)
    try:
        with torch.inference_mode():
            for mode in ("kv", "session"):
                causal_velocity(models[mode], mode, layout, target, conditions, sigma, prompt, F32)
            _, kv = kv_extract(models["kv"], layout, target, conditions, sigma, prompt, F32)
            kv_step(models["kv"], kv, layout, target, sigma, prompt, F32)
            session = encode_session(models["session"], layout, references, prompt, F32)
            cache = encode_frame(models["session"], session, layout, image, F32)
            session_step(models["session"], cache, layout, target, sigma, F32)
        assert not [r.getMessage() for r in records if "will be ignored" in r.getMessage()]
        with torch.inference_mode():
            models["stock"](**transformer_inputs(layout, target, conditions, sigma, prompt, F32),
                            joint_attention_kwargs={"causal": LayerPass()})
        assert any("will be ignored" in r.getMessage() for r in records)
    finally:
        root.removeHandler(handler)


# ---- the masks, bit for bit --------------------------------------------------------------------------------------
def test_kv_conditions_see_only_themselves(models):
    """kv: perturbing X, T or the step's timestep leaves every block's I and R states bit for bit."""
    model = models["kv"]
    layout, target, conditions, prompt = frame(refs=2, batch=2)
    t = torch.full((2,), 0.8)

    def states(x=target, c=conditions, p=prompt, sigma=t):
        with torch.inference_mode():
            return block_states(model, layout, lambda: kv_extract(model, layout, x, c, sigma, p, F32))

    base = states()
    for what, other in [("X", states(x=perturb(target))), ("T", states(p=perturb(prompt))),
                        ("timestep", states(sigma=torch.full((2,), 0.3)))]:
        assert unchanged(base, other, "I") and unchanged(base, other, "R"), what
        assert changed(base, other, "X") and changed(base, other, "T"), what  # T and X see X, and see the step's t
    other = states(c=perturb(conditions, layout.input))  # the target sees the input image
    assert changed(base, other, "X") and changed(base, other, "T") and changed(base, other, "R")


def test_session_groups_see_only_what_came_before(models):
    """session: perturbing X or the step's timestep leaves T, R and I bit for bit; perturbing I leaves T and R."""
    model = models["session"]
    layout, target, conditions, prompt = frame(refs=2, batch=2)
    t = torch.full((2,), 0.8)

    def states(x=target, c=conditions, p=prompt, sigma=t):
        with torch.inference_mode():
            return block_states(model, layout,
                                lambda: causal_velocity(model, "session", layout, x, c, sigma, p, F32))

    base = states()
    for what, other in [("X", states(x=perturb(target))), ("timestep", states(sigma=torch.full((2,), 0.3)))]:
        assert all(unchanged(base, other, g) for g in "TRI"), what  # T too: it is modulated at the condition timestep
        assert changed(base, other, "X"), what
    other = states(c=perturb(conditions, layout.input))
    assert unchanged(base, other, "T") and unchanged(base, other, "R")
    assert changed(base, other, "I") and changed(base, other, "X")
    refs = slice(layout.references[0].start, layout.references[-1].stop)
    other = states(c=perturb(conditions, refs))  # T and R see each other, I sees them
    assert all(changed(base, other, g) for g in "TRIX")


# ---- the cached path -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def schedules(tiny_editor):
    return TimestepCache(tiny_editor.scheduler)


def masked_sampler(model, mode, layout, target, conditions, prompt, timesteps, sigmas):
    """The reference: one masked single pass per step, Euler steps as the scheduler takes them."""
    latents = target
    for i, t in enumerate(timesteps):
        sigma = t.expand(latents.shape[0]) / 1000
        velocity = causal_velocity(model, mode, layout, latents, conditions, sigma, prompt, F32)
        latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
    return latents


@pytest.mark.parametrize("refs", [0, 1, 2])
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("mode", ["kv", "session"])
def test_cached_path_equals_one_masked_pass_per_step(models, schedules, mode, steps, refs):
    layout, target, conditions, prompt = frame(refs, batch=2, seed=steps + 10 * refs, ct=0.1)
    timesteps, sigmas = schedules.get(SIDE * SIDE, steps, CPU)
    called = []
    with torch.inference_mode():
        cached = causal_denoise(models[mode], mode, layout, target, conditions, prompt, timesteps, sigmas, F32,
                                before_step=called.append)
        reference = masked_sampler(models[mode], mode, layout, target, conditions, prompt, timesteps, sigmas)
    assert called == list(range(steps))
    assert (cached - target).abs().max().item() > 0.1  # it denoised something
    assert (cached - reference).abs().max().item() <= 1e-5


def test_one_session_cache_serves_many_frames(models, schedules):
    """T and R are encoded once; frames with other input images reuse them and still equal the masked passes."""
    model = models["session"]
    layout, _, conditions, prompt = frame(refs=1, batch=2, ct=0.1)
    _, references = split_conditions(layout, conditions)
    timesteps, sigmas = schedules.get(SIDE * SIDE, 2, CPU)
    with torch.inference_mode():
        session = encode_session(model, layout, references, prompt, F32)
        for seed in (1, 2):
            _, target, fresh, _ = frame(refs=1, batch=2, seed=seed, ct=0.1)
            image = split_conditions(layout, fresh)[0]
            frame_conditions = torch.cat([image, references], dim=1)
            cached = causal_denoise(model, "session", layout, target, frame_conditions, None, timesteps, sigmas, F32,
                                    session=session)
            reference = masked_sampler(model, "session", layout, target, frame_conditions, prompt, timesteps, sigmas)
            assert (cached - reference).abs().max().item() <= 1e-5
        frame_cache = encode_frame(model, session, layout, image, F32)
        extracted = kv_extract(models["kv"], layout, target, frame_conditions, timesteps[:1] / 1000, prompt, F32)[1]
    layers, inner, itemsize = 4, model.inner_dim, 4  # K and V: 2 x batch x tokens x inner dim per layer
    ref_tokens, input_tokens = references.shape[1], image.shape[1]
    assert isinstance(session, SessionCache) and isinstance(frame_cache, FrameCache)
    assert session.nbytes == layers * 2 * 2 * (TEXT + ref_tokens) * inner * itemsize
    assert frame_cache.nbytes == layers * 2 * 2 * (TEXT + ref_tokens + input_tokens) * inner * itemsize
    assert extracted.nbytes == layers * 2 * 2 * (ref_tokens + input_tokens) * inner * itemsize
    for kv in session.layers + frame_cache.layers:  # nbytes is what they hold: no view keeps a larger tensor alive
        assert kv.key.untyped_storage().nbytes() == kv.key.nbytes
        assert kv.value.untyped_storage().nbytes() == kv.value.nbytes


def test_session_masked_pass_trains(base):
    """A student trains through the masked pass: gradients reach the weights, the same with checkpointing."""
    layout, target, conditions, prompt = frame(refs=1)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base).train()
        install_causal_processors(model, "session")
        if checkpointing:
            model.enable_gradient_checkpointing()
        velocity = causal_velocity(model, "session", layout, target, conditions, torch.full((1,), 0.5), prompt, F32)
        velocity.square().mean().backward()
        grads.append(model.transformer_blocks[0].attn.to_q.weight.grad.clone())
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


# ---- kv against diffusers' pipeline ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def editor_transformer(tiny_editor):
    """The editor's transformer, sharpened (its tiny VAE's latents are small, so conditions barely matter otherwise)."""
    return sharpened(copy.deepcopy(tiny_editor.transformer), 8.0)


@pytest.fixture(scope="module")
def kv_pipeline(tiny_editor, editor_transformer):
    """Flux2KleinKVPipeline on its own copies of the transformer (it swaps the processors) and the scheduler."""
    pipe = Flux2KleinKVPipeline(scheduler=copy.deepcopy(tiny_editor.scheduler), vae=tiny_editor.vae,
                                text_encoder=tiny_editor.text_encoder, tokenizer=tiny_editor.tokenizer,
                                transformer=copy.deepcopy(editor_transformer))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_frame(refs: int):
    return random_image(128, 128, seed=1), [random_image(64 + 16 * i, 80, seed=10 + i) for i in range(refs)]


def kv_pipeline_output(pipe, image, references, steps):
    return pipe(image=[PIL.Image.fromarray(a) for a in [image, *references]], prompt="make it winter",
                num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(7), output_type="np").images[0]


def editor_frame(editor, transformer, image, references, steps, mode: str | None):
    """The editor's prepare and decode around causal_denoise (mode "kv"), or around the full path (mode None)."""
    with torch.inference_mode():
        plan = editor._prepare(FrameRequest(image, "make it winter", tuple(references), steps=steps, seed=7))
        lay = plan.layout
        if mode is None:
            latents = plan.latents
            for i, t in enumerate(plan.timesteps):
                velocity = transformer(**plan.step_inputs(latents, t, F32))[0][:, lay.target]
                latents = euler_step(latents, velocity, plan.sigmas[i], plan.sigmas[i + 1])
        else:
            layout = token_layout(lay.ids(lay.target), [lay.ids(g) for g in [lay.input, *lay.references]],
                                  lay.text_ids, "conditions_first", CT)
            latents = causal_denoise(transformer, mode, layout, plan.latents, plan.conditions, plan.emb.embeds,
                                     plan.timesteps, plan.sigmas, F32)
        return editor._decode(latents, plan, None)[1]


# Steps and references on a diagonal: each count of either is covered, and the full 3 x 3 grid is the cached-path
# test's (test_cached_path_equals_one_masked_pass_per_step), which costs a tenth as much per case.
@pytest.mark.parametrize(("steps", "refs"), [(1, 0), (2, 1), (4, 2)])
def test_kv_equals_klein_kv_pipeline(tiny_editor, editor_transformer, kv_pipeline, steps, refs):
    """The editor's frame around causal_denoise(kv) equals the pipeline, whose `image` list is the input image then
    the references (condition timestep 0: its __call__ never passes ref_fixed_timestep)."""
    image, references = pipeline_frame(refs)
    model = copy.deepcopy(editor_transformer)
    install_causal_processors(model, "kv")
    ours = editor_frame(tiny_editor, model, image, references, steps, "kv")
    theirs = kv_pipeline_output(kv_pipeline, image, references, steps)
    assert ours.shape == theirs.shape == (128, 128, 3)
    assert np.abs(ours - theirs).max() <= 1e-4


def test_kv_pipeline_is_not_the_full_path(tiny_editor, editor_transformer, kv_pipeline):
    """The comparison above can tell: the full-attention path on the same modules is far from the KV pipeline."""
    image, references = pipeline_frame(1)
    full = editor_frame(tiny_editor, editor_transformer, image, references, 2, None)
    assert np.abs(full - kv_pipeline_output(kv_pipeline, image, references, 2)).max() > 1e-3
