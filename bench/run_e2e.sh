#!/usr/bin/env bash
# The side-by-side benchmark of issue 8 in one command: HuggingFace PEFT (bench/peft_reference.py, PyTorch
# eager) and then promptgate (bench/e2e.ts) on the same GPU, merged into bench/results/e2e-<date>.json
# (rows { model, dtype, metric, ours, peft, ratio, unit, card }; f16 rows compare with PEFT bf16) and one
# printed table. On the GPU machine:
#
#   bash .device/enter.sh bash bench/run_e2e.sh "$OUT" [models] [dtypes]
#
# models: comma list from gpt2-124M,smollm2-135M,tinyllama-1.1B (default: all); dtypes: f32,f16 (default).
# Time: each side has a budget (seconds) it shares out over its cases, skipping what does not fit, and a
# hard timeout a little above it: PEFT_BUDGET_S (default 180), OURS_BUDGET_S (default 270); with setup
# the whole run stays under 9 minutes. E2E_ARGS passes extra options to bench/e2e.ts.
#
# Into OUT (6 files): e2e-<date>.json (merged), peft-rows.json, peft-details.json, ours-rows.json,
# ours-details.json (per-kernel profiles of one training step, GPU times, losses), run.log (everything printed).
set -uo pipefail
OUT=${1:?usage: bash bench/run_e2e.sh OUT_DIR [models] [dtypes]}
MODELS=${2:-gpt2-124M,smollm2-135M,tinyllama-1.1B}
DTYPES=${3:-f32,f16}
PEFT_BUDGET_S=${PEFT_BUDGET_S:-180}
OURS_BUDGET_S=${OURS_BUDGET_S:-270}
DATE=$(date -u +%F)
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT" bench/results
OUT=$(cd "$OUT" && pwd)
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
PEFT_DTYPES=${DTYPES//f16/bf16}
START=$(date +%s)
{
  echo "== PEFT reference: $MODELS, $PEFT_DTYPES, budget ${PEFT_BUDGET_S} s"
  timeout -k 5 $((PEFT_BUDGET_S + 30)) python3 bench/peft_reference.py --models "$MODELS" --dtypes "$PEFT_DTYPES" \
    --budget-s "$PEFT_BUDGET_S" --out "$OUT/peft-rows.json" --details-out "$OUT/peft-details.json" ||
    echo "!! peft_reference.py exited with code $?"
  echo "== promptgate: $MODELS, $DTYPES, budget ${OURS_BUDGET_S} s (after $(($(date +%s) - START)) s)"
  # shellcheck disable=SC2086 # E2E_ARGS is a list of options
  timeout -k 5 $((OURS_BUDGET_S + 40)) deno run -A bench/e2e.ts --models "$MODELS" --dtypes "$DTYPES" \
    --budget-s "$OURS_BUDGET_S" --out "$OUT/ours-rows.json" --details-out "$OUT/ours-details.json" ${E2E_ARGS:-} ||
    echo "!! e2e.ts exited with code $?"
  echo "== merged (after $(($(date +%s) - START)) s)"
  deno run -A bench/e2e.ts merge --ours "$OUT/ours-rows.json" --peft "$OUT/peft-rows.json" \
    --out "bench/results/e2e-$DATE.json"
  cp "bench/results/e2e-$DATE.json" "$OUT/"
  echo "== done in $(($(date +%s) - START)) s"
} 2>&1 | tee "$OUT/run.log"
