#!/usr/bin/env bash
# The alignment ablation on the real demo model (Gemma-3-270M, Bible en<->sw/tl/hi, the demo's data and seed):
# stage 1 only, evaluated on held-out Mark (retrieval at every layer, perplexity; no translation), each variant
# against the same base evaluation (examples/demo/base.json: same model, data, seed and pairs).
#
#   bash examples/ablation/run.sh [variant ...]      # default: every variant below, one after the other
#   python -m examples.ablation.summarize             # the table (examples/ablation/README.md)
#
# One variant takes 12-16 min on 2 cores at 170-190 GFLOP/s (40 min at 65 GFLOP/s). Logs and results:
# runs/ablation/<variant>/ (eval/stage1.json,
# train/stage1/metrics.jsonl); copy the two files under examples/ablation/<variant>/ to commit them.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# Every variant spells out all its alignment settings: the demo's defaults (whiten, per language, direction batches,
# auto layer, lr 7e-5) changed after the early rows were measured, and a variant must not follow them silently.
DEMO="--similarity whiten --per-language --batching direction --align-layer auto"
declare -A FLAGS=(
  [reference]="--reference --lr 3e-5"
  [reference_auto]="--similarity cosine --no-per-language --batching mixed --align-layer auto --lr 3e-5"
  [center_batch]="--similarity center --no-per-language --batching mixed --align-layer 9 --lr 3e-5"
  [whiten_mixed_l9]="--similarity whiten --no-per-language --batching mixed --align-layer 9 --lr 3e-5"
  [whiten_pl_dir_auto]="$DEMO --lr 3e-5"
  [whiten_pl_dir_l9]="--similarity whiten --per-language --batching direction --align-layer 9 --lr 3e-5"
  [whiten_pl_dir_auto_response]="$DEMO --labels response --lr 3e-5"
  [whiten_pl_dir_auto_80steps]="$DEMO --steps 80 --lr 3e-5"
  [whiten_pl_dir_auto_lr6e-5]="$DEMO --lr 6e-5"
  [whiten_pl_dir_auto_lr7e-5]="$DEMO --lr 7e-5"
  [whiten_pl_dir_auto_lr8e-5]="$DEMO --lr 8e-5"
  [whiten_pl_dir_auto_queue]="$DEMO --lr 3e-5 --set objective.negatives=global+queue --set objective.queue_size=256"
  # each ingredient's share at the demo's default lr (compare with whiten_pl_dir_auto_lr7e-5 = the demo's stage 1)
  [whiten_pl_mixed_auto]="--similarity whiten --per-language --batching mixed --align-layer auto --lr 7e-5"
  [whiten_dir_auto]="--similarity whiten --no-per-language --batching direction --align-layer auto --lr 7e-5"
  [standardize_pl_dir_auto]="--similarity standardize --per-language --batching direction --align-layer auto --lr 7e-5"
  [reference_lr7e-5]="--reference --lr 7e-5"
)
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(whiten_pl_mixed_auto whiten_dir_auto standardize_pl_dir_auto reference_lr7e-5 \
  reference_auto whiten_pl_dir_auto_response)
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
