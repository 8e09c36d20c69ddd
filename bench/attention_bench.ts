/**
 * Benchmarks of the attention kernels (flash forward, FlashAttention-2 backward, decode against a KV
 * cache, the fused decode attention + adapter kernel against the three dispatches it replaces) and of the
 * adapter attention, at the model shapes (gpt2-124M, SmolLM2-135M, TinyLlama-1.1B; B=4, T=512 and decode
 * B=1). GPU time comes from timestamp queries (`timeOps`); the setup prints a table of milliseconds and
 * GFLOP/s, and the adapter attention's cost relative to the main attention and to an estimate of one
 * layer's forward. Rows marked "f16 act" use f16 q, k, v, out (and an f16 KV cache at decode) where the GPU
 * has `shader-f16`. Big shapes run only with `PROMPTGATE_BENCH_FULL=1` (the default on a
 * real GPU); on a fallback (CPU) adapter small shapes are used.
 *
 * @module
 */

import { benchFull, seededUniform, warmTiming } from "./_shared.ts";
import {
  attentionBackward,
  attentionForward,
  type AttentionOptions,
  attentionTuning,
  type DkdvTile,
  dkdvTileBytes,
  type LaneShape,
} from "../kernels/attention.ts";
import {
  adapterAttentionBackward,
  adapterAttentionForward,
  adapterAttentionTuning,
} from "../kernels/adapter_attention.ts";
import { addInto } from "../kernels/activation.ts";
import { decodeAttentionForward } from "../kernels/decode_attention.ts";
import { adapterReport, getGpu } from "../src/gpu/device.ts";
import { type Op, Recorder, runOps } from "../src/gpu/recorder.ts";
import { createTensor, readF32, type Tensor, tensorFrom } from "../src/gpu/tensor.ts";
import { f32ArrayToF16 } from "../src/io/dtype.ts";
import { timeOpsWarm } from "../src/gpu/timing.ts";

const gpu = await getGpu();
const full = benchFull(gpu);

interface Model {
  name: string;
  C: number;
  I: number;
  H: number;
  Hkv: number;
  D: number;
}

const MODELS: Model[] = full
  ? [
    { name: "gpt2-124M", C: 768, I: 3072, H: 12, Hkv: 12, D: 64 },
    { name: "SmolLM2-135M", C: 576, I: 1536, H: 9, Hkv: 3, D: 64 },
    { name: "TinyLlama-1.1B", C: 2048, I: 5632, H: 32, Hkv: 4, D: 64 },
  ]
  : [{ name: "tiny", C: 64, I: 128, H: 4, Hkv: 2, D: 16 }];
const B = full ? 4 : 1;
const T = full ? 512 : 64;
const DECODE_S = full ? [128, 384, 640] : [32];
const L = 10;
// PROMPTGATE_BENCH_COMPARE=1 (default) also times the first kernels (attentionTuning.tiled = false) in
// the same run, per whole call and per dispatch
const compare = (Deno.env.get("PROMPTGATE_BENCH_COMPARE") ?? "1") === "1";

const rand = seededUniform;

const rows: Record<string, string | number>[] = [];

// PROMPTGATE_BENCH_DKDV=1: only the dk/dv pass, once per per-thread tile (attentionTuning.dkdvTiles) that
// fits the device, the lane kernels (forward, dq) with and without their key blocks prefetched, and the
// adapter backward's row blocks and load batches (`adapterAttentionTuning`, both dispatches), each
// dispatch timed alone at the model shapes (f32 and f16 activations), its outputs compared with the
// first variant's (NaN-poisoned before each run).
const dkdvSweep = Deno.env.get("PROMPTGATE_BENCH_DKDV") === "1";
const SWEEP_TILES: DkdvTile[] = [
  [2, 2],
  [1, 4],
  [2, 3],
  [2, 4],
  [3, 2],
  [4, 1],
  [1, 2],
  [2, 1],
].flatMap(([keys, queries]) =>
  [false, true].map((prefetch) => ({ keys: keys!, queries: queries!, prefetch }))
);
const sweepRows: Record<string, string | number>[] = [];

/** The dk/dv sweep of one model (see `dkdvSweep`). */
async function sweepDkdv(
  m: Model,
  o: AttentionOptions,
  t: Record<"q" | "k" | "v" | "out" | "dout" | "lse" | "dq" | "dk" | "dv", Tensor>,
  flops: number,
): Promise<void> {
  const fwd = new Recorder(gpu);
  attentionForward(fwd, t.out, t.lse, t.q, t.k, t.v, null, o);
  runOps(gpu, fwd.take());
  const acts = [{ name: "f32", q: t.q, k: t.k, v: t.v, out: t.out }];
  if (gpu.hasF16) {
    const f16 = (x: Tensor, seed: number) => tensorFrom(gpu, f32ArrayToF16(rand(x.size, seed)));
    acts.push({ name: "f16 act", q: f16(t.q, 1), k: f16(t.k, 2), v: f16(t.v, 3), out: f16(t.out, 11) });
  }
  const saved = attentionTuning.dkdvTiles;
  for (const a of acts) {
    let base: Float32Array[] | null = null;
    for (const tile of SWEEP_TILES) {
      if (dkdvTileBytes(o.headDim, tile) > gpu.limits.maxComputeWorkgroupStorageSize) continue;
      attentionTuning.dkdvTiles = [tile];
      try {
        for (const g of [t.dk, t.dv]) {
          gpu.device.queue.writeBuffer(g.buffer, 0, new Float32Array(g.size).fill(NaN));
        }
        const rec = new Recorder(gpu);
        attentionBackward(rec, t.dq, t.dk, t.dv, t.dout, a.out, t.lse, a.q, a.k, a.v, null, o);
        const ops = rec.take();
        runOps(gpu, ops);
        const got = [await readF32(gpu, t.dk), await readF32(gpu, t.dv)];
        base ??= got;
        const diff = Math.max(...got.map((g, i) => maxRelDiff(g, base![i]!)));
        const ms: Record<string, number> = {};
        for (const op of ops.filter((x) => x.label.startsWith("attention_bwd_dkdv"))) {
          ms[op.label.startsWith("attention_bwd_dkdv_reduce") ? "reduce" : "dkdv"] = await warmMedian([op]);
        }
        sweepRows.push({
          case: `${m.name} ${a.name}`,
          kernel: `dk/dv ${tile.keys}x${tile.queries}${tile.prefetch ? " prefetched" : ""}`,
          ms: +ms.dkdv!.toFixed(4),
          "reduce ms": +(ms.reduce ?? 0).toFixed(4),
          "TFLOP/s": +(2 * flops / ms.dkdv! / 1e9).toFixed(2),
          "max rel diff": +diff.toExponential(2),
        });
      } finally {
        attentionTuning.dkdvTiles = saved;
      }
    }
    // the lane kernels (forward, dq): the default shape without and with its key blocks prefetched, then
    // other prefetched shapes (rows per workgroup R, lanes per row KS, keys per step G; with 48 keys per
    // block only R = 64, KS = 2 leaves room for the lanes' merge area)
    const shapes = { forwardShape: attentionTuning.forwardShape, dqShape: attentionTuning.dqShape };
    const others: Record<"forward" | "dq", [number, number, number][]> = {
      forward: [[64, 2, 2], [64, 2, 3], [64, 2, 6]],
      dq: [[64, 2, 2], [64, 2, 3]],
    };
    for (const pass of ["forward", "dq"] as const) {
      let base: Float32Array | null = null;
      const key = pass === "forward" ? "forwardShape" : "dqShape";
      const variants: LaneShape[] = [
        { ...shapes[key], prefetch: false },
        { ...shapes[key], prefetch: true },
        ...others[pass].map(([R, KS, G]) => ({ R, KS, G, prefetch: true })),
      ];
      for (const shape of variants) {
        attentionTuning[key] = shape;
        try {
          const got = pass === "forward" ? t.out : t.dq;
          gpu.device.queue.writeBuffer(got.buffer, 0, new Float32Array(got.size).fill(NaN));
          const rec = new Recorder(gpu);
          if (pass === "forward") attentionForward(rec, t.out, t.lse, a.q, a.k, a.v, null, o);
          else attentionBackward(rec, t.dq, t.dk, t.dv, t.dout, a.out, t.lse, a.q, a.k, a.v, null, o);
          const ops = rec.take();
          runOps(gpu, ops);
          const values = a.name === "f32" || pass === "dq" ? await readF32(gpu, got) : null;
          if (values) base ??= values;
          const label = pass === "forward" ? "attention_fwd_lanes" : "attention_bwd_dq_lanes";
          const op = ops.find((x) => x.label.startsWith(label));
          if (!op) continue; // the shape does not fit the device's workgroup memory: another kernel ran
          const ms = await warmMedian([op]);
          sweepRows.push({
            case: `${m.name} ${a.name}`,
            kernel: `${pass} lanes ${shape.R}/${shape.KS}/${shape.G}${shape.prefetch ? " prefetched" : ""}`,
            ms: +ms.toFixed(4),
            "reduce ms": 0,
            "TFLOP/s": +((pass === "forward" ? 1 : 1.5) * flops / ms / 1e9).toFixed(2),
            "max rel diff": values ? +maxRelDiff(values, base!).toExponential(2) : "-",
          });
        } finally {
          Object.assign(attentionTuning, shapes);
        }
      }
    }
    // dq: the lane pass against dq from the scores the dk/dv pass writes (1, 2, 4 rows per thread); the
    // dk/dv pass's own time with and without writing the scores
    const tuned = { ...attentionTuning };
    let dqBase: Float32Array | null = null;
    for (const rowsPerThread of [0, 1, 2, 4]) {
      attentionTuning.dqFromScores = rowsPerThread > 0;
      attentionTuning.dqScoresRows = rowsPerThread || tuned.dqScoresRows;
      try {
        gpu.device.queue.writeBuffer(t.dq.buffer, 0, new Float32Array(t.dq.size).fill(NaN));
        const rec = new Recorder(gpu);
        attentionBackward(rec, t.dq, t.dk, t.dv, t.dout, a.out, t.lse, a.q, a.k, a.v, null, o);
        const ops = rec.take();
        runOps(gpu, ops);
        const got = await readF32(gpu, t.dq);
        dqBase ??= got;
        const dkdvOp = ops.find((x) => x.label.startsWith("attention_bwd_dkdv|"));
        const dqOp = ops.find((x) => x.label.startsWith("attention_bwd_dq"));
        const dqMs = await warmMedian([dqOp!]);
        sweepRows.push({
          case: `${m.name} ${a.name}`,
          kernel: rowsPerThread ? `dq from scores, ${rowsPerThread} rows per thread` : "dq lane pass",
          ms: +dqMs.toFixed(4),
          "reduce ms": 0,
          "dk/dv ms": +(await warmMedian([dkdvOp!])).toFixed(4),
          "TFLOP/s": +(1.5 * flops / dqMs / 1e9).toFixed(2),
          "max rel diff": +maxRelDiff(got, dqBase).toExponential(2),
        });
      } finally {
        Object.assign(attentionTuning, tuned);
      }
    }
    // the adapter attention backward (L = 10): row blocks per workgroup × rows per load batch
    const ka = tensorFrom(gpu, rand(o.numKvHeads * L * o.headDim, 5));
    const va = tensorFrom(gpu, rand(o.numKvHeads * L * o.headDim, 6));
    const gate = tensorFrom(gpu, rand(o.numHeads, 7));
    const grads = [ka, va, gate].map((x) => createTensor(gpu, [x.size]));
    const ao = {
      numHeads: o.numHeads,
      numKvHeads: o.numKvHeads,
      headDim: o.headDim,
      adapterLen: L,
      rows: o.batch * o.queryLen,
      scale: 1 / Math.sqrt(o.headDim),
      gateKind: "per-head-tanh" as const,
      accumulate: false,
    };
    const tuning = { ...adapterAttentionTuning };
    let first: Float32Array | null = null;
    for (const [subChunks, rowBatch] of [[4, 1], [4, 8], [2, 8], [4, 4], [4, 16], [8, 8]] as const) {
      Object.assign(adapterAttentionTuning, { subChunks, rowBatch });
      try {
        const rec = new Recorder(gpu);
        adapterAttentionBackward(rec, t.dq, grads[0]!, grads[1]!, grads[2]!, t.dout, a.q, ka, va, gate, ao);
        const ops = rec.take();
        runOps(gpu, ops);
        const got = await readF32(gpu, grads[0]!);
        first ??= got;
        let ms = 0;
        for (const op of ops) ms += await warmMedian([op]);
        sweepRows.push({
          case: `${m.name} ${a.name}`,
          kernel: `adapter bwd ${subChunks} blocks, ${rowBatch} rows per load batch`,
          ms: +ms.toFixed(4),
          "reduce ms": 0,
          "TFLOP/s": 0,
          "max rel diff": +maxRelDiff(got, first).toExponential(2),
        });
      } finally {
        Object.assign(adapterAttentionTuning, tuning);
      }
    }
  }
}

/** max |a - b| / max |b|. */
function maxRelDiff(a: Float32Array, b: Float32Array): number {
  let d = 0, s = 0;
  for (let i = 0; i < a.length; i++) {
    d = Math.max(d, Math.abs(a[i]! - b[i]!));
    s = Math.max(s, Math.abs(b[i]!));
  }
  return d / s;
}
const replay: { name: string; ops: Op[] }[] = [];

/**
 * Median ms of `ops` (repeated in one pass) after ≥ 60 ms of warm-up on them, from 3 timed windows of
 * ≥ 15 ms of GPU work (the H200 idles at 345 MHz and reaches 1980 MHz only under load; the helper of
 * bench/matmul_bench.ts).
 */
async function warmMedian(ops: Op[]): Promise<number> {
  return (await timeOpsWarm(gpu, ops, warmTiming(full))).ms;
}

/** Records with the first kernels (`before`) or the current ones, runs once, returns the ops. */
function recordWith(before: boolean, record: (rec: Recorder) => void): Op[] {
  attentionTuning.tiled = !before;
  try {
    const rec = new Recorder(gpu);
    record(rec);
    return rec.take();
  } finally {
    attentionTuning.tiled = true;
  }
}

const kernelRows: Record<string, string | number>[] = [];

/** Times the whole op list and each dispatch alone, before (first kernels) and after. */
async function measure(name: string, record: (rec: Recorder) => void, flops: number): Promise<number> {
  const result: Record<string, number> = {};
  for (const before of compare ? [true, false] : [false]) {
    const ops = recordWith(before, record);
    runOps(gpu, ops); // warm up (compiles pipelines, creates bind groups); also fills lse/stats
    await gpu.device.queue.onSubmittedWorkDone();
    const ms = await warmMedian(ops);
    result[before ? "before" : "after"] = ms;
    if (!before) replay.push({ name, ops });
    if (ops.length > 1 || compare) {
      for (const op of ops) {
        const label = op.label.split("|")[0]!;
        const kms = await warmMedian([op]);
        const row = kernelRows.find((r) => r.case === name && r.kernel === label) ??
          (kernelRows.push({ case: name, kernel: label }), kernelRows[kernelRows.length - 1]!);
        row[before ? "before ms" : "after ms"] = +kms.toFixed(4);
      }
    }
  }
  const ms = result.after!;
  rows.push({
    kernel: name,
    ...(compare ? { "before ms": +result.before!.toFixed(4) } : {}),
    ms: +ms.toFixed(4),
    ...(compare ? { speedup: +(result.before! / ms).toFixed(2) } : {}),
    "GFLOP/s": flops > 0 ? +(flops / ms / 1e6).toFixed(1) : "-",
  });
  return ms;
}

for (const m of MODELS) {
  const { H, Hkv, D } = m;
  const N = B * T;
  const q = tensorFrom(gpu, rand(N * H * D, 1));
  const k = tensorFrom(gpu, rand(N * Hkv * D, 2));
  const v = tensorFrom(gpu, rand(N * Hkv * D, 3));
  const out = tensorFrom(gpu, new Float32Array(N * H * D));
  const dout = tensorFrom(gpu, rand(N * H * D, 4));
  const lse = tensorFrom(gpu, new Float32Array(B * H * T));
  const dq = tensorFrom(gpu, new Float32Array(N * H * D));
  const dk = tensorFrom(gpu, new Float32Array(N * Hkv * D));
  const dv = tensorFrom(gpu, new Float32Array(N * Hkv * D));
  const o: AttentionOptions = {
    numHeads: H,
    numKvHeads: Hkv,
    headDim: D,
    batch: B,
    queryLen: T,
    keyLen: T,
    scale: 1 / Math.sqrt(D),
    causal: true,
  };
  const fwdFlops = (4 * B * H * T * T * D) / 2;
  if (dkdvSweep) {
    await sweepDkdv(m, o, { q, k, v, out, dout, lse, dq, dk, dv }, fwdFlops);
    continue;
  }
  const tf = await measure(
    `${m.name} attention fwd B=${B} T=${T}`,
    (r) => attentionForward(r, out, lse, q, k, v, null, o),
    fwdFlops,
  );
  const tb = await measure(
    `${m.name} attention bwd B=${B} T=${T}`,
    (r) => attentionBackward(r, dq, dk, dv, dout, out, lse, q, k, v, null, o),
    2.5 * fwdFlops,
  );
  // f16 activations (storage only): q, k, v, out f16; lse, dout and the gradients f32
  const f16 = (n: number, seed: number) => tensorFrom(gpu, f32ArrayToF16(rand(n, seed)));
  const h16 = gpu.hasF16
    ? {
      q: f16(N * H * D, 1),
      k: f16(N * Hkv * D, 2),
      v: f16(N * Hkv * D, 3),
      out: createTensor(gpu, [N * H * D], "f16"),
    }
    : null;
  if (h16) {
    await measure(
      `${m.name} attention fwd f16 act B=${B} T=${T}`,
      (r) => attentionForward(r, h16.out, lse, h16.q, h16.k, h16.v, null, o),
      fwdFlops,
    );
    await measure(
      `${m.name} attention bwd f16 act B=${B} T=${T}`,
      (r) => attentionBackward(r, dq, dk, dv, dout, h16.out, lse, h16.q, h16.k, h16.v, null, o),
      2.5 * fwdFlops,
    );
  }
  // adapter attention (L = 10 tokens) on the same rows
  const ka = tensorFrom(gpu, rand(Hkv * L * D, 5));
  const va = tensorFrom(gpu, rand(Hkv * L * D, 6));
  const gate = tensorFrom(gpu, rand(H, 7));
  const dka = tensorFrom(gpu, new Float32Array(Hkv * L * D));
  const dva = tensorFrom(gpu, new Float32Array(Hkv * L * D));
  const dgate = tensorFrom(gpu, new Float32Array(H));
  const ao = {
    numHeads: H,
    numKvHeads: Hkv,
    headDim: D,
    adapterLen: L,
    rows: N,
    scale: 1 / Math.sqrt(D),
    gateKind: "per-head-tanh" as const,
    accumulate: true,
  };
  const adFlops = 4 * N * H * L * D;
  const ta = await measure(
    `${m.name} adapter fwd L=${L}`,
    (r) => adapterAttentionForward(r, out, q, ka, va, gate, ao),
    adFlops,
  );
  const tab = await measure(
    `${m.name} adapter bwd L=${L}`,
    (r) => adapterAttentionBackward(r, dq, dka, dva, dgate, dout, q, ka, va, gate, ao),
    2.5 * adFlops,
  );
  // one layer's forward, estimated: its matmuls (qkv, o, mlp) at 20 TFLOP/s plus the attention measured
  const kvC = Hkv * D;
  const mlp = m.name.startsWith("gpt2") ? 2 * m.C * m.I : 3 * m.C * m.I;
  const layerMs = (2 * N * (m.C * (m.C + 2 * kvC) + m.C * m.C + mlp)) / 20e12 * 1e3 + tf;
  console.log(
    `${m.name}: adapter fwd = ${(100 * ta / tf).toFixed(1)}% of attention fwd, ~${
      (100 * ta / layerMs).toFixed(2)
    }% ` +
      `of a layer forward (est. ${layerMs.toFixed(3)} ms); adapter bwd = ${
        (100 * tab / tb).toFixed(1)
      }% of attention bwd`,
  );
  // decode: B=1, T=1 against a KV cache of Smax = 1024 positions
  const Smax = Math.max(...DECODE_S, 64) * 2;
  const kc = tensorFrom(gpu, rand(Smax * Hkv * D, 8));
  const vc = tensorFrom(gpu, rand(Smax * Hkv * D, 9));
  const q1 = tensorFrom(gpu, rand(H * D, 10));
  const o1 = tensorFrom(gpu, new Float32Array(H * D));
  const adp1 = tensorFrom(gpu, new Float32Array(H * D));
  const dec16 = gpu.hasF16
    ? {
      k: f16(Smax * Hkv * D, 8),
      v: f16(Smax * Hkv * D, 9),
      q: f16(H * D, 10),
      out: createTensor(gpu, [H * D], "f16"),
    }
    : null;
  const ao1 = { ...ao, rows: 1, accumulate: false };
  const adapter1 = {
    ka,
    va,
    gate,
    adapterLen: L,
    scale: 1 / Math.sqrt(D),
    gateKind: ao.gateKind,
    into: null,
  };
  for (const S of DECODE_S) {
    const od: AttentionOptions = { ...o, batch: 1, queryLen: 1, keyLen: S, kvStride: Smax };
    await measure(
      `${m.name} decode fwd B=1 T=1 S=${S}`,
      (r) => attentionForward(r, o1, null, q1, kc, vc, null, od),
      4 * H * S * D,
    );
    // a decode step's attention with the adapter: the three dispatches, then the fused kernel
    await measure(
      `${m.name} decode attn + adapter + add B=1 S=${S}`,
      (r) => {
        attentionForward(r, o1, null, q1, kc, vc, null, od);
        adapterAttentionForward(r, adp1, q1, ka, va, gate, ao1);
        addInto(r, o1, adp1);
      },
      4 * H * (S + L) * D,
    );
    await measure(
      `${m.name} decode fused (decodeAttentionForward) B=1 S=${S}`,
      (r) => decodeAttentionForward(r, o1, q1, kc, vc, null, od, adapter1),
      4 * H * (S + L) * D,
    );
    if (dec16) {
      await measure(
        `${m.name} decode fused f16 act (q, KV cache, out) B=1 S=${S}`,
        (r) => decodeAttentionForward(r, dec16.out, dec16.q, dec16.k, dec16.v, null, od, adapter1),
        4 * H * (S + L) * D,
      );
    }
  }
}

console.log(`attention on ${adapterReport(gpu).description} (${full ? "full" : "small"} shapes)`);
if (dkdvSweep) {
  console.log(
    "dk/dv per thread tile (keys x queries), lane kernels with and without prefetch, each timed alone:",
  );
  console.table(sweepRows);
}
console.table(rows);
console.log("per dispatch (each timed alone, warmed):");
for (const r of kernelRows) {
  if (typeof r["before ms"] === "number" && typeof r["after ms"] === "number") {
    r.speedup = +(r["before ms"] / r["after ms"]).toFixed(2);
  }
}
console.table(kernelRows);

for (const { name, ops } of replay) {
  Deno.bench(name, async () => {
    runOps(gpu, ops);
    await gpu.device.queue.onSubmittedWorkDone();
  });
}
