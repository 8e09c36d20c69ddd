#!/usr/bin/env bash
# temporary: f16-activation kernel and decode benches, f16 tests on the lent GPU
export XDG_RUNTIME_DIR=/tmp
nvidia-smi --query-gpu=name --format=csv > "$OUT/card.txt" 2>&1
timeout 100 deno test -A --filter f16 tests/kernels/ tests/models/ > "$OUT/gpu-f16-tests.log" 2>&1
echo "tests rc $?" >> "$OUT/gpu-f16-tests.log"; grep -E "passed|FAILED|rc " "$OUT/gpu-f16-tests.log" | tail -5
DECODE_BENCH_COMPARE=act DECODE_BENCH_MODELS=tinyllama-1.1B,smollm2-135M,gpt2-124M PROMPTGATE_BENCH_FULL=1 \
  timeout 200 deno run -A bench/decode_bench.ts > "$OUT/decode-act.log" 2>&1
tail -8 "$OUT/decode-act.log"
PROMPTGATE_BENCH_FULL=1 timeout 120 deno bench -A bench/attention_bench.ts > "$OUT/attention.log" 2>&1
PROMPTGATE_BENCH_FULL=1 timeout 100 deno bench -A bench/elementwise_bench.ts > "$OUT/elementwise.log" 2>&1
grep -E "f16|fwd B|bwd B" "$OUT/attention.log" | head -30
