"""The one transformer-input builder (rtedit.model.inputs): token layouts in both orders, the separate condition
timestep, and the same inputs for a training batch and a serving step."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import random_image
from rtedit.editor import FrameRequest
from rtedit.errors import ConfigError
from rtedit.images import to_pixel_tensor
from rtedit.model.inputs import token_layout, transformer_inputs
from rtedit.model.packing import LatentIdCache, pack
from rtedit.train.tasks.teacher import FlowBatcher, TeacherTaskConfig, flow_inputs

CPU = torch.device("cpu")


def _ids(n: int, t: int) -> torch.Tensor:
    ids = torch.zeros(n, 4, dtype=torch.int64)
    ids[:, 0], ids[:, 3] = t, torch.arange(n)
    return ids


def test_layout_slices_and_ids_in_both_orders():
    target, source, ref, text = _ids(6, 0), _ids(4, 10), _ids(3, 20), _ids(5, 0)
    first = token_layout(target, [source, ref], text)
    assert (first.target, first.input, first.references, first.conditions) == (
        slice(0, 6), slice(6, 10), (slice(10, 13),), slice(6, 13))
    last = token_layout(target, [source, ref], text, order="conditions_first")
    assert (last.target, last.input, last.references, last.conditions) == (
        slice(7, 13), slice(0, 4), (slice(4, 7),), slice(0, 7))
    for layout in (first, last):
        assert torch.equal(layout.ids(layout.target), target) and torch.equal(layout.ids(layout.input), source)
        assert torch.equal(layout.ids(layout.references[0]), ref) and layout.text_tokens == 5
        assert layout.condition_tokens == 7
    alone = token_layout(target[None], [], text[None])  # batched ids are taken as one layout
    assert alone.input is None and alone.condition_tokens == 0 and alone.img_ids.shape == (6, 4)


def test_builder_refuses_what_does_not_fit_its_layout():
    layout = token_layout(_ids(6, 0), [_ids(4, 10)], _ids(5, 0))
    x, c, emb, t = torch.zeros(1, 6, 8), torch.zeros(1, 4, 8), torch.zeros(1, 5, 3), torch.ones(1)
    for bad, pattern in [((torch.zeros(1, 5, 8), c, emb), "target tokens"), ((x, torch.zeros(1, 3, 8), emb), "condition"),
                         ((x, None, emb), "condition"), ((x, c, torch.zeros(1, 4, 3)), "text tokens")]:
        with pytest.raises(ConfigError, match=pattern):
            transformer_inputs(layout, bad[0], bad[1], t, bad[2], torch.float32)
    with pytest.raises(ConfigError, match="conditions_first"):
        token_layout(_ids(6, 0), [_ids(4, 10)], _ids(5, 0), condition_timestep=0.0)
    with pytest.raises(ConfigError, match="order"):
        token_layout(_ids(6, 0), [], _ids(5, 0), order="sideways")
    with pytest.raises(ConfigError, match="position ids"):
        token_layout(torch.zeros(6, 3), [], _ids(5, 0))


@pytest.mark.parametrize("refs", [0, 1, 2])
def test_both_orders_give_the_same_target_velocity(tiny_editor, refs):
    """Attention is permutation-equivariant given the position ids: the order only moves the target's slice."""
    img = random_image(64, 80, seed=refs)
    request = FrameRequest(img, "make it blue", tuple(random_image(64, 96, seed=9 + i) for i in range(refs)))
    with torch.inference_mode():
        plan = tiny_editor._prepare(request)
        first = plan.step_inputs(plan.latents, plan.timesteps[0], torch.float32)
        v_first = tiny_editor.transformer(**first)[0][:, plan.layout.target]
        lay = plan.layout
        groups = [lay.input, *lay.references]
        last = token_layout(lay.ids(lay.target), [lay.ids(g) for g in groups], lay.text_ids, order="conditions_first")
        inputs = transformer_inputs(last, plan.latents, plan.conditions, plan.timesteps[0].expand(1) / 1000,
                                    plan.emb.embeds, torch.float32)
        v_last = tiny_editor.transformer(**inputs)[0][:, last.target]
    assert first["hidden_states"].shape == inputs["hidden_states"].shape
    assert torch.equal(inputs["hidden_states"][:, last.target], first["hidden_states"][:, lay.target])
    assert (v_first - v_last).abs().max().item() <= 1e-5


def test_condition_timestep_modulates_only_the_condition_tokens(tiny_editor):
    """diffusers applies ref_fixed_timestep in its KV extract mode: the target sees the change only through
    attention, and the kwargs say how many leading tokens are conditions."""
    with torch.inference_mode():
        plan = tiny_editor._prepare(FrameRequest(random_image(64, 64), "make it blue"))
        lay = plan.layout
        outs = []
        for ct in (0.0, 0.7, 0.0):
            layout = token_layout(lay.ids(lay.target), [lay.ids(lay.input)], lay.text_ids, "conditions_first", ct)
            kwargs = transformer_inputs(layout, plan.latents, plan.conditions, torch.full((1,), 0.9),
                                        plan.emb.embeds, torch.float32)
            assert kwargs["num_ref_tokens"] == plan.conditions.shape[1] and kwargs["ref_fixed_timestep"] == ct
            out = tiny_editor.transformer(**kwargs, kv_cache_mode="extract")[0]  # extract mode returns X alone
            assert out.shape[1] == layout.target.stop - layout.target.start
            outs.append(out)
    # Random tiny weights modulate weakly, but deterministically: the same timestep reproduces the output bit for bit.
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("with_reference", [False, True])
def test_training_batch_and_serving_step_build_identical_inputs(tiny_editor, with_reference):
    """What trains is what serves: the teacher's flow_inputs for an example equal the editor's step inputs for the
    same source, reference, instruction, noise and timestep (the latents go in as the editor encodes them)."""
    source, reference, instruction = random_image(64, 64, seed=1), random_image(64, 64, seed=2), "make it blue"
    request = FrameRequest(source, instruction, (reference,) if with_reference else (), seed=5)
    with torch.inference_mode():
        plan = tiny_editor._prepare(request)
        served = plan.step_inputs(plan.latents, plan.timesteps[1], torch.float32)
        codec = tiny_editor.codec
        latents = [codec.encode(to_pixel_tensor(a, CPU, torch.float32)) for a in (source, reference)]
        embeds = tiny_editor.encode_prompt(instruction).embeds
    cache = {"source": latents[0], "target": latents[0], "reference": latents[1],
             "has_reference": torch.tensor([with_reference]), "instruction": torch.tensor([0]),
             "embeds": embeds, "families": ["palette" if with_reference else "grayscale"]}
    batch = FlowBatcher(cache, TeacherTaskConfig(data_dir="unused"), 1, 0, 0)(0)
    # The sampler's state at that step, not the training draw: the comparison is of how inputs are assembled.
    batch = {**batch, "noisy": plan.latents, "sigma": plan.timesteps[1].expand(1) / 1000}
    trained = flow_inputs(batch, CPU, torch.float32)
    assert set(trained) == set(served)
    for key, value in served.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(trained[key], value), key
        else:
            assert trained[key] == value, key
    assert batch["layout"] == dataclasses.replace(batch["layout"]) and batch["layout"].target == plan.layout.target
    np.testing.assert_array_equal(batch["layout"].img_ids.numpy(), plan.layout.img_ids.numpy())


def test_latent_id_cache_orders_references_as_the_pipeline():
    ids = LatentIdCache().references(((2, 2), (1, 3)), CPU)[0]
    assert ids[:4, 0].tolist() == [10] * 4 and ids[4:, 0].tolist() == [20] * 3
    assert pack(torch.arange(8.0).view(1, 2, 2, 2)).shape == (1, 4, 2)


def test_teacher_text_encoder_rounds_parameters_but_not_buffers():
    """The cache's embeddings must be those the exported folder gives: its weights are saved in export_dtype, its
    rotary buffer is rebuilt in the dtype it loads in, so only the parameters may be rounded."""
    from rtedit.train.tasks.teacher import build_text_encoder

    cfg = TeacherTaskConfig(data_dir="unused", te_hidden=16, te_layers=2, te_heads=2, te_taps=(1, 2),
                            export_dtype="bfloat16")
    encoder, _ = build_text_encoder(cfg)
    exact, _ = build_text_encoder(dataclasses.replace(cfg, export_dtype="float32"))
    for (name, p), (_, q) in zip(encoder.named_parameters(), exact.named_parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q.to(torch.bfloat16).float()), name
    buffers = dict(exact.named_buffers())
    for name, buf in encoder.named_buffers():
        assert torch.equal(buf, buffers[name]), name
    assert any(not torch.equal(p, q) for p, q in zip(encoder.parameters(), exact.parameters()))


def test_noise_cache_returns_the_seeds_noise_and_keeps_a_bounded_number():
    from rtedit.model.schedule import NoiseCache, initial_noise

    cache = NoiseCache(entries=2)
    shape = (1, 128, 4, 4)
    first = cache.get(7, shape, torch.float32, CPU)
    torch.testing.assert_close(first, initial_noise(7, shape, torch.float32, CPU), rtol=0, atol=0)
    assert cache.get(7, shape, torch.float32, CPU) is first  # a stream's frames share it
    cache.get(8, shape, torch.float32, CPU)
    cache.get(9, shape, torch.float32, CPU)  # evicts seed 7, the least recently used
    assert cache.stats() == {"entries": 2, "hits": 1, "misses": 3}
    assert cache.get(7, shape, torch.float32, CPU) is not first
