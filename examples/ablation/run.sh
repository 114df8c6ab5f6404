#!/usr/bin/env bash
# The alignment ablation on the real demo model (Gemma-3-270M, Bible en<->sw/tl/hi, the demo's data and seed):
# stage 1 only, evaluated on held-out Mark (retrieval at every layer, perplexity; no translation), each variant
# against the same base evaluation (examples/demo/base.json: same model, data, seed and pairs).
#
#   bash examples/ablation/run.sh [variant ...]      # default: every variant below, one after the other
#   python -m examples.ablation.summarize             # the table (examples/ablation/README.md)
#
# One variant takes 12-16 min on 2 cores at 190 GFLOP/s (40 min where the same 2 cores reach 65 GFLOP/s). Logs and results: runs/ablation/<variant>/ (eval/stage1.json,
# train/stage1/metrics.jsonl); copy the two files under examples/ablation/<variant>/ to commit them.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
declare -A FLAGS=(
  [reference]=""
  [reference_auto]="--align-layer auto"
  [center_batch]="--similarity center"
  [whiten_mixed_l9]="--similarity whiten"
  [whiten_pl_mixed_auto]="--similarity whiten --per-language --align-layer auto"
  [whiten_pl_dir_auto]="--similarity whiten --per-language --batching direction --align-layer auto"
  [whiten_pl_dir_l9]="--similarity whiten --per-language --batching direction"
  [whiten_dir_auto]="--similarity whiten --batching direction --align-layer auto"
  [standardize_pl_dir_auto]="--similarity standardize --per-language --batching direction --align-layer auto"
  [whiten_pl_dir_auto_response]="--similarity whiten --per-language --batching direction --align-layer auto --labels response"
  [whiten_pl_dir_auto_80steps]="--similarity whiten --per-language --batching direction --align-layer auto --steps 80"
  [whiten_pl_dir_auto_lr6e-5]="--similarity whiten --per-language --batching direction --align-layer auto --lr 6e-5"
  [whiten_pl_dir_auto_lr8e-5]="--similarity whiten --per-language --batching direction --align-layer auto --lr 8e-5"
  [whiten_pl_dir_auto_queue]="--similarity whiten --per-language --batching direction --align-layer auto --set objective.negatives=global+queue --set objective.queue_size=256"
)
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(whiten_pl_dir_auto whiten_pl_mixed_auto whiten_pl_dir_l9 whiten_dir_auto \
  standardize_pl_dir_auto reference_auto whiten_pl_dir_auto_response)
for v in "${variants[@]}"; do
  out=runs/ablation/$v
  rm -rf "$out"; mkdir -p "$out"
  echo "[ablation] $v: ${FLAGS[$v]} ($(date -u +%H:%M:%S))"
  # shellcheck disable=SC2086
  $PY -m alignx.cli demo --out "$out" --stages 1 --base-result examples/demo/base.json --translate-pairs 0 \
    ${FLAGS[$v]} ${EXTRA:-} > "$out/log.txt" 2>&1 || { echo "[ablation] $v failed: $out/log.txt"; continue; }
  mkdir -p "examples/ablation/$v"
  cp "$out/eval/stage1.json" "examples/ablation/$v/stage1.json"
  cp "$out/train/stage1/metrics.jsonl" "examples/ablation/$v/stage1_metrics.jsonl"
  grep -h "align_layer=auto\|warning" "$out/log.txt" > "examples/ablation/$v/notes.txt" || true
  echo "[ablation] $v done ($(date -u +%H:%M:%S))"
done
