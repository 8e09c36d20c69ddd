/**
 * Fused decode products (kernels/decode_matvec.ts) against the unfused sequences they replace, at the
 * decode shapes of TinyLlama-1.1B (C 2048, I 5632, Hkv*D 256), gpt2-124M (C 768, I 3072) and, for the
 * one-dispatch q/k/v, SmolLM2-135M (C 576, Hkv*D 192), M = 1 and M = 4 rows, f32 and f16 weights:
 *
 * | case | unfused | fused |
 * | --- | --- | --- |
 * | llama q_proj | rmsnormForward, linearForward | decodeLinearForward (rms) |
 * | llama q,k,v | rmsnormForward, 3 linearForward | 3 decodeLinearForward (rms) |
 * | llama / smollm2 qkv one dispatch | 3 decodeLinearForward (rms) | decodeQkvForward (rms) |
 * | llama mlp in | rmsnormForward, 2 linearForward, swigluForward | decodeSwigluForward (rms) |
 * | llama down_proj | linearForward (accumulate) | decodeLinearForward (accumulate) |
 * | gpt2 q,k,v | layernormForward, 3 linearForward (bias) | 3 decodeLinearForward (layer) |
 * | gpt2 c_fc | layernormForward, linearForward (bias), geluForward | decodeLinearForward (layer, gelu_new) |
 * | gpt2 mlp c_proj | linearForward (bias, accumulate) | decodeLinearForward (bias, accumulate) |
 *
 * Each figure is the median GPU time (timestamp queries) of windows of many repetitions of the recorded
 * sequence in one pass, after a warm-up (`timeOpsWarm`), and GB/s of weight streamed. Repeating the same
 * product keeps weights under ~50 MB in L2 (as in bench/matmul_bench.ts), so the GB/s can pass HBM's.
 * Full shapes run with `PROMPTGATE_BENCH_FULL=1` (the default on a real GPU); a fallback adapter gets small
 * stand-ins (C 64).
 *
 * Run: `deno bench --allow-read --allow-write --allow-env bench/decode_matvec_bench.ts`
 *
 * @module
 */

import { benchFull, warmTiming } from "./_shared.ts";
import { adapterReport, getGpu } from "../src/gpu/device.ts";
import { type Op, Recorder, runOps } from "../src/gpu/recorder.ts";
import { createTensor, type DType, type Tensor, writeTensor } from "../src/gpu/tensor.ts";
import { timeOpsWarm } from "../src/gpu/timing.ts";
import { linearForward } from "../kernels/matmul.ts";
import { layernormForward, rmsnormForward } from "../kernels/norm.ts";
import { geluForward, swigluForward } from "../kernels/activation.ts";
import {
  decodeLinearForward,
  decodeQkvForward,
  decodeSwigluForward,
  type MatvecPrologue,
} from "../kernels/decode_matvec.ts";

const gpu = await getGpu();
const full = benchFull(gpu);
const EPS = 1e-5;

function randomTensor(shape: number[], dtype: DType, scale = 0.05): Tensor {
  const t = createTensor(gpu, shape, dtype, "bench");
  const n = shape.reduce((a, b) => a * b, 1);
  const f = new Float32Array(n);
  let s = 12345 + n;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    f[i] = ((s / 4294967296) * 2 - 1) * scale + (dtype === "f32" && scale === 1 ? 0.5 : 0);
  }
  writeTensor(gpu, t, dtype === "f16" ? new Uint16Array(new Float16Array(f).buffer) : f);
  return t;
}

interface Case {
  name: string;
  /** Weight elements streamed per sequence. */
  weights: number;
  /** Records the unfused and the fused sequence (same inputs, separate outputs). */
  record: (unfused: Recorder, fused: Recorder, M: number, dtype: DType) => void;
}

const llama = full ? { C: 2048, I: 5632, KV: 256 } : { C: 64, I: 160, KV: 16 };
const gpt2 = full ? { C: 768, I: 3072 } : { C: 64, I: 256 };
const smollm2 = full ? { C: 576, KV: 192 } : { C: 64, KV: 16 };
const f32t = (shape: number[], scale = 0.05) => randomTensor(shape, "f32", scale);

/** Norm weights and the stats the unfused norm saves. */
function norm(C: number, M: number) {
  return { w: f32t([C], 1), b: f32t([C]), mean: createTensor(gpu, [M]), rstd: createTensor(gpu, [M]) };
}

const cases: Case[] = [
  {
    name: "llama rmsnorm + q_proj",
    weights: llama.C * llama.C,
    record: (u, f, M, dtype) => {
      const { C } = llama;
      const x = f32t([M, C], 1);
      const n = norm(C, M);
      const w = randomTensor([C, C], dtype);
      const xn = createTensor(gpu, [M, C]);
      rmsnormForward(u, xn, n.rstd, x, n.w, EPS);
      linearForward(u, createTensor(gpu, [M, C]), xn, w, null);
      decodeLinearForward(f, createTensor(gpu, [M, C]), x, w, null, {
        prologue: { kind: "rms", weight: n.w, eps: EPS },
      });
    },
  },
  {
    name: "llama rmsnorm + q,k,v",
    weights: llama.C * (llama.C + 2 * llama.KV),
    record: (u, f, M, dtype) => {
      const { C, KV } = llama;
      const x = f32t([M, C], 1);
      const n = norm(C, M);
      const ws = [C, KV, KV].map((N) => randomTensor([N, C], dtype));
      const xn = createTensor(gpu, [M, C]);
      rmsnormForward(u, xn, n.rstd, x, n.w, EPS);
      const prologue: MatvecPrologue = { kind: "rms", weight: n.w, eps: EPS };
      for (const w of ws) {
        linearForward(u, createTensor(gpu, [M, w.shape[0]!]), xn, w, null);
        decodeLinearForward(f, createTensor(gpu, [M, w.shape[0]!]), x, w, null, { prologue });
      }
    },
  },
  // the same three products as three decodeLinearForward dispatches ("unfused") and as one
  ...([["llama", llama], ["smollm2", smollm2]] as const).map(([family, shape]): Case => ({
    name: `${family} q,k,v: 3 dispatches vs decodeQkvForward`,
    weights: shape.C * (shape.C + 2 * shape.KV),
    record: (u, f, M, dtype) => {
      const { C, KV } = shape;
      const x = f32t([M, C], 1);
      const prologue: MatvecPrologue = { kind: "rms", weight: norm(C, M).w, eps: EPS };
      const ws = [C, KV, KV].map((N) => randomTensor([N, C], dtype));
      const outs = () => [C, KV, KV].map((N) => createTensor(gpu, [M, N]));
      const [q, k, v] = outs() as [Tensor, Tensor, Tensor];
      ws.forEach((w, i) => decodeLinearForward(u, [q, k, v][i]!, x, w, null, { prologue }));
      const [fq, fk, fv] = outs() as [Tensor, Tensor, Tensor];
      decodeQkvForward(f, fq, fk, fv, x, ws[0]!, ws[1]!, ws[2]!, null, null, null, { prologue });
    },
  })),
  {
    name: "llama rmsnorm + gate,up + swiglu",
    weights: 2 * llama.I * llama.C,
    record: (u, f, M, dtype) => {
      const { C, I } = llama;
      const x = f32t([M, C], 1);
      const n = norm(C, M);
      const wg = randomTensor([I, C], dtype);
      const wu = randomTensor([I, C], dtype);
      const xn = createTensor(gpu, [M, C]);
      const g = createTensor(gpu, [M, I]);
      const up = createTensor(gpu, [M, I]);
      rmsnormForward(u, xn, n.rstd, x, n.w, EPS);
      linearForward(u, g, xn, wg, null);
      linearForward(u, up, xn, wu, null);
      swigluForward(u, createTensor(gpu, [M, I]), g, up);
      decodeSwigluForward(f, createTensor(gpu, [M, I]), x, wg, wu, {
        prologue: { kind: "rms", weight: n.w, eps: EPS },
      });
    },
  },
  {
    name: "llama down_proj (+= residual)",
    weights: llama.C * llama.I,
    record: (u, f, M, dtype) => {
      const { C, I } = llama;
      const x = f32t([M, I], 1);
      const w = randomTensor([C, I], dtype);
      linearForward(u, createTensor(gpu, [M, C]), x, w, null, { accumulate: true });
      decodeLinearForward(f, createTensor(gpu, [M, C]), x, w, null, { accumulate: true });
    },
  },
  {
    name: "gpt2 layernorm + q,k,v",
    weights: 3 * gpt2.C * gpt2.C,
    record: (u, f, M, dtype) => {
      const { C } = gpt2;
      const x = f32t([M, C], 1);
      const n = norm(C, M);
      const xn = createTensor(gpu, [M, C]);
      layernormForward(u, xn, n.mean, n.rstd, x, n.w, n.b, EPS);
      const prologue: MatvecPrologue = { kind: "layer", weight: n.w, bias: n.b, eps: EPS };
      for (let i = 0; i < 3; i++) {
        const w = randomTensor([C, C], dtype);
        const b = f32t([C]);
        linearForward(u, createTensor(gpu, [M, C]), xn, w, b);
        decodeLinearForward(f, createTensor(gpu, [M, C]), x, w, b, { prologue });
      }
    },
  },
  {
    name: "gpt2 layernorm + c_fc + gelu_new",
    weights: gpt2.I * gpt2.C,
    record: (u, f, M, dtype) => {
      const { C, I } = gpt2;
      const x = f32t([M, C], 1);
      const n = norm(C, M);
      const w = randomTensor([I, C], dtype);
      const b = f32t([I]);
      const xn = createTensor(gpu, [M, C]);
      const h = createTensor(gpu, [M, I]);
      layernormForward(u, xn, n.mean, n.rstd, x, n.w, n.b, EPS);
      linearForward(u, h, xn, w, b);
      geluForward(u, createTensor(gpu, [M, I]), h);
      decodeLinearForward(f, createTensor(gpu, [M, I]), x, w, b, {
        prologue: { kind: "layer", weight: n.w, bias: n.b, eps: EPS },
        epilogue: "gelu_new",
      });
    },
  },
  {
    name: "gpt2 mlp c_proj (+= residual)",
    weights: gpt2.C * gpt2.I,
    record: (u, f, M, dtype) => {
      const { C, I } = gpt2;
      const x = f32t([M, I], 1);
      const w = randomTensor([C, I], dtype);
      const b = f32t([C]);
      linearForward(u, createTensor(gpu, [M, C]), x, w, b, { accumulate: true });
      decodeLinearForward(f, createTensor(gpu, [M, C]), x, w, b, { accumulate: true });
    },
  },
];

const dtypes: DType[] = gpu.hasF16 ? ["f32", "f16"] : ["f32"];
const only = Deno.env.get("DECODE_MATVEC_BENCH_CASES")?.split(",");

function measure(ops: Op[]): Promise<{ ms: number; timestamps: boolean }> {
  return timeOpsWarm(gpu, ops, { ...warmTiming(full), maxRepeats: 4000 });
}

const dispatches = (ops: Op[]) => ops.filter((o) => o.kind === "dispatch").length;
/** Threads per output row and output rows per thread group of each fused dispatch, from its kernel key. */
const plans = (ops: Op[]) =>
  [
    ...new Set(ops.map((o) => {
      const opt = (k: string) => o.label.split("|").find((s) => s.startsWith(`${k}=`))?.split("=")[1];
      return `t${opt("threads")} nr${opt("nr")}`;
    })),
  ].join(", ");
const rows: Record<string, string | number>[] = [];
const benchOps: { name: string; ops: Op[] }[] = [];
for (const c of cases) {
  if (only && !only.some((o) => c.name.includes(o))) continue;
  for (const M of [1, 4]) {
    for (const dtype of dtypes) {
      const u = new Recorder(gpu);
      const f = new Recorder(gpu);
      c.record(u, f, M, dtype);
      const unfused = u.take();
      const fused = f.take();
      const a = await measure(unfused);
      const b = await measure(fused);
      const bytes = c.weights * (dtype === "f16" ? 2 : 4);
      rows.push({
        case: c.name,
        M,
        w: dtype,
        "unfused µs": Number((a.ms * 1000).toFixed(2)),
        "fused µs": Number((b.ms * 1000).toFixed(2)),
        dispatches: `${dispatches(unfused)} -> ${dispatches(fused)}`,
        "unfused GB/s": Number((bytes / a.ms / 1e6).toPrecision(4)),
        "fused GB/s": Number((bytes / b.ms / 1e6).toPrecision(4)),
        speedup: `${(a.ms / b.ms).toFixed(2)}x`,
        "fused plan": plans(fused),
        clock: b.timestamps ? "timestamps" : "wall",
      });
      console.error(JSON.stringify(rows[rows.length - 1]));
      if (M === 1 && dtype === dtypes[dtypes.length - 1]) {
        benchOps.push({ name: `${c.name} M=1 w=${dtype} unfused`, ops: unfused });
        benchOps.push({ name: `${c.name} M=1 w=${dtype} fused`, ops: fused });
      }
    }
  }
}
console.log(
  `decode matvec (kernels/decode_matvec.ts) on ${adapterReport(gpu).description} (${
    full ? "full" : "small"
  } shapes; GB/s of weight)`,
);
console.table(rows);
const jsonOut = Deno.env.get("PROMPTGATE_BENCH_JSON");
if (jsonOut) Deno.writeTextFileSync(jsonOut, JSON.stringify(rows));

// Deno.bench entries: wall time of submitting one recorded sequence and waiting for it (dominated by the
// submit/wait round trip; the table above is the GPU time).
for (const { name, ops } of benchOps.filter((b) => b.name.includes("swiglu") || b.name.includes("gelu"))) {
  Deno.bench(name, async () => {
    runOps(gpu, ops);
    await gpu.device.queue.onSubmittedWorkDone();
  });
}
