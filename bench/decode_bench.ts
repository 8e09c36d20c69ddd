/**
 * Decode throughput at batch 1 (issue 8): random-weight models with the real shapes (gpt2-124M,
 * SmolLM2-135M, TinyLlama-1.1B), f32 and f16 weights, an adapter (length 10) on all layers with a
 * non-zero gate, prompt 128, 128 new tokens, greedy. "before" is the replayed decode step recorded with
 * the general layer forward (`decodeTuning.fused = false`: separate norm, RoPE, attention, adapter
 * attention and add dispatches), "after" the fused decode layers (the default), measured one after the
 * other on one card. `DECODE_BENCH_COMPARE=act` compares instead f16 weights with f32 activations
 * ("before", `activationTuning.f16 = false`) and f16 activations with an f16 KV cache ("after"), both
 * fused, f16 rows only (the greedy tokens may then differ by f16 rounding):
 *
 * | column | what |
 * | --- | --- |
 * | `tok/s` | `generate` with one readback (chunk = new tokens): new tokens / wall time, prefill included; best of 3 |
 * | `stream tok/s` | `generate` with chunk 16 (streaming granularity); best of 2 |
 * | `ttft ms` | `generate` with one new token: prefill, sampling and the readback; median of 3 |
 * | `step GPU ms` | GPU time of one replayed step attending over all L = 256 cache positions (timestamp queries over 32 steps in one pass), before / after |
 * | `step host ms` | host time to encode and submit one replayed step (128 steps in one command buffer), after |
 *
 * `PROMPTGATE_DECODE_NR=1|2|4` caps the output rows per thread group of the fused matrix-vector products
 * (`decodeMatvecTuning.rowsPerGroup` in kernels/decode_matvec.ts), for a comparison between calls.
 *
 * Full shapes run on a real GPU (`PROMPTGATE_BENCH_FULL=1` forces them, `=0` gives a 2-layer gpt2 with
 * prompt 16 and 16 new tokens, the default on a fallback adapter). Greedy tokens of both paths are
 * checked equal.
 *
 * Run: `deno run -A bench/decode_bench.ts`
 *
 * @module
 */

import { addAdaptionPrompt } from "../src/adapters/manage.ts";
import { adapterReport, getGpu } from "../src/gpu/device.ts";
import { runOps } from "../src/gpu/recorder.ts";
import { profileOps, timeOps } from "../src/gpu/timing.ts";
import { decodePrefillOps, decodeStepOps, generate } from "../src/models/generate.ts";
import { activationTuning, decodeTuning } from "../src/models/transformer.ts";
import { decodeMatvecTuning } from "../kernels/decode_matvec.ts";
import { createRandomModel, modelConfigFor, type RandomModelName } from "../src/models/random.ts";
import type { Model } from "../src/models/model.ts";

const gpu = await getGpu();
const report = adapterReport(gpu);
const envFull = Deno.env.get("PROMPTGATE_BENCH_FULL");
const full = envFull === undefined ? !report.isFallbackAdapter : envFull === "1";
const PROMPT = full ? 128 : 16, NEW = full ? 128 : 16;
const names: RandomModelName[] = full ? ["tinyllama-1.1B", "smollm2-135M", "gpt2-124M"] : ["gpt2-124M"];
const dtypes: ("f32" | "f16")[] = gpu.hasF16 ? ["f16", "f32"] : ["f32"];
const only = Deno.env.get("DECODE_BENCH_MODELS")?.split(",");
// DECODE_BENCH_COMPARE=act: before = f16 weights with f32 activations, after = f16 activations (f16 rows only)
const compareActivations = Deno.env.get("DECODE_BENCH_COMPARE") === "act";
const nr = Deno.env.get("PROMPTGATE_DECODE_NR");
if (nr === "1" || nr === "2" || nr === "4") decodeMatvecTuning.rowsPerGroup = Number(nr) as 1 | 2 | 4;
console.log(
  `# decode bench: ${report.description}; prompt ${PROMPT}, ${NEW} new tokens, greedy, adapter on all layers`,
);

function median(x: number[]): number {
  const s = [...x].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

/** Sets the switches of the "before" (false) or "after" (true) side. */
function setSide(after: boolean): void {
  decodeTuning.fused = compareActivations || after;
  activationTuning.f16 = !compareActivations || after;
}

async function measure(model: Model, prompt: number[], after: boolean) {
  setSide(after);
  const replay = true;
  await generate(model, prompt, { maxNewTokens: 16, replay }); // warm-up: pipelines, bind groups, clocks
  await generate(model, prompt, { maxNewTokens: NEW, chunk: NEW, replay });
  const ttft: number[] = [];
  for (let i = 0; i < 3; i++) {
    const t = performance.now();
    await generate(model, prompt, { maxNewTokens: 1, replay });
    ttft.push(performance.now() - t);
  }
  let tokens: number[] = [];
  const rates: number[] = [];
  for (let i = 0; i < 3; i++) {
    const t = performance.now();
    tokens = await generate(model, prompt, { maxNewTokens: NEW, chunk: NEW, replay });
    rates.push(tokens.length / ((performance.now() - t) / 1000));
    if (tokens.length !== NEW) throw new Error(`generate gave ${tokens.length} of ${NEW} tokens`);
  }
  const stream: number[] = [];
  for (let i = 0; i < 2; i++) {
    const t = performance.now();
    await generate(model, prompt, { maxNewTokens: NEW, chunk: 16, replay });
    stream.push(NEW / ((performance.now() - t) / 1000));
  }
  return { ttft: median(ttft), tokS: Math.max(...rates), streamTokS: Math.max(...stream), tokens };
}

const rows: string[] = [];
for (const name of names) {
  if (only && !only.includes(name)) continue;
  for (const dtype of dtypes) {
    if (compareActivations && dtype !== "f16") continue;
    let config = modelConfigFor(name);
    if (!full) config = { ...config, numLayers: 2 };
    const t0 = performance.now();
    const model = await createRandomModel(config, { dtype, maxSeqLen: PROMPT + NEW, seed: 1 });
    addAdaptionPrompt(model, { adapterLen: 10, adapterLayers: config.numLayers, seed: 5 });
    const state = model.adapters.get(model.active!)!;
    // a non-zero gate so the adapter changes the output
    const gates = new Float32Array(1).fill(0.5);
    for (const s of state.slots) gpu.device.queue.writeBuffer(state.params.buffer, s.gateOffset * 4, gates);
    state.version++;
    let seed = 12345;
    const prompt = Array.from({ length: PROMPT }, () => {
      seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
      return seed % config.vocabSize;
    });
    console.error(`[${name} ${dtype}] model ready in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    const old = await measure(model, prompt, false);
    const oldStep = await timeOps(gpu, decodeStepOps(model, PROMPT, NEW), 32);
    const oldDispatches = decodeStepOps(model, PROMPT, NEW).filter((o) => o.kind === "dispatch").length;
    const now = await measure(model, prompt, true);
    const same = old.tokens.every((t, i) => t === now.tokens[i]);
    if (!same) {
      console.error(
        `[${name} ${dtype}] TOKENS DIFFER: ${old.tokens.slice(0, 8)} vs ${now.tokens.slice(0, 8)}`,
      );
    }
    // one replayed step: GPU time and host encoding time
    const ops = decodeStepOps(model, PROMPT, NEW);
    const gpuStep = await timeOps(gpu, ops, 32);
    await gpu.device.queue.onSubmittedWorkDone();
    const all = Array.from({ length: 128 }, () => ops).flat();
    const h0 = performance.now();
    runOps(gpu, all);
    const hostMs = (performance.now() - h0) / 128;
    await gpu.device.queue.onSubmittedWorkDone();
    const dispatches = ops.filter((o) => o.kind === "dispatch").length;
    if (dtype === dtypes[0]) {
      // where one step's GPU time goes (one pass per dispatch: adds per-pass overhead), before and after
      for (const after of [false, true]) {
        setSide(after);
        const prof = await profileOps(gpu, decodeStepOps(model, PROMPT, NEW));
        const total = prof.reduce((a, r) => a + r.ms, 0);
        const side = compareActivations
          ? (after ? "f16 activations" : "f32 activations")
          : (after ? "fused" : "general");
        console.log(
          `profile of one step, ${name} ${dtype} ${side} (one pass per dispatch, sum ${
            total.toFixed(3)
          } ms):`,
        );
        for (const r of prof.slice(0, 14)) {
          console.log(`  ${r.label.padEnd(30)} ${String(r.count).padStart(4)}× ${r.ms.toFixed(3)} ms`);
        }
      }
      // where the time to first token goes: the prefill's GPU time and its profile
      setSide(true);
      const prefill = decodePrefillOps(model, PROMPT);
      const prefillGpu = await timeOps(gpu, prefill, 8);
      // matmuls by variant (tile, split), the rest by kernel
      const pprof = await profileOps(gpu, prefill, (l) => l.startsWith("matmul") ? l : l.split("|")[0]!);
      console.log(
        `prefill of ${PROMPT} tokens, ${name} ${dtype}: ${prefillGpu.ms.toFixed(3)} ms GPU in one pass, ${
          prefill.filter((o) => o.kind === "dispatch").length
        } dispatches; profile (one pass per dispatch, sum ${
          pprof.reduce((a, r) => a + r.ms, 0).toFixed(3)
        } ms):`,
      );
      for (const r of pprof.slice(0, 24)) {
        console.log(`  ${r.label.padEnd(30)} ${String(r.count).padStart(4)}× ${r.ms.toFixed(3)} ms`);
      }
    }
    const row = `| ${name} | ${dtype} | ${old.tokS.toFixed(0)} | ${now.tokS.toFixed(0)} | ${
      (now.tokS / old.tokS).toFixed(2)
    }× | ${old.streamTokS.toFixed(0)} / ${now.streamTokS.toFixed(0)} | ${old.ttft.toFixed(1)} / ${
      now.ttft.toFixed(1)
    } | ${oldStep.ms.toFixed(3)} / ${gpuStep.ms.toFixed(3)}${gpuStep.timestamps ? "" : " (wall)"} | ${
      hostMs.toFixed(3)
    } | ${oldDispatches} / ${dispatches} | ${same ? "yes" : "NO"} |`;
    console.log(row);
    rows.push(row);
  }
}
setSide(true);
console.log(
  `\nbefore / after: ${
    compareActivations
      ? "f16 weights with f32 activations / f16 activations"
      : "general layers / fused decode layers"
  }`,
);
console.log(
  `\n| model | dtype | tok/s before | tok/s after | speed-up | stream tok/s before / after | ttft ms before / after | step GPU ms before / after | step host ms | dispatches/step before / after | same tokens |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
${rows.join("\n")}`,
);
