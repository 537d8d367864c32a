"""The reward job: the shared runtime end to end (Ray Train + DeepSpeed on CPU, tiny Qwen3.5), its export read by
EditReward.from_pretrained and jobs.eval_reward, the no-Ray path at ZeRO-3 (zero.Init, LoRA, optimizer offload),
and config errors that name the field."""

import json
import math
import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ray = pytest.importorskip("ray")

from jobs import eval_reward, make_reward_data, runtime, train_reward  # noqa: E402
from rtedit.errors import ConfigError  # noqa: E402
from rtedit.train.config import load_job_config  # noqa: E402
from rtedit.train.reward import EditReward  # noqa: E402
from rtedit.train.reward.pairs import read_reward_pairs, to_tensors  # noqa: E402
from rtedit.train.reward.task import RewardTaskConfig, evaluate_pairs  # noqa: E402
from rtedit.train.runtime import MetricsLog  # noqa: E402

CONFIG = runtime.REPO_ROOT / "jobs" / "configs" / "reward_toy.yaml"
TINY = "task.tiny={hidden: 32, layers: 2, heads: 2, vision_depth: 1, vision_hidden: 32}"


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("reward-pairs")
    make_reward_data.main(["--out", str(out), "--n", "5", "--eval-n", "3", "--seed", "0"])
    return out


def _overrides(tmp_path, pairs_dir, *extra):
    return [f"run.storage_path={tmp_path / 'runs'}", "run.max_steps=3", "run.batch_size=2", "run.checkpoint_every=3",
            "run.log_every=1", "run.timeout_s=300", "optimizer.warmup_steps=1", f"task.data_dir={pairs_dir}",
            "task.eval_every=2", "task.eval_pairs=6", TINY, *extra]


def test_manifest_counts_every_kind(pairs_dir):
    manifest = json.loads((pairs_dir / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert train["examples"] == 5 and set(train["by_kind_label"]) >= {"wrong", "partial", "degraded", "mix"}
    assert sum(sum(v.values()) for v in train["by_kind_label"].values()) == train["pairs"]


@pytest.mark.slow
def test_reward_job_trains_on_the_shared_runtime_and_exports(tmp_path, pairs_dir):
    config = load_job_config(CONFIG, _overrides(tmp_path, pairs_dir))
    train_reward.prepare(config)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False)
    try:
        result = runtime.run(config, train_reward.TASK)
    finally:
        ray.shutdown()
    rows = MetricsLog.read_csv(result.metrics_csv).rows
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and result.metrics_png.is_file()
    assert all(math.isfinite(r["loss"]) and r["data/bad_train_rows"] == 0 for r in rows)
    assert math.isnan(rows[0]["eval/accuracy"]) and all(0 <= rows[i]["eval/accuracy"] <= 1 for i in (1, 2))
    assert any(k.startswith("eval/accuracy/") for k in rows[-1])
    model = EditReward.from_pretrained(result.export_dir)
    record = json.loads((result.export_dir / "training_config.json").read_text())
    assert record["task"]["head"] == "pairwise" and record["data_report"]["bad"] == 0
    eval_rows, report = read_reward_pairs(pairs_dir / "eval")
    pairs = to_tensors(eval_rows[::max(1, len(eval_rows) // 6)][:6], report)
    mine = evaluate_pairs(model, pairs, record["task"]["tie_margin"], 2, torch.device("cpu"))
    assert mine["accuracy"] == pytest.approx(rows[-1]["eval/accuracy"], abs=1e-6)  # the exported weights are the run's
    out = eval_reward.main(["--model", str(result.export_dir), "--data", str(pairs_dir), "--pixel-test",
                            "--lrs", "0.01", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "e.json")])
    assert 0 <= out["accuracy"] <= 1 and out["bad_rows"]["bad"] == 0 and "accuracy/wrong" in out
    assert out["pixel_test"]["lr"] == 0.01 and out["pixel_test"]["wrong_edits"]["examples"] >= 1
    assert json.loads((tmp_path / "e.json").read_text())["pairs"] == out["pairs"]


@pytest.mark.slow
def test_local_path_at_zero3_with_lora_and_offload(tmp_path, pairs_dir):
    config = load_job_config(CONFIG, _overrides(tmp_path, pairs_dir, "run.max_steps=2", "deepspeed.zero_stage=3",
                                                "task.lora={r: 4, alpha: 8.0}", "task.offload_optimizer=true",
                                                "task.head=pointwise"))
    train_reward.prepare(config)
    result = train_reward.local(config, export=tmp_path / "export")
    assert result["zero_stage"] == 3 and result["offload_optimizer"] and len(result["losses"]) == 2
    assert 0 < result["trainable_parameters"] < result["parameters"] / 100
    model = EditReward.from_pretrained(tmp_path / "export")
    assert model.config.head == "pointwise" and model.config.lora == {"r": 4, "alpha": 8.0}
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained away from zero, and saved whole


def test_config_errors_name_the_field(tmp_path, pairs_dir):
    for override, match in (("task.head=triplet", "task.head"), ("task.tie_margin=-1", "task.tie_margin"),
                            ("task.kind_weights={sideways: 2}", "task.kind_weights"),
                            ("task.lora={rank: 4}", "lora"), ("task.backbone=/nowhere", "task.backbone")):
        config = load_job_config(CONFIG, _overrides(tmp_path, pairs_dir, override))
        with pytest.raises(ConfigError, match=match):
            config.task_config(RewardTaskConfig)
    config = load_job_config(CONFIG, _overrides(tmp_path, pairs_dir, "task.offload_optimizer=true"))
    with pytest.raises(ConfigError, match="--local"):
        train_reward.build_task(type("Ctx", (), {"config": config})())
    config = load_job_config(CONFIG, _overrides(tmp_path, tmp_path / "empty"))
    with pytest.raises(ConfigError, match="make_reward_data"):
        train_reward.prepare(config)
