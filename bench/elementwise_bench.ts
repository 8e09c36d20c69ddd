/**
 * Benchmarks of the memory-bound kernels at the model shapes: RMSNorm/LayerNorm, RoPE, SwiGLU/GELU, the
 * decode step's KV-cache append with RoPE (`kvCacheAppendRope`, against RoPE q+k plus `kvCacheAppend`),
 * the chunked cross-entropy with its LM head, and AdamW. GPU time comes from timestamp queries around many
 * repetitions in one pass (`timeOps`); the table printed at start-up gives GB/s (or GFLOP/s for the
 * cross-entropy, which is matmul-bound), and each `Deno.bench` entry submits the recorded ops and waits.
 * The real shapes (N = B*T = 2048 and decode N = 1) run when `PROMPTGATE_BENCH_FULL=1` or, by default,
 * when the adapter is not a software fallback; otherwise small shapes keep the CPU device quick. On
 * `shader-f16` devices, RMSNorm and SwiGLU also run with f16 activations (gradients stay f32).
 *
 * @module
 */

import { benchFull, warmTiming } from "./_shared.ts";
import { adapterReport, getGpu } from "../src/gpu/device.ts";
import { type Op, Recorder, runOps } from "../src/gpu/recorder.ts";
import { createTensor, type Tensor, tensorFrom } from "../src/gpu/tensor.ts";
import { timeOpsWarm } from "../src/gpu/timing.ts";
import { f32ArrayToF16 } from "../src/io/dtype.ts";
import { layernormBackward, layernormForward, rmsnormBackward, rmsnormForward } from "../kernels/norm.ts";
import { ropeBackwardInPlace, ropeInPlace } from "../kernels/rope.ts";
import { geluBackward, geluForward, swigluBackward, swigluForward } from "../kernels/activation.ts";
import { createCrossEntropyScratch, crossEntropyLmHead } from "../kernels/cross_entropy.ts";
import { adamwStep, gradNormSquared, packHyper } from "../kernels/adamw.ts";
import { kvCacheAppend, kvCacheAppendRope } from "../kernels/kv_cache.ts";

const gpu = await getGpu();
const full = benchFull(gpu);

interface Model {
  name: string;
  C: number;
  I: number;
  H: number;
  Hkv: number;
  D: number;
  V: number;
  gelu: boolean;
}
const MODELS: Model[] = [
  { name: "gpt2-124M", C: 768, I: 3072, H: 12, Hkv: 12, D: 64, V: 50257, gelu: true },
  { name: "SmolLM2-135M", C: 576, I: 1536, H: 9, Hkv: 3, D: 64, V: 49152, gelu: false },
  { name: "TinyLlama-1.1B", C: 2048, I: 5632, H: 32, Hkv: 4, D: 64, V: 32000, gelu: false },
];
const ROWS = full ? [2048, 1] : [16, 1];

function random(n: number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  let s = 12345;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    a[i] = ((s / 4294967296) * 2 - 1) * scale;
  }
  return a;
}
const t = (n: number, scale = 1, shape?: number[]): Tensor => tensorFrom(gpu, random(n, scale), shape);
const h = (n: number): Tensor => tensorFrom(gpu, f32ArrayToF16(random(n))); // an f16 activation

interface Case {
  name: string;
  ops: Op[];
  /** Bytes moved, or FLOPs when `flops` is set. */
  work: number;
  flops?: boolean;
}
const cases: Case[] = [];
function add(name: string, work: number, record: (rec: Recorder) => void, flops = false): void {
  const rec = new Recorder(gpu);
  record(rec);
  cases.push({ name, ops: rec.take(), work, flops });
}

for (const m of MODELS) {
  for (const N of ROWS) {
    const tag = `${m.name} N=${N}`;
    const x = t(N * m.C), out = t(N * m.C), dx = t(N * m.C), w = t(m.C), b = t(m.C);
    const rstd = t(N), mean = t(N);
    if (m.gelu) {
      add(`layernorm fwd ${tag}`, 8 * N * m.C, (r) => layernormForward(r, out, mean, rstd, x, w, b, 1e-5));
      add(`layernorm bwd ${tag}`, 12 * N * m.C, (r) => layernormBackward(r, dx, out, x, w, mean, rstd));
      const a = t(N * m.I), ao = t(N * m.I), ad = t(N * m.I);
      add(`gelu fwd ${tag}`, 8 * N * m.I, (r) => geluForward(r, ao, a));
      add(`gelu bwd ${tag}`, 12 * N * m.I, (r) => geluBackward(r, ad, ao, a));
    } else {
      add(`rmsnorm fwd ${tag}`, 8 * N * m.C, (r) => rmsnormForward(r, out, rstd, x, w, 1e-5));
      add(`rmsnorm bwd ${tag}`, 12 * N * m.C, (r) => rmsnormBackward(r, dx, out, x, w, rstd));
      const inv = t(m.D / 2, 0.5), pos = tensorFrom(gpu, new Int32Array(N).map((_, i) => i));
      const q = t(N * m.H * m.D), k = t(N * m.Hkv * m.D);
      const ropeBytes = 8 * N * (m.H + m.Hkv) * m.D;
      add(`rope q+k fwd ${tag}`, ropeBytes, (r) => {
        ropeInPlace(r, q, inv, pos, m.H);
        ropeInPlace(r, k, inv, pos, m.Hkv);
      });
      add(`rope q+k bwd ${tag}`, ropeBytes, (r) => {
        ropeBackwardInPlace(r, q, inv, pos, m.H);
        ropeBackwardInPlace(r, k, inv, pos, m.Hkv);
      });
      if (N === 1) {
        // decode: rotate q and k and append k, v to a 256-position cache, fused and as three dispatches
        const maxLen = 256, width = m.Hkv * m.D;
        const kc = t(maxLen * width), vc = t(maxLen * width), v = t(N * width);
        const mask = tensorFrom(gpu, new Int32Array(maxLen));
        const state = tensorFrom(gpu, new Uint32Array([100, 0, 0, 0]));
        const bytes = ropeBytes + 12 * N * width;
        const opts = { batch: 1, tokens: 1, numHeads: m.H, numKvHeads: m.Hkv, maxLen };
        add(`rope + kv append fused ${tag}`, bytes, (r) => {
          kvCacheAppendRope(r, kc, vc, mask, q, k, v, inv, pos, state, opts);
        });
        add(`rope q+k, kv append ${tag}`, bytes, (r) => {
          ropeInPlace(r, q, inv, pos, m.H);
          ropeInPlace(r, k, inv, pos, m.Hkv);
          kvCacheAppend(r, kc, vc, mask, k, v, state, { batch: 1, tokens: 1, width, maxLen });
        });
      }
      const gate = t(N * m.I), up = t(N * m.I), so = t(N * m.I), dg = t(N * m.I), du = t(N * m.I);
      add(`swiglu fwd ${tag}`, 12 * N * m.I, (r) => swigluForward(r, so, gate, up));
      add(`swiglu bwd ${tag}`, 20 * N * m.I, (r) => swigluBackward(r, dg, du, so, gate, up));
      if (gpu.hasF16) {
        const x16 = h(N * m.C), out16 = h(N * m.C), g16 = h(N * m.I), u16 = h(N * m.I), a16 = h(N * m.I);
        add(`rmsnorm fwd f16 ${tag}`, 4 * N * m.C, (r) => rmsnormForward(r, out16, rstd, x16, w, 1e-5));
        add(`rmsnorm bwd f16 x ${tag}`, 10 * N * m.C, (r) => rmsnormBackward(r, dx, out, x16, w, rstd));
        add(`swiglu fwd f16 ${tag}`, 6 * N * m.I, (r) => swigluForward(r, a16, g16, u16));
        add(`swiglu bwd f16 g,u ${tag}`, 16 * N * m.I, (r) => swigluBackward(r, dg, du, so, g16, u16));
      }
    }
    if (N > 1) {
      const V = full ? m.V : 2048;
      const hidden = t(N * m.C), head = t(V * m.C, 0.05, [V, m.C]), dHidden = t(N * m.C), loss = t(1);
      const labels = tensorFrom(gpu, new Int32Array(N).map((_, i) => (i * 7919) % V));
      const scratch = createCrossEntropyScratch(gpu, N, V, m.C);
      add(
        `cross-entropy+head fwd+bwd ${tag} V=${V}`,
        3 * 2 * N * V * m.C,
        (r) => crossEntropyLmHead(r, { loss, dHidden, hidden, weight: head, labels, scratch }),
        true,
      );
    }
  }
}
{
  const P = full ? 1 << 24 : 1 << 16;
  const param = t(P), grad = t(P, 0.01), m = createTensor(gpu, [P]), v = createTensor(gpu, [P]);
  const hyper = tensorFrom(
    gpu,
    packHyper({ lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, step: 3, maxGradNorm: 1 }),
  );
  const norm = t(1);
  add(`grad norm² P=${P}`, 4 * P, (r) => gradNormSquared(r, norm, grad));
  add(`adamw step P=${P}`, 28 * P, (r) => adamwStep(r, { param, grad, m, v, hyper, gradNormSq: norm }));
}

const rows: Record<string, string>[] = [];
for (const c of cases) {
  const { ms, timestamps } = await timeOpsWarm(gpu, c.ops, warmTiming(full));
  const rate = c.work / (ms * 1e-3) / 1e9;
  rows.push({
    kernel: c.name,
    "µs": (ms * 1e3).toFixed(1),
    rate: c.flops ? `${rate.toFixed(1)} GFLOP/s` : `${rate.toFixed(1)} GB/s`,
    clock: timestamps ? "gpu" : "wall",
  });
}
console.log(`\n${adapterReport(gpu).description} (${full ? "full" : "small"} shapes, warm median timing)`);
console.table(rows);

for (const c of cases) {
  Deno.bench(c.name, async () => {
    runOps(gpu, c.ops);
    await gpu.device.queue.onSubmittedWorkDone();
  });
}
