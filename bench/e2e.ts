/**
 * End-to-end benchmark of promptgate on random-weight models of real shapes (gpt2-124M, SmolLM2-135M,
 * TinyLlama-1.1B), the half of the side-by-side comparison with HuggingFace PEFT that runs here
 * (bench/peft_reference.py is the other; bench/run_e2e.sh runs both and merges). Per model, dtype and
 * adapter placement (all layers; the top 8, model suffix `-top8`) it measures:
 *
 * | metric | how |
 * | --- | --- |
 * | `train_tok_s` | AdamW steps at B×T submitted back to back with `stepAsync`, one readback per run of k steps; median over runs of the per-step wall time |
 * | `fwd_ms`, `fwd_base_ms` | forward with and without the adapter, logits written (not read), wall time of repeated submissions ending in `onSubmittedWorkDone`; the adapter's keys/values computed once before (per adapter version, as `forward()` does; PEFT recomputes them every call) |
 * | `adapter_overhead` | `fwd_ms / fwd_base_ms` |
 * | `peak_gib` | weights plus every tensor the training phase created (the `createTensor` byte counter) |
 * | `decode_tok_s` | `generate` at batch 1, greedy, prompt P, N new tokens, one readback (chunk N): N / wall time, prefill included; best of 2 |
 * | `ttft_ms` | `generate` with one new token: prefill, sampling and the readback; median of 3 |
 *
 * It also profiles one training step per kernel (timestamp queries around every dispatch) and writes
 * the profiles, GPU times and losses to a details file. Each model × dtype runs in its own process (a
 * fresh device: memory counted from zero, and a crash or out-of-memory loses one case, not the run),
 * within a time budget shared out by model size; a case out of time stops after its current phase and
 * keeps the rows it has.
 *
 * Usage:
 * ```
 * deno run -A bench/e2e.ts --models gpt2-124M,smollm2-135M,tinyllama-1.1B --dtypes f32,f16 \
 *   --out rows.json [--details-out details.json] [--budget-s 300]
 * deno run -A bench/e2e.ts merge --ours rows.json --peft peft.json --out merged.json  # table + merged rows
 * ```
 * On a CPU device try `--models tiny-llama,tiny-gpt2 --batch 2 --seq 16 --prompt 8 --new 8 --top 2`.
 * `PROMPTGATE_ATTENTION_TILED=0` (or `=1`) trains with the per-row (or the tiled) attention kernels instead
 * of the default choice (`attentionTuning` in kernels/attention.ts), for a before/after in one call;
 * `PROMPTGATE_ATTENTION_LANES=0` turns the lane kernels (and the adapter folded into the attention
 * dispatch) off, `PROMPTGATE_CE_ROW_SWEEP=0` the row sweep of the LM-head loss (kernels/cross_entropy.ts),
 * `PROMPTGATE_MATMUL_K=8` the matmul's K step of 16 (`matmulTuning.kStep` in kernels/matmul.ts),
 * `PROMPTGATE_MATMUL_TILES8=0` its tiles of 8x8 outputs per thread (`matmulTuning.tiles8`),
 * `PROMPTGATE_MATMUL_SMALL_SPLIT=0` its K splits over the mid-size products (`matmulTuning.midSplit`),
 * `PROMPTGATE_ATTENTION_DKDV="2x2"` (or `"2x4 prefetched"`, ...) forces the tile of the attention's dk/dv
 * pass (`attentionTuning.dkdvTiles`), `PROMPTGATE_ATTENTION_PREFETCH=0` / `1` the lane kernels' key-block
 * prefetch, `PROMPTGATE_QKV_STACK=0` runs q, k and v as three products instead of one stacked product
 * (`PROMPTGATE_MLP_STACK=0`: a llama MLP's gate and up as two),
 * `PROMPTGATE_ATTENTION_DQ_SCORES=0` runs the lane dq pass instead of dq from the dk/dv pass's scores
 * (`attentionTuning.dqFromScores`) and `PROMPTGATE_ATTENTION_DQ_ROWS=1|2|4` sets that pass's rows per thread;
 * `PROMPTGATE_STEP_REPLAY=0` makes the optimizer record every training step anew instead of replaying it;
 * `PROMPTGATE_MATVEC_MAX_M=4` keeps the matrix-vector kernels to decode (`matmulTuning.matvecMaxM`; the
 * adapter's 10-row products then run tiled) and `PROMPTGATE_ADAPTER_STACK_KV=0` computes each layer's
 * adapter keys and values (and the prompt's gradient) in two products instead of one
 * (`adapterStateTuning.stackKeyValues`); `PROMPTGATE_ADAPTER_REDUCE_SLICES=1|2|4|8` sets the threads per
 * output of the adapter backward's final sums (`adapterAttentionTuning.reduceSlices`), and
 * `PROMPTGATE_ADAPTER_VEC4=0` makes its partials kernel read q and dout one element at a time
 * (`adapterAttentionTuning.vec4`); `PROMPTGATE_EPILOGUES=0` records the layers' residual adds and SwiGLU /
 * GELU backward as kernels of their own instead of in the products' epilogues (`epilogueTuning.fuse` in
 * src/models/ops.ts), `PROMPTGATE_REDUCE_VEC4=0` makes the split-K reduction sum one output per thread
 * (`matmulTuning.reduceVec4`), `PROMPTGATE_STORE_VEC4=0` the tiled products store one output at a time
 * (`matmulTuning.storeVec4`), `PROMPTGATE_MATMUL_TALL=0` keeps the planner from 128x64-8x8 tiles at 1.8-2
 * waves (`matmulTuning.tallTiles`), `PROMPTGATE_MATMUL_SPLIT_TALL=0` gives the mid-size products split over
 * K 64x64-8x8 tiles in 3 instead of 128x64-8x8 in 4-8 (`matmulTuning.splitTall`),
 * `PROMPTGATE_MATMUL_NARROW_TALL=0` gives SmolLM2's LM-head dHidden 64x64 tiles with K in 32 instead of
 * 128x64-8x8 with K in 64 (`matmulTuning.narrowTall`) and
 * `PROMPTGATE_ATTENTION_VEC4=0` makes the attention's lane forward, dk/dv pass and dq from the scores read
 * and write their rows one element at a time (`attentionTuning.vecRows`). `PROMPTGATE_GRADIENT_CHECKPOINTING=1` trains with gradient checkpointing
 * (`model.gradientCheckpointing`: less memory, the layers' forwards run twice).
 *
 * @module
 */

import { dirname } from "../src/_std.ts";
import { parseArgs } from "../src/_std.ts";
import { adapterReport, getGpu, type Gpu } from "../src/gpu/device.ts";
import { type Op, Recorder, runOps } from "../src/gpu/recorder.ts";
import {
  createTensor,
  gpuBytesAllocated,
  gpuBytesPeak,
  readF32,
  resetGpuBytesPeak,
  type Tensor,
  tensorFrom,
} from "../src/gpu/tensor.ts";
import { profileOps, type ProfileRow, timeOps } from "../src/gpu/timing.ts";
import { type ModelConfig, normalizeConfig } from "../src/io/hf_config.ts";
import { addAdaptionPrompt, deleteAdapter } from "../src/adapters/manage.ts";
import { adapterStateTuning } from "../src/adapters/state.ts";
import { createOptimizer } from "../src/train/optimizer.ts";
import { adamwStep, packHyper } from "../kernels/adamw.ts";
import { adapterAttentionTuning } from "../kernels/adapter_attention.ts";
import { attentionTuning } from "../kernels/attention.ts";
import { crossEntropyTuning } from "../kernels/cross_entropy.ts";
import { matmulTuning } from "../kernels/matmul.ts";
import { generate } from "../src/models/generate.ts";
import { epilogueTuning } from "../src/models/ops.ts";
import { adapterKeyValuesForward } from "../src/models/self_attention.ts";
import type { Model } from "../src/models/model.ts";
import {
  createRandomModel,
  modelConfigFor,
  RANDOM_MODEL_NAMES,
  type RandomModelName,
} from "../src/models/random.ts";
import { recordLossAndGradients } from "../src/models/run.ts";
import {
  activationsFor,
  type Batch,
  prepareBatch,
  recordForward,
  uploadBatch,
} from "../src/models/transformer.ts";
import { Random } from "../src/train/rng.ts";

// ---------------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------------

/** Metrics this benchmark reports (`fwd_base_ms` backs `adapter_overhead`). */
export type Metric =
  | "train_tok_s"
  | "fwd_ms"
  | "fwd_base_ms"
  | "adapter_overhead"
  | "peak_gib"
  | "decode_tok_s"
  | "ttft_ms";

/** One measurement of our side. */
export interface OurRow {
  /** Model name, suffix `-top8` for adapters on the top 8 layers. */
  model: string;
  /** `f32` or `f16`. */
  dtype: string;
  /** What was measured. */
  metric: Metric;
  /** Our value. */
  ours: number;
  /** Unit of the value. */
  unit: string;
  /** The GPU. */
  card: string;
}

const UNITS: Record<Metric, string> = {
  train_tok_s: "tok/s",
  fwd_ms: "ms",
  fwd_base_ms: "ms",
  adapter_overhead: "x",
  peak_gib: "GiB",
  decode_tok_s: "tok/s",
  ttft_ms: "ms",
};

/** Rates: more is better (ratio ours/peft); everything else is a cost (ratio peft/ours). */
const RATES: ReadonlySet<string> = new Set(["train_tok_s", "decode_tok_s"]);

// ---------------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------------

interface Settings {
  batch: number;
  seq: number;
  adapterLen: number;
  top: number;
  warmup: number;
  runs: number;
  runMs: number;
  prompt: number;
  newTokens: number;
}

/** Tiny configs for trying the benchmark on a CPU device. */
const TINY_CONFIGS: Record<string, Record<string, unknown>> = {
  "tiny-llama": {
    model_type: "llama",
    vocab_size: 512,
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 4,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    max_position_embeddings: 256,
  },
  "tiny-gpt2": { model_type: "gpt2", vocab_size: 512, n_embd: 64, n_layer: 4, n_head: 4, n_positions: 256 },
};

function configOf(name: string): ModelConfig {
  if ((RANDOM_MODEL_NAMES as readonly string[]).includes(name)) {
    return modelConfigFor(name as RandomModelName);
  }
  const tiny = TINY_CONFIGS[name];
  if (tiny) return normalizeConfig(tiny, name);
  throw new Error(
    `unknown model "${name}"; known: ${[...RANDOM_MODEL_NAMES, ...Object.keys(TINY_CONFIGS)].join(", ")}`,
  );
}

/** Share of the time budget by model (roughly its step time). */
const WEIGHT: Record<string, number> = { "gpt2-124M": 1, "smollm2-135M": 1.2, "tinyllama-1.1B": 2.2 };

// ---------------------------------------------------------------------------------------------------
// Measurements (one case: one model and dtype, both adapter placements)
// ---------------------------------------------------------------------------------------------------

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

function randomIds(rng: Random, n: number, vocab: number): number[] {
  return Array.from({ length: n }, () => rng.int(vocab));
}

/** Wall ms per submission of `ops`, `reps` submissions back to back ending in one wait; median of trials. */
async function wallMs(gpu: Gpu, ops: readonly Op[], reps: number, trials: number): Promise<number> {
  const times: number[] = [];
  for (let t = 0; t < trials; t++) {
    await gpu.device.queue.onSubmittedWorkDone();
    const t0 = performance.now();
    for (let r = 0; r < reps; r++) runOps(gpu, ops);
    await gpu.device.queue.onSubmittedWorkDone();
    times.push((performance.now() - t0) / reps);
  }
  return median(times);
}

/**
 * Per-kernel GPU time of `ops` in chunks (a query set holds at most 4096 timestamps), grouped by
 * `label` (profileOps groups by what precedes the first `|`).
 */
async function profileChunked(
  gpu: Gpu,
  ops: readonly Op[],
  label: (op: Op) => string,
): Promise<ProfileRow[]> {
  const dispatches = ops.filter((o) => o.kind === "dispatch").map((o) => ({ ...o, label: label(o) }));
  const rows = new Map<string, ProfileRow>();
  for (let i = 0; i < dispatches.length; i += 1500) {
    for (const r of await profileOps(gpu, dispatches.slice(i, i + 1500))) {
      const row = rows.get(r.label) ?? { label: r.label, count: 0, ms: 0 };
      row.count += r.count;
      row.ms += r.ms;
      rows.set(r.label, row);
    }
  }
  return [...rows.values()].sort((a, b) => b.ms - a.ms);
}

interface CaseDetails {
  model: string;
  dtype: string;
  card: string;
  weightsGiB?: number;
  createModelS?: number;
  placements: Record<string, Record<string, unknown>>;
  errors: string[];
}

async function runCase(
  name: string,
  dtype: "f32" | "f16",
  s: Settings,
  deadline: number,
  save: (rows: OurRow[], details: CaseDetails) => Promise<void>,
): Promise<void> {
  const gpu = await getGpu();
  const card = adapterReport(gpu).description;
  const rows: OurRow[] = [];
  const details: CaseDetails = { model: name, dtype, card, placements: {}, errors: [] };
  const add = (model: string, metric: Metric, ours: number) =>
    rows.push({ model, dtype, metric, ours: Number(ours.toPrecision(5)), unit: UNITS[metric], card });
  const left = () => deadline - Date.now();
  const config = configOf(name);
  const rng = new Random(1234);
  const t0 = performance.now();
  resetGpuBytesPeak();
  const created: Model = await createRandomModel(config, {
    dtype,
    seed: 0,
    maxSeqLen: Math.max(s.seq, s.prompt + s.newTokens),
  });
  // PROMPTGATE_QKV_STACK=0: three q/k/v products (the same weights, unstacked) for a before/after;
  // PROMPTGATE_MLP_STACK=0: two gate/up products likewise
  const qkvApart = Deno.env.get("PROMPTGATE_QKV_STACK") === "0";
  const mlpApart = Deno.env.get("PROMPTGATE_MLP_STACK") === "0";
  const model: Model = qkvApart || mlpApart
    ? {
      ...created,
      weights: {
        ...created.weights,
        layers: created.weights.layers.map((l) => ({
          ...l,
          qkv: qkvApart ? null : l.qkv,
          gateUp: mlpApart ? null : l.gateUp,
        })),
      },
    }
    : created;
  // PROMPTGATE_GRADIENT_CHECKPOINTING=1: train keeping only each adapted layer's input (less memory)
  model.gradientCheckpointing = Deno.env.get("PROMPTGATE_GRADIENT_CHECKPOINTING") === "1";
  await gpu.device.queue.onSubmittedWorkDone();
  const weightBytes = gpuBytesAllocated;
  details.createModelS = (performance.now() - t0) / 1000;
  details.weightsGiB = weightBytes / 2 ** 30;
  console.error(`[${name} ${dtype}] model ready in ${details.createModelS.toFixed(1)} s (${card})`);
  const ids = Array.from({ length: s.batch }, () => randomIds(rng, s.seq, config.vocabSize));
  const batch: Batch = { inputIds: ids, labels: ids };
  const prompt = randomIds(rng, s.prompt, config.vocabSize);
  let logits: Tensor | null = null;
  const placements: [string, number][] = [[name, config.numLayers]];
  if (s.top < config.numLayers) placements.push([`${name}-top${s.top}`, s.top]);

  for (const [label, layers] of placements) {
    const d: Record<string, unknown> = { adapterLayers: layers };
    details.placements[label] = d;
    const phase = async (what: string, minMs: number, fn: () => Promise<void>) => {
      if (left() < minMs) {
        details.errors.push(`${label}: ${what} skipped, out of time`);
        return;
      }
      const p0 = performance.now();
      try {
        await fn();
      } catch (e) {
        details.errors.push(`${label}: ${what}: ${(e as Error).message}`);
        console.error(`[${label} ${dtype}] ${what} failed: ${(e as Error).stack ?? e}`);
      }
      d[`${what}S`] = Number(((performance.now() - p0) / 1000).toFixed(2));
      await save(rows, details);
    };
    for (const a of [...model.adapters.keys()]) deleteAdapter(model, a);
    addAdaptionPrompt(model, { adapterLen: s.adapterLen, adapterLayers: layers, seed: 5 });

    // training: the peak counts the weights plus what this phase creates
    await phase("train", 2000, async () => {
      const before = resetGpuBytesPeak();
      // PROMPTGATE_STEP_REPLAY=0: record every step anew (the optimizer's `replay: false`)
      const opt = createOptimizer(model, {
        lr: 1e-3,
        replay: Deno.env.get("PROMPTGATE_STEP_REPLAY") !== "0",
      });
      let loss = opt.stepAsync(batch);
      for (let i = 1; i < s.warmup; i++) loss = opt.stepAsync(batch);
      const firstLoss = (await readF32(gpu, loss))[0]!;
      let e0 = performance.now();
      for (let i = 0; i < 2; i++) loss = opt.stepAsync(batch);
      await readF32(gpu, loss);
      const estimate = (performance.now() - e0) / 2;
      const k = Math.max(1, Math.min(20, Math.round(s.runMs / estimate)));
      const perStep: number[] = [];
      for (let r = 0; r < s.runs && (r < 2 || left() > 3 * k * estimate); r++) {
        e0 = performance.now();
        for (let i = 0; i < k; i++) loss = opt.stepAsync(batch);
        await readF32(gpu, loss);
        perStep.push((performance.now() - e0) / k);
      }
      const lastLoss = (await readF32(gpu, loss))[0]!;
      if (!Number.isFinite(lastLoss)) throw new Error(`training loss is ${lastLoss}`);
      const ms = median(perStep);
      add(label, "train_tok_s", (s.batch * s.seq) / (ms / 1000));
      add(label, "peak_gib", (weightBytes + gpuBytesPeak - before) / 2 ** 30);
      Object.assign(d, {
        stepMs: ms,
        stepsPerRun: k,
        runs: perStep.length,
        perStepMs: perStep.map((x) => Number(x.toFixed(3))),
        losses: [firstLoss, lastLoss],
        trainGrowthGiB: (gpuBytesPeak - before) / 2 ** 30,
      });
      console.error(`[${label} ${dtype}] train ${ms.toFixed(2)} ms/step (${perStep.length}×${k} steps)`);
    });

    // per-kernel profile of one step (forward, loss, backward, AdamW with lr 0: parameters unchanged)
    await phase("profile", 3000, async () => {
      const adapter = model.adapters.get(model.active!)!;
      const rec = new Recorder(gpu);
      recordLossAndGradients(rec, model, batch);
      const hyper = tensorFrom(
        gpu,
        packHyper({ lr: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, step: 1, maxGradNorm: 0 }),
      );
      adamwStep(rec, { param: adapter.params, grad: adapter.grads!, m: adapter.m!, v: adapter.v!, hyper });
      const ops = rec.take();
      const byKernel = await profileChunked(gpu, ops, (o) => o.label.split("|")[0]!);
      const byVariant = await profileChunked(
        gpu,
        ops,
        (o) => `${o.label.replaceAll("|", " ")} ${o.kind === "dispatch" ? `[${o.groups}]` : ""}`,
      );
      const step = await timeOps(gpu, ops, 2);
      const round = (r: ProfileRow) => ({ label: r.label, count: r.count, ms: Number(r.ms.toFixed(4)) });
      Object.assign(d, {
        stepGpuMs: step.ms,
        timestamps: step.timestamps,
        dispatches: ops.filter((o) => o.kind === "dispatch").length,
        profileByKernel: byKernel.map(round),
        profileByVariant: byVariant.slice(0, 40).map(round),
      });
    });

    // forward with and without the adapter; logits written to a buffer, never read
    await phase("forward", 2000, async () => {
      const p = prepareBatch(model, { inputIds: ids });
      const acts = activationsFor(model, p.B, p.T, false);
      uploadBatch(model, acts, p);
      logits ??= createTensor(gpu, [p.B * p.T, config.vocabSize], "f32", "bench logits");
      // the adapter's keys and values once per adapter version, as forward() and decode compute them
      const state = model.adapters.get(model.active!)!;
      const kvRec = new Recorder(gpu);
      adapterKeyValuesForward(kvRec, model, state);
      kvRec.submit();
      const record = (withAdapter: boolean): Op[] => {
        const rec = new Recorder(gpu);
        const adapter = withAdapter ? state : null;
        recordForward(rec, model, acts, {
          adapter,
          adapterKeyValues: false,
          masked: false,
          head: { logits: logits! },
        });
        return rec.take();
      };
      const withOps = record(true), baseOps = record(false);
      await wallMs(gpu, withOps, 2, 1); // warm-up
      await wallMs(gpu, baseOps, 2, 1);
      const fwd = await wallMs(gpu, withOps, 3, 5);
      const base = await wallMs(gpu, baseOps, 3, 5);
      await readF32(gpu, acts.loss); // surfaces GPU errors
      add(label, "fwd_ms", fwd);
      add(label, "fwd_base_ms", base);
      add(label, "adapter_overhead", fwd / base);
      const gWith = await timeOps(gpu, withOps, 3), gBase = await timeOps(gpu, baseOps, 3);
      Object.assign(d, {
        fwdGpuMs: gWith.ms,
        fwdBaseGpuMs: gBase.ms,
        adapterOverheadGpu: gWith.ms / gBase.ms,
      });
    });

    // decode at batch 1: prefill of the prompt, then greedy tokens read back once
    await phase("decode", 3000, async () => {
      await generate(model, prompt, { maxNewTokens: 8, chunk: 8 }); // warm-up: pipelines, prefill buffers
      const ttft: number[] = [];
      for (let i = 0; i < 3; i++) {
        const t = performance.now();
        await generate(model, prompt, { maxNewTokens: 1 });
        ttft.push(performance.now() - t);
      }
      const rates: number[] = [];
      for (let i = 0; i < 2; i++) {
        const t = performance.now();
        const out = await generate(model, prompt, { maxNewTokens: s.newTokens, chunk: s.newTokens });
        rates.push(out.length / ((performance.now() - t) / 1000));
        if (out.length !== s.newTokens) {
          throw new Error(`generate gave ${out.length} of ${s.newTokens} tokens`);
        }
      }
      add(label, "ttft_ms", median(ttft));
      add(label, "decode_tok_s", Math.max(...rates));
      Object.assign(d, { ttftMs: ttft, decodeTokS: rates });
    });
  }
  await save(rows, details);
}

// ---------------------------------------------------------------------------------------------------
// Driver: one child process per model × dtype
// ---------------------------------------------------------------------------------------------------

function settingsArgs(s: Settings): string[] {
  return [
    `--batch=${s.batch}`,
    `--seq=${s.seq}`,
    `--adapter-len=${s.adapterLen}`,
    `--top=${s.top}`,
    `--warmup=${s.warmup}`,
    `--runs=${s.runs}`,
    `--run-ms=${s.runMs}`,
    `--prompt=${s.prompt}`,
    `--new=${s.newTokens}`,
  ];
}

async function runChild(
  name: string,
  dtype: string,
  s: Settings,
  budgetMs: number,
): Promise<{ rows: OurRow[]; details: CaseDetails | null }> {
  const tmp = await Deno.makeTempFile({ prefix: `e2e-${name}-${dtype}-`, suffix: ".json" });
  const deadline = Date.now() + budgetMs;
  const cmd = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      new URL(import.meta.url).pathname,
      "case",
      `--model=${name}`,
      `--dtype=${dtype}`,
      `--deadline=${deadline}`,
      `--out=${tmp}`,
      ...settingsArgs(s),
    ],
    stdout: "inherit",
    stderr: "inherit",
  });
  const child = cmd.spawn();
  // the case stops itself between phases; a phase that overruns by more than 30 s is killed
  const timer = setTimeout(() => {
    console.error(`[${name} ${dtype}] over its budget: killed`);
    try {
      child.kill("SIGKILL");
    } catch { /* already gone */ }
  }, budgetMs + 30_000);
  const status = await child.status;
  clearTimeout(timer);
  if (!status.success) console.error(`[${name} ${dtype}] exited with code ${status.code}`);
  try {
    const saved = JSON.parse(await Deno.readTextFile(tmp));
    if (!status.success) saved.details?.errors?.push(`process exited with code ${status.code}`);
    return saved;
  } catch {
    return { rows: [], details: null };
  } finally {
    await Deno.remove(tmp).catch(() => {});
  }
}

function printProfiles(all: CaseDetails[]): void {
  for (const c of all) {
    for (const [label, d] of Object.entries(c.placements)) {
      const prof = d.profileByKernel as ProfileRow[] | undefined;
      if (!prof) continue;
      const total = prof.reduce((a, r) => a + r.ms, 0);
      console.log(
        `\nprofile of one training step: ${label} ${c.dtype} — ${total.toFixed(2)} ms GPU summed over ` +
          `${d.dispatches} dispatches (one pass each); whole step in one pass ${
            Number(d.stepGpuMs).toFixed(2)
          } ms; ` +
          `wall ${Number(d.stepMs ?? NaN).toFixed(2)} ms`,
      );
      for (const r of prof.slice(0, 12)) {
        console.log(
          `  ${r.label.padEnd(28)} ${String(r.count).padStart(5)}× ${r.ms.toFixed(3).padStart(9)} ms ${
            (100 * r.ms / total).toFixed(1).padStart(5)
          }%`,
        );
      }
    }
  }
}

function printTable(
  rows: { model: string; dtype: string; metric: string; unit: string }[],
  cols: string[],
): void {
  const fmt = (v: unknown) =>
    typeof v === "number" ? (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3)) : "-";
  const header = ["model", "dtype", "metric", ...cols, "unit"];
  const lines = rows.map((r) => [
    r.model,
    r.dtype,
    r.metric,
    ...cols.map((c) => fmt((r as unknown as Record<string, unknown>)[c])),
    r.unit,
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
  const line = (l: string[]) =>
    l.map((x, i) => (i < 3 ? x.padEnd(widths[i]!) : x.padStart(widths[i]!))).join("  ");
  console.log(line(header));
  for (const l of lines) console.log(line(l));
}

async function driver(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      models: { type: "string", default: RANDOM_MODEL_NAMES.join(",") },
      dtypes: { type: "string", default: "f32,f16" },
      out: {
        type: "string",
        default: `bench/results/e2e-ours-${new Date().toISOString().slice(0, 10)}.json`,
      },
      "details-out": { type: "string" },
      "budget-s": { type: "string", default: "300" },
      ...SETTINGS_OPTIONS,
    },
  });
  const s = settingsFrom(values);
  const models = values.models.split(",").filter(Boolean);
  const dtypes = values.dtypes.split(",").filter(Boolean);
  const detailsOut = values["details-out"] ?? values.out.replace(/\.json$/, "") + "-details.json";
  const end = Date.now() + Number(values["budget-s"]) * 1000;
  for (const f of [values.out, detailsOut]) await Deno.mkdir(dirname(f), { recursive: true });
  const cases = models.flatMap((m) => dtypes.map((d) => ({ m, d })));
  const weight = (m: string) => WEIGHT[m] ?? 1;
  const rows: OurRow[] = [];
  const details: CaseDetails[] = [];
  for (let i = 0; i < cases.length; i++) {
    const { m, d } = cases[i]!;
    const rest = cases.slice(i).reduce((a, c) => a + weight(c.m), 0);
    const budget = Math.max(0, (end - Date.now()) * weight(m) / rest);
    if (budget < 15_000) {
      console.error(`[${m} ${d}] skipped: ${(budget / 1000).toFixed(0)} s of budget left`);
      continue;
    }
    console.error(`[${m} ${d}] budget ${(budget / 1000).toFixed(0)} s`);
    const r = await runChild(m, d, s, budget);
    rows.push(...r.rows);
    if (r.details) details.push(r.details);
    await Deno.writeTextFile(values.out, JSON.stringify(rows, null, 1) + "\n");
    await Deno.writeTextFile(detailsOut, JSON.stringify({ settings: s, cases: details }, null, 1) + "\n");
  }
  printProfiles(details);
  console.log("");
  printTable(rows, ["ours"]);
  for (const c of details) for (const e of c.errors) console.log(`! ${c.model} ${c.dtype}: ${e}`);
  console.log(`\nrows: ${values.out}\ndetails and profiles: ${detailsOut}`);
}

const SETTINGS_OPTIONS = {
  batch: { type: "string", default: "4" },
  seq: { type: "string", default: "512" },
  "adapter-len": { type: "string", default: "10" },
  top: { type: "string", default: "8" },
  warmup: { type: "string", default: "3" },
  runs: { type: "string", default: "10" },
  "run-ms": { type: "string", default: "600" },
  prompt: { type: "string", default: "128" },
  new: { type: "string", default: "128" },
} as const;

function settingsFrom(v: Record<string, string | boolean | undefined>): Settings {
  const n = (k: string) => {
    const x = Number(v[k]);
    if (!Number.isFinite(x) || x <= 0) throw new Error(`--${k} must be a positive number, got ${v[k]}`);
    return x;
  };
  return {
    batch: n("batch"),
    seq: n("seq"),
    adapterLen: n("adapter-len"),
    top: n("top"),
    warmup: Math.max(1, n("warmup")),
    runs: n("runs"),
    runMs: n("run-ms"),
    prompt: n("prompt"),
    newTokens: n("new"),
  };
}

async function caseMain(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      model: { type: "string" },
      dtype: { type: "string", default: "f32" },
      deadline: { type: "string" },
      out: { type: "string" },
      ...SETTINGS_OPTIONS,
    },
  });
  const dtype = values.dtype;
  if (dtype !== "f32" && dtype !== "f16") throw new Error(`--dtype must be f32 or f16, got ${dtype}`);
  if (!values.model || !values.out) throw new Error("case needs --model and --out");
  const out = values.out;
  // PROMPTGATE_ATTENTION_TILED=0 / 1 overrides the attention kernel choice (kernels/attention.ts)
  const tiled = Deno.env.get("PROMPTGATE_ATTENTION_TILED");
  if (tiled === "0" || tiled === "1") attentionTuning.tiled = tiled === "1";
  if (Deno.env.get("PROMPTGATE_ATTENTION_LANES") === "0") attentionTuning.lanes = false;
  if (Deno.env.get("PROMPTGATE_ATTENTION_VEC4") === "0") attentionTuning.vecRows = false;
  if (Deno.env.get("PROMPTGATE_CE_ROW_SWEEP") === "0") crossEntropyTuning.rowSweep = false;
  if (Deno.env.get("PROMPTGATE_MATMUL_K") === "8") matmulTuning.kStep = 8;
  if (Deno.env.get("PROMPTGATE_MATMUL_TILES8") === "0") matmulTuning.tiles8 = false;
  if (Deno.env.get("PROMPTGATE_MATMUL_SMALL_SPLIT") === "0") matmulTuning.midSplit = false;
  const mvMax = Deno.env.get("PROMPTGATE_MATVEC_MAX_M");
  if (mvMax) matmulTuning.matvecMaxM = Number(mvMax);
  if (Deno.env.get("PROMPTGATE_ADAPTER_STACK_KV") === "0") adapterStateTuning.stackKeyValues = false;
  const slices = Deno.env.get("PROMPTGATE_ADAPTER_REDUCE_SLICES");
  if (slices) adapterAttentionTuning.reduceSlices = Number(slices) as 1 | 2 | 4 | 8;
  if (Deno.env.get("PROMPTGATE_ADAPTER_VEC4") === "0") adapterAttentionTuning.vec4 = false;
  if (Deno.env.get("PROMPTGATE_EPILOGUES") === "0") epilogueTuning.fuse = false;
  if (Deno.env.get("PROMPTGATE_REDUCE_VEC4") === "0") matmulTuning.reduceVec4 = false;
  if (Deno.env.get("PROMPTGATE_STORE_VEC4") === "0") matmulTuning.storeVec4 = false;
  if (Deno.env.get("PROMPTGATE_MATMUL_TALL") === "0") matmulTuning.tallTiles = false;
  if (Deno.env.get("PROMPTGATE_MATMUL_SPLIT_TALL") === "0") matmulTuning.splitTall = false;
  if (Deno.env.get("PROMPTGATE_MATMUL_NARROW_TALL") === "0") matmulTuning.narrowTall = false;
  const dkdv = Deno.env.get("PROMPTGATE_ATTENTION_DKDV")?.match(/^(\d)x(\d)( prefetched)?$/);
  if (dkdv) attentionTuning.dkdvTiles = [{ keys: +dkdv[1]!, queries: +dkdv[2]!, prefetch: !!dkdv[3] }];
  const prefetch = Deno.env.get("PROMPTGATE_ATTENTION_PREFETCH");
  if (prefetch === "0" || prefetch === "1") {
    attentionTuning.forwardShape = { ...attentionTuning.forwardShape, prefetch: prefetch === "1" };
    attentionTuning.dqShape = { ...attentionTuning.dqShape, prefetch: prefetch === "1" };
  }
  if (Deno.env.get("PROMPTGATE_ATTENTION_DQ_SCORES") === "0") attentionTuning.dqFromScores = false;
  const dqRows = Deno.env.get("PROMPTGATE_ATTENTION_DQ_ROWS");
  if (dqRows === "1" || dqRows === "2" || dqRows === "4") attentionTuning.dqScoresRows = +dqRows;
  const kernels = !attentionTuning.tiled ? "per-row" : attentionTuning.lanes ? "lane" : "tiled";
  console.error(
    `[${values.model} ${dtype}] attention kernels: ${kernels}; LM-head loss: ${
      crossEntropyTuning.rowSweep ? "row" : "vocabulary"
    } sweep; matmul K step: ${
      matmulTuning.kStep ?? "default"
    }, 8x8 tiles: ${matmulTuning.tiles8}, mid-size K splits: ${matmulTuning.midSplit}; dk/dv tiles: ${
      JSON.stringify(attentionTuning.dkdvTiles)
    }, lane prefetch: ${!!attentionTuning.forwardShape.prefetch}/${!!attentionTuning.dqShape.prefetch}; dq: ${
      attentionTuning.dqFromScores
        ? `from scores, ${attentionTuning.dqScoresRows} rows per thread`
        : "lane pass"
    }`,
  );
  await runCase(
    values.model,
    dtype,
    settingsFrom(values),
    Number(values.deadline ?? Date.now() + 600_000),
    (rows, details) => Deno.writeTextFile(out, JSON.stringify({ rows, details })),
  );
}

// ---------------------------------------------------------------------------------------------------
// Merge with PEFT's rows
// ---------------------------------------------------------------------------------------------------

interface PeftRow {
  model: string;
  dtype: string;
  metric: string;
  peft: number;
  unit: string;
  card: string;
}

/** A merged row of the results file. */
export interface MergedRow {
  /** Model (suffix `-top8`). */
  model: string;
  /** Our dtype (`f16` rows compare with PEFT bf16). */
  dtype: string;
  /** Metric. */
  metric: string;
  /** Our value or null. */
  ours: number | null;
  /** PEFT's value or null. */
  peft: number | null;
  /** How many times better ours is (ours/peft for rates, peft/ours for times and memory). */
  ratio: number | null;
  /** Unit. */
  unit: string;
  /** The GPU. */
  card: string;
}

/**
 * Joins our rows and PEFT's on model, dtype (f16 ↔ bf16) and metric.
 *
 * @param ours Our rows.
 * @param peft PEFT's rows.
 * @returns Merged rows, ours first in our order, then PEFT-only rows.
 */
export function mergeRows(ours: OurRow[], peft: PeftRow[]): MergedRow[] {
  const peftDtype = (d: string) => d === "f16" ? "bf16" : d;
  const key = (m: string, d: string, k: string) => `${m}|${d}|${k}`;
  const theirs = new Map(peft.map((r) => [key(r.model, r.dtype, r.metric), r]));
  const used = new Set<string>();
  const out: MergedRow[] = [];
  const ratio = (metric: string, o: number | null, p: number | null) => {
    if (o === null || p === null || !(o > 0) || !(p > 0)) return null;
    return Number((RATES.has(metric) ? o / p : p / o).toFixed(3));
  };
  for (const r of ours) {
    const k = key(r.model, peftDtype(r.dtype), r.metric);
    const p = theirs.get(k) ?? null;
    used.add(k);
    const card = p && p.card !== r.card ? `${r.card} / torch: ${p.card}` : r.card;
    const peftValue = p?.peft ?? null;
    out.push({
      model: r.model,
      dtype: r.dtype,
      metric: r.metric,
      ours: r.ours,
      peft: peftValue,
      ratio: ratio(r.metric, r.ours, peftValue),
      unit: r.unit,
      card,
    });
  }
  for (const p of peft) {
    const k = key(p.model, p.dtype, p.metric);
    if (used.has(k)) continue;
    out.push({
      model: p.model,
      dtype: p.dtype === "bf16" ? "f16" : p.dtype,
      metric: p.metric,
      ours: null,
      peft: p.peft,
      ratio: null,
      unit: p.unit,
      card: p.card,
    });
  }
  return out;
}

async function readRows<T>(path: string | undefined): Promise<T[]> {
  if (!path) return [];
  try {
    return JSON.parse(await Deno.readTextFile(path)) as T[];
  } catch (e) {
    console.error(`cannot read ${path}: ${(e as Error).message}; treating it as empty`);
    return [];
  }
}

async function mergeMain(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: { ours: { type: "string" }, peft: { type: "string" }, out: { type: "string" } },
  });
  const merged = mergeRows(await readRows<OurRow>(values.ours), await readRows<PeftRow>(values.peft));
  if (values.out) await Deno.writeTextFile(values.out, JSON.stringify(merged, null, 1) + "\n");
  const cards = [...new Set(merged.map((r) => r.card))].join("; ");
  console.log(`promptgate vs PEFT, ${new Date().toISOString().slice(0, 10)}, ${cards}`);
  console.log("ratio = how many times better ours is; f16 rows compare with PEFT bf16\n");
  printTable(merged, ["ours", "peft", "ratio"]);
  if (values.out) console.log(`\nmerged rows: ${values.out}`);
}

if (import.meta.main) {
  const [mode, ...rest] = Deno.args;
  if (mode === "case") await caseMain(rest);
  else if (mode === "merge") await mergeMain(rest);
  else await driver(Deno.args);
}
