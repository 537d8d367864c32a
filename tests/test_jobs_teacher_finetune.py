"""Fine-tuning the toy teacher from a served folder (task.init_from) in --local mode (no Ray): the run starts from
the folder's weights, refuses a folder of another architecture or text encoder, and exports a folder that keeps the
page's examples; eval_edit's per-wording, per-instruction, photo and drawn-probe checks on the export."""

import json
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from jobs import eval_edit, make_toy_data, runtime, train_teacher  # noqa: E402
from rtedit.config import EditorConfig  # noqa: E402
from rtedit.editor import Editor  # noqa: E402
from rtedit.errors import ConfigError  # noqa: E402
from rtedit.train.config import load_job_config  # noqa: E402
from rtedit.train.runtime import MetricsLog  # noqa: E402
from rtedit.train.tasks import teacher  # noqa: E402

CONFIG = runtime.REPO_ROOT / "jobs" / "configs" / "toy_teacher_finetune.yaml"
TINY = dict(te_hidden=16, te_layers=2, te_heads=2, te_taps=(1, 2), num_layers=1, num_single_layers=1, num_heads=2,
            head_dim=16, export_dtype="float32")
EXAMPLES = ["make it black and white", "make the circle blue", "add a yellow square at the top right"]


def _sets(values: dict) -> list[str]:
    return [f"task.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy2")
    make_toy_data.main(["--out", str(out), "--n", "24", "--seed", "0", "--eval-n", "6", "--world", "2"])
    return out


@pytest.fixture(scope="module")
def init_folder(tmp_path_factory, toy_data):
    """A tiny teacher export with weights no fresh build has (seed 7, scaled), and page examples in rtedit.json."""
    cfg = teacher.TeacherTaskConfig(data_dir=str(toy_data), **TINY)
    torch.manual_seed(7)
    model = teacher.build_transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    folder = teacher.export_model(model, cfg, tmp_path_factory.mktemp("init") / "tiny-editor",
                                  job_config={"task": teacher.task_dict(cfg)}, native_size=128)
    sidecar = json.loads((folder / "rtedit.json").read_text())
    sidecar.update(name="tiny toy editor", examples=EXAMPLES, sizes=[[128, 128]])
    (folder / "rtedit.json").write_text(json.dumps(sidecar))
    return folder


def _config(tmp_path, toy_data, taef2_weights, init_folder, *extra):
    return load_job_config(CONFIG, [
        f"run.storage_path={tmp_path / 'runs'}", f"run.output_dir={tmp_path / 'out'}", "run.max_steps=2",
        "run.batch_size=2", "run.checkpoint_every=2", "run.log_every=1", "optimizer.warmup_steps=0",
        "scaling.use_gpu=false", f"task.data_dir={toy_data}", f"task.taef2_dir={taef2_weights}",
        "task.encode_device=cpu", f"task.init_from={init_folder}", "task.family_weights={}", *_sets(TINY), *extra])


def test_init_from_refuses_a_wrong_folder(tmp_path, toy_data, taef2_weights, init_folder):
    with pytest.raises(ConfigError, match="not a teacher folder"):
        train_teacher.prepare(_config(tmp_path, toy_data, taef2_weights, tmp_path / "nowhere"), local=True)
    with pytest.raises(ConfigError, match=r"transformer num_single_layers 1 \(this config builds 2\)"):
        train_teacher.prepare(_config(tmp_path, toy_data, taef2_weights, init_folder, "task.num_single_layers=2"))
    with pytest.raises(ConfigError, match="text encoder"):
        train_teacher.prepare(_config(tmp_path, toy_data, taef2_weights, init_folder, "task.te_seed=3"))
    with pytest.raises(ConfigError, match="task.init_from"):
        load_job_config(CONFIG, ["task.init_from=''"]).task_config(teacher.TeacherTaskConfig)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a GPU"):  # --local never falls back to a Ray task
            train_teacher.main(["--local", "--config", str(CONFIG), f"--set=task.data_dir={toy_data}",
                                f"--set=task.init_from={init_folder}", *[f"--set={s}" for s in _sets(TINY)],
                                "--set=task.family_weights={}"])


def test_local_fine_tune_starts_from_the_folder_and_exports(tmp_path, toy_data, taef2_weights, init_folder,
                                                             one_thread):
    config = _config(tmp_path, toy_data, taef2_weights, init_folder)
    train_teacher.prepare(config, local=True)
    saved = teacher.load_init_transformer(teacher.build_transformer(config.task_config(teacher.TeacherTaskConfig)),
                                          config.task_config(teacher.TeacherTaskConfig)).state_dict()
    task = train_teacher.build_task(runtime.local_worker_context(config))
    start = task.model.state_dict()
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in saved)
    fresh = teacher.build_transformer(config.task_config(teacher.TeacherTaskConfig)).state_dict()
    assert not all(torch.equal(fresh[k], saved[k]) for k in saved)
    # The run's first loss is the folder's model's loss on batch 0: training began from those weights.
    with torch.no_grad():
        first_loss = float(teacher.flow_loss(task.model, task.batch(0), torch.device("cpu"), torch.float32))
    result = runtime.run_local(config, train_teacher.TASK)
    assert result["start"] == 0 and result["steps"] == 2
    rows = MetricsLog.read_csv(result["metrics_csv"]).rows
    assert rows[0]["loss"] == pytest.approx(first_loss, rel=1e-4)
    export = tmp_path / "out" / "export"
    assert result["export"] == str(export)
    sidecar = json.loads((export / "rtedit.json").read_text())
    assert sidecar["examples"] == EXAMPLES and sidecar["name"] == "tiny toy editor" and sidecar["native_size"] == 128
    assert json.loads((export / "training_config.json").read_text())["task"]["init_from"] == str(init_folder)
    editor = Editor.from_config(EditorConfig(model=str(export), device="cpu", taef2_dir=str(taef2_weights)))
    trained = editor.transformer.state_dict()
    assert any(not torch.equal(trained[k].float(), saved[k]) for k in saved)  # two steps moved the weights

    # eval_edit on the export: per template, per instruction (toy scenes, whole photos) and the drawn probes.
    out = tmp_path / "eval.json"
    report = eval_edit.main(["--model", str(export), "--data", str(toy_data), "--steps", "1", "--limit", "6",
                             "--device", "cpu", "--taef2-dir", str(taef2_weights), "--cases", "1",
                             "--photos", "chelsea", "--grid", str(tmp_path / "grid.png"), "--out", str(out)])
    assert json.loads(out.read_text())["instructions"].keys() == report["instructions"].keys()
    checks = report["instructions"]
    assert list(checks) == EXAMPLES + ["make it grayscale", "make the red circle blue", "remove the red circle"]
    for text, row in checks.items():
        assert row["family"] and row["toy"]["n"] == 1 and 0 <= row["accuracy"] <= 1, text
        assert row["photos"]["n"] == 1
    assert set(report["drawn"]) == {"filled red circle", "outlined red circle", "hand-drawn red circle"}
    assert {"make the red circle blue", "remove the red circle", "make it grayscale"} <= set(
        report["drawn"]["filled red circle"])
    assert sum(t["n"] for f in report["by_template"].values() for t in f.values()) == 6
    assert 0 <= report["instruction_checks"]["accuracy"] <= 1 and "all_right" in report["instruction_checks"]


def test_local_time_budget_lowers_max_steps_after_the_warmup(tmp_path, toy_data, taef2_weights, init_folder,
                                                             one_thread):
    assert runtime.fit_steps(1000, 20, 2.0, 0.1, 12.0) == 120
    assert runtime.fit_steps(100, 20, 2.0, 0.1, 60.0) == 100 and runtime.fit_steps(100, 20, 9.0, 0.1, 5.0) == 21
    config = _config(tmp_path, toy_data, taef2_weights, init_folder, "run.max_steps=40", "run.checkpoint_every=100")
    train_teacher.prepare(config, local=True)
    result = runtime.run_local(config, train_teacher.TASK, max_train_s=1e-3)  # fits nothing past step 20
    assert result["steps"] == 21 and config.run.max_steps == 21
    assert json.loads((tmp_path / "out" / "export" / "training_config.json").read_text())["run"]["max_steps"] == 21
