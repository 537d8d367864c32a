"""The causal distillation job: the teacher's cache, the attention hooks and loss slices, the terms switched off,
config errors, and one tiny end-to-end run through Ray Train + DeepSpeed that exports a served causal folder.

The teacher is a tiny transformer exported by the toy teacher's export_model (with its training_config.json), its
modulation weights sharpened so attention, and so any mask, visibly moves the outputs.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ray = pytest.importorskip("ray")

from conftest import random_image  # noqa: E402
from diffusers import Flux2Transformer2DModel  # noqa: E402
from jobs import distill, make_toy_data, runtime  # noqa: E402
from jobs.runtime import WorkerContext  # noqa: E402
from rtedit.config import EditorConfig  # noqa: E402
from rtedit.editor import Editor  # noqa: E402
from rtedit.errors import ConfigError  # noqa: E402
from rtedit.train.config import load_job_config  # noqa: E402
from rtedit.train.runtime import MetricsLog  # noqa: E402
from rtedit.train.tasks import distill as task  # noqa: E402
from rtedit.train.tasks import teacher  # noqa: E402

CONFIG = runtime.REPO_ROOT / "jobs" / "configs" / "distill_toy.yaml"
TOY_EDITOR = runtime.REPO_ROOT / "models" / "toy-editor"
CPU, F32 = torch.device("cpu"), torch.float32
TINY = dict(te_hidden=16, te_layers=2, te_heads=2, te_taps=(1, 2), num_layers=2, num_single_layers=2, num_heads=2,
            head_dim=16, export_dtype="float32")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy_data.main(["--out", str(out), "--n", "24", "--seed", "0", "--eval-n", "2"])
    return out


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, toy_data):
    """A tiny full-attention teacher folder, as jobs.train_teacher exports one (training_config.json included)."""
    cfg = teacher.TeacherTaskConfig(data_dir=str(toy_data), **TINY)
    torch.manual_seed(0)
    model = teacher.build_transformer(cfg)
    with torch.no_grad():  # default init leaves the modulation gates near 0: attention would barely matter
        for name, p in model.named_parameters():
            if "modulation" in name or "time_guidance_embed" in name:
                p.mul_(3.0)
    return teacher.export_model(model, cfg, tmp_path_factory.mktemp("teacher") / "tiny-teacher",
                                job_config={"task": teacher.task_dict(cfg)}, native_size=128)


def _cfg(tiny_teacher, toy_data, taef2_weights, **kw) -> task.DistillTaskConfig:
    return task.DistillTaskConfig(teacher=str(tiny_teacher), data_dir=str(toy_data), taef2_dir=str(taef2_weights),
                                  encode_device="cpu", **kw)


@pytest.fixture(scope="module")
def cache(tiny_teacher, toy_data, taef2_weights):
    data = task.cache_config(_cfg(tiny_teacher, toy_data, taef2_weights))
    return data, teacher.load_cache(teacher.build_cache(data, "train"))  # the toy teacher's own embeddings


def _batch(cache, index=0, size=3, with_reference=None):
    data, cached = cache
    batches = teacher.FlowBatcher(cached, data, size, 0, 0)
    for i in range(index, index + 50):
        batch = batches(i)
        if with_reference is None or (len(batch["layout"].references) > 0) == with_reference:
            return batch
    raise AssertionError("no batch of that kind")


# ---- config and cache --------------------------------------------------------------------------------------------
def test_config_errors_name_the_field(tmp_path, tiny_teacher, toy_data, taef2_weights):
    base = _cfg(tiny_teacher, toy_data, taef2_weights)
    base.validate()
    for bad, field in ((dict(mode="causal"), "task.mode"), (dict(output_weight=-1.0), "task.output_weight"),
                       (dict(attention_weight=-0.5), "task.attention_weight"),
                       (dict(condition_timestep=1.5), "task.condition_timestep")):
        with pytest.raises(ConfigError, match=field):
            dataclasses.replace(base, **bad).validate()
    with pytest.raises(ConfigError, match="task.output_weight and task.attention_weight are both 0"):
        dataclasses.replace(base, output_weight=0.0, attention_weight=0.0).validate()
    # Through the job YAML and its parser, as the driver reads it.
    for override, field in (("task.mode=full", "task.mode"), ("task.attention_weight=-1", "task.attention_weight")):
        config = load_job_config(CONFIG, [override])
        with pytest.raises(ConfigError, match=field):
            config.task_config(task.DistillTaskConfig)
    # A folder without its training config, and a causal folder, are no teachers.
    bare = tmp_path / "bare"
    (bare / "transformer").mkdir(parents=True)
    with pytest.raises(ConfigError, match="task.teacher: .* has no training_config.json"):
        task.cache_config(dataclasses.replace(base, teacher=str(bare)))
    (bare / "rtedit.json").write_text(json.dumps({"causal": "kv", "condition_timestep": 0.0}))
    with pytest.raises(ConfigError, match="task.teacher: .* is a causal model"):
        task.load_teacher(bare)


@pytest.mark.parametrize("which", ["tiny", "toy-editor"])
def test_instruction_embeddings_are_the_teacher_folders_text_encoder(which, tiny_teacher, toy_data, taef2_weights,
                                                                     cache):
    """The cache is the one the folder's training_config.json describes (the toy editor's encoder settings), and
    the embeddings trained on are exactly what the folder's text encoder gives when served (the editor's)."""
    folder = tiny_teacher if which == "tiny" else TOY_EDITOR
    cfg = _cfg(folder, toy_data, taef2_weights)
    data = task.cache_config(cfg)
    if which == "toy-editor":
        assert (data.te_hidden, data.te_layers, data.te_taps, data.focus_steps) == (32, 3, (1, 2, 3), (2,))
        teacher.build_cache(data, "train")
    cached = task.load_distill_cache(cfg, data)
    editor = Editor.from_config(EditorConfig(model=str(folder), device="cpu", taef2_dir=str(taef2_weights)))
    for i in (0, len(cached["instructions"]) - 1):
        torch.testing.assert_close(editor.encode_prompt(cached["instructions"][i]).embeds[0].float(),
                                   cached["embeds"][i], rtol=0, atol=0)
    if which == "tiny":  # a float32 teacher: the toy teacher's own cache already holds exactly these
        torch.testing.assert_close(cache[1]["embeds"], cached["embeds"], rtol=0, atol=0)


# ---- hooks and losses --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_reference", [False, True])
def test_hooks_collect_x_attention_and_the_loss_is_zero_only_without_a_mask(cache, tiny_teacher, toy_data,
                                                                            taef2_weights, with_reference):
    cfg = _cfg(tiny_teacher, toy_data, taef2_weights)
    batch = _batch(cache, with_reference=with_reference)
    lay = batch["layout"]
    model = task.load_teacher(tiny_teacher).eval()
    tap = task.AttentionTap(model)
    targets = task.teacher_targets(model, tap, batch, CPU, F32)
    n_x, dim = lay.target.stop - lay.target.start, TINY["num_heads"] * TINY["head_dim"]
    assert len(targets.attention) == TINY["num_layers"] + TINY["num_single_layers"]
    assert all(a.shape == (3, n_x, dim) for a in targets.attention)
    assert targets.velocity.shape == (3, n_x, 128)
    # Double blocks: X's rows of the image stream of block.attn's output. Single blocks: X's rows (after T) of the
    # first inner_dim channels of to_out's input, i.e. the attention half of [attention, MLP].
    seen = {}
    hooks = [model.transformer_blocks[0].attn.register_forward_hook(lambda m, a, o: seen.update(double=o[0])),
             model.single_transformer_blocks[0].attn.to_out.register_forward_pre_hook(
                 lambda m, a: seen.update(single=a[0]))]
    again = task.teacher_targets(model, tap, batch, CPU, F32)
    for h in hooks:
        h.remove()
    assert torch.equal(again.attention[0], seen["double"][:, lay.target])
    x = slice(lay.text_tokens + lay.target.start, lay.text_tokens + lay.target.stop)
    assert torch.equal(again.attention[TINY["num_layers"]], seen["single"][:, x, :dim])
    assert seen["single"].shape[-1] > dim  # the MLP half is left out

    for mode in ("session", "kv"):
        student = task.build_student(model, dataclasses.replace(cfg, mode=mode))
        s = student.transformer
        assert task.hook_count(s) == len(targets.attention)  # its own tap only: none of the teacher's came along
        # The same weights under full attention (the causal processors without their arguments): 0, bit for bit,
        # in the teacher's order; float rounding only with the conditions first (the slices moved, not the tokens).
        same = task.distill_losses(s, None, lay, batch, targets, student.tap, 1.0, 1.0, CPU, F32)[1]
        assert float(same["loss/attention"]) == 0.0 and float(same["loss/output"]) == 0.0
        moved = task.distill_losses(s, None, task.student_layout(lay, None), batch, targets, student.tap, 1.0, 1.0,
                                    CPU, F32)[1]
        masked = task.distill_losses(s, mode, task.student_layout(lay, 0.0), batch, targets, student.tap, 1.0, 1.0,
                                     CPU, F32)[1]
        scale = float(torch.stack([a.pow(2).mean() for a in targets.attention]).mean())
        assert float(moved["loss/attention"]) < 1e-10 * scale and float(moved["loss/output"]) < 1e-10
        assert float(masked["loss/attention"]) > 1e-4 * scale and float(masked["loss/output"]) > 0, (mode, masked)


class _Engine:
    """DeepSpeed's engine interface as DistillTask.train_step uses it (forward, backward, step), on one process."""

    def __init__(self, module):
        self.module, self.opt = module, torch.optim.SGD(module.parameters(), lr=1e-3)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()


def _context(tmp_path, tiny_teacher, toy_data, taef2_weights, *extra):
    config = load_job_config(CONFIG, [
        f"run.storage_path={tmp_path / 'runs'}", "run.batch_size=2", "scaling.use_gpu=false",
        f"task.teacher={tiny_teacher}", f"task.data_dir={toy_data}", f"task.taef2_dir={taef2_weights}",
        "task.encode_device=cpu", *extra])
    return WorkerContext(config, 0, 1, 0, CPU, "fp32", F32)


def test_each_term_switches_off(tmp_path, cache, tiny_teacher, toy_data, taef2_weights):
    """attention_weight 0: no hooks on either model, no loss/attention; output_weight 0: the total is the attention
    term alone (loss/output is still logged)."""
    no_attention = distill.DistillTask(_context(tmp_path, tiny_teacher, toy_data, taef2_weights,
                                                "task.attention_weight=0"))
    assert no_attention.student.tap is None and no_attention.teacher_tap is None
    assert task.hook_count(no_attention.student) == 0 and task.hook_count(no_attention.teacher) == 0
    logs = no_attention.train_step({"student": _Engine(no_attention.student), "teacher": no_attention.teacher}, 0)
    assert set(logs) == {"loss", "loss/output"} and float(logs["loss"]) == float(logs["loss/output"])

    both = distill.DistillTask(_context(tmp_path, tiny_teacher, toy_data, taef2_weights))
    layers = TINY["num_layers"] + TINY["num_single_layers"]
    assert task.hook_count(both.student) == layers and task.hook_count(both.teacher) == layers
    logs = both.train_step({"student": _Engine(both.student), "teacher": both.teacher}, 0)
    assert set(logs) == {"loss", "loss/output", "loss/attention"}
    assert float(logs["loss"]) == pytest.approx(float(logs["loss/output"]) + float(logs["loss/attention"]), rel=1e-6)

    only_attention = distill.DistillTask(_context(tmp_path, tiny_teacher, toy_data, taef2_weights,
                                                  "task.output_weight=0", "task.attention_weight=2.5"))
    logs = only_attention.train_step({"student": _Engine(only_attention.student), "teacher": only_attention.teacher},
                                     0)
    assert float(logs["loss"]) == pytest.approx(2.5 * float(logs["loss/attention"]), rel=1e-6)
    assert float(logs["loss/output"]) > 0


def test_gradient_checkpointing_gives_the_same_gradients(cache, tiny_teacher, toy_data, taef2_weights):
    """Checkpointing recomputes blocks in backward, calling the hooks again: they must not collect then."""
    batch = _batch(cache, with_reference=True)
    model = task.load_teacher(tiny_teacher).eval()
    targets = task.teacher_targets(model, task.AttentionTap(model), batch, CPU, F32)
    grads = []
    for checkpointing in (False, True):
        cfg = _cfg(tiny_teacher, toy_data, taef2_weights, mode="session", gradient_checkpointing=checkpointing)
        student = task.build_student(model, cfg)
        loss, _ = student(batch, targets, task.student_layout(batch["layout"], 0.0), CPU, F32)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    assert student.transformer.gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


# ---- the job, end to end -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_distill_job_trains_and_exports_a_served_causal_folder(tmp_path, cache, tiny_teacher, toy_data,
                                                               taef2_weights):
    config = load_job_config(CONFIG, [
        f"run.storage_path={tmp_path / 'runs'}", "run.max_steps=4", "run.batch_size=4", "run.checkpoint_every=4",
        "run.log_every=1", "run.timeout_s=300", "optimizer.warmup_steps=1", "scaling.use_gpu=false",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1", f"task.teacher={tiny_teacher}",
        f"task.data_dir={toy_data}", f"task.taef2_dir={taef2_weights}", "task.encode_device=cpu",
        "task.mode=session", "task.condition_timestep=0.25"])
    distill.prepare(config)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False)
    try:
        result = runtime.run(config, distill.TASK)
    finally:
        ray.shutdown()
    assert result.metrics["step"] == 4
    rows = MetricsLog.read_csv(result.metrics_csv).rows
    assert len(rows) == 4 and result.metrics_png.is_file()
    for key in ("loss", "loss/output", "loss/attention", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in rows), key
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss/output"] + r["loss/attention"], rel=1e-5)
    folder = result.export_dir
    sidecar = json.loads((folder / "rtedit.json").read_text())
    teacher_sidecar = json.loads((tiny_teacher / "rtedit.json").read_text())
    assert sidecar["causal"] == "session" and sidecar["condition_timestep"] == 0.25
    assert {k: v for k, v in sidecar.items() if k not in ("name", "description", "causal", "condition_timestep")} == \
        {k: v for k, v in teacher_sidecar.items() if k not in ("name", "description")}
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json", "rtedit.json", "scheduler", "text_encoder",
                                                        "training_config.json", "transformer", "vae"]
    record = json.loads((folder / "training_config.json").read_text())
    assert record["task"]["mode"] == "session" and record["teacher_training_config"]["task"]["num_layers"] == 2
    # The student moved away from the teacher, and is saved in the teacher's dtype.
    student = Flux2Transformer2DModel.from_pretrained(folder / "transformer")
    original = task.load_teacher(tiny_teacher)
    assert student.dtype == torch.float32
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), original.state_dict().values()))
    _serves(folder, taef2_weights, student)


def _serves(folder, taef2_weights, student):
    """Editor.from_pretrained serves the folder in its own mode (5d71ad2), with the student's weights."""
    editor = Editor.from_config(EditorConfig(model=str(folder), device="cpu", taef2_dir=str(taef2_weights)))
    assert (editor.mode, editor.condition_timestep) == ("session", 0.25)
    served = editor.transformer.state_dict()
    assert all(torch.equal(served[k].float(), v) for k, v in student.state_dict().items())
    out = editor.edit(random_image(128, 128), "invert it", steps=2, seed=0)
    assert out.array.shape == (128, 128, 3) and np.isfinite(out.array).all()
