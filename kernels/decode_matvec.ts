/**
 * Fused matrix-vector products for decode. A decode step multiplies M ≤ 4 rows (one token per sequence)
 * by every weight of the layer, and each of those products is a small dispatch whose cost is mostly
 * latency (about 5-10 µs on an H100), so the norm before a projection, the activation after it, and the
 * gate/up pair of a llama MLP are folded into the product itself:
 * - `decodeLinearForward`: `out (+)= act(norm(x) Wᵀ + b)`, one dispatch instead of up to three;
 * - `decodeSwigluForward`: `out = silu(norm(x) Wgᵀ + bg) * (norm(x) Wuᵀ + bu)`, one instead of four;
 * - `decodeQkvForward`: q, k and v of one norm(x), one instead of three where the device's storage-binding
 *   limit allows (the small k/v products of GQA models are latency-bound on their own). Its workgroups are
 *   spread over the concatenated output rows, each within one of the three products, so the choice of
 *   weight, bias and output binding is uniform per workgroup: three code paths behind one branch. With
 *   `rope` (a replayed llama decode step) it also rotates q and k (HF `rotate_half`) and stores k and v
 *   straight into the KV cache, which `kvCacheAppendRope` would do in a dispatch of its own: the q and k
 *   workgroups own whole RoPE pairs (rows i and i + D/2 of one head) and meet them in workgroup memory.
 * Weights are HF `Linear` `(N, K)` ("nk"), f32 or f16 (read as vec4 / vec4<f16>); K must be a multiple of 4.
 *
 * The kernel is the "nk" matrix-vector kernel of kernels/matmul.ts (`matvecNkKernel`): T = 32-256
 * threads reduce an output row, 256 / T groups of them per workgroup, MV_UNROLL independent weight loads
 * in flight per thread, the M rows as compile-time accumulators, a tree reduction in workgroup memory.
 * Two additions: a group of threads may own NR = 1, 2 or 4 output rows, so that each load of x (and of
 * the norm weight) serves NR weight rows; and the reduced values of the M rows travel packed in vec4s.
 * The norm never writes a normed copy of x:
 * - RMSNorm: `y = rstd * sum_k W[n, k] (w[k] x[k])`. Every group of T threads reads the whole row of x
 *   anyway, so it accumulates `sum x²` in the same loop and reduces it with the dot products; rstd
 *   (`1 / sqrt(sum x² / K + eps)`, as `rmsnormForward`) scales the sum at the end. No extra pass and no
 *   extra barrier.
 * - LayerNorm: the workgroup first reduces the M row means over all its 256 threads (one workgroup
 *   reduction), then the loop accumulates `sum W (w (x - mean))`, `sum (x - mean)²` and `sum W b`;
 *   `y = rstd * sum W (w (x - mean)) + sum W b` with `rstd = 1 / sqrt(var + eps)`: the two-pass, biased
 *   variance of `layernormForward`, without cancellation for rows with a large mean.
 * Statistics are f32 throughout. The products differ from the unfused sequence only by f32 rounding (rstd
 * is applied to the sum instead of to each element).
 *
 * The activations x and out may each be f32 or f16 (their tensors' dtype): f16 x is read as vec4<f16> and
 * widened at the load, everything is computed in f32, and an f16 out is rounded once at the store (with
 * `accumulate`, `out += ...` reads the f16 value, adds in f32 and rounds the sum: an f16 residual stream).
 *
 * On an H200 (bench/decode_matvec_bench.ts) the fused dispatches take 0.5-0.7x the time of the unfused
 * sequences at TinyLlama and gpt2 decode shapes (RMSNorm + q_proj 11.2 -> 6.3 µs, RMSNorm + gate/up +
 * SwiGLU at M = 4 60 -> 34 µs), except LayerNorm + a 768x768 projection at M = 1, which breaks even: the
 * mean's workgroup reduction costs about what the saved dispatch did.
 *
 * Sizes travel in the uniform, and so do the bias / accumulate / gelu_new choices (a uniform branch in
 * the epilogue); the WGSL changes with the options in the kernel key (rows of x, threads per output row,
 * output rows per group, weight and activation dtypes, prologue, SwiGLU, q/k/v and whether its biases
 * are bound), one pipeline per combination.
 *
 * @module
 */

import {
  type ActivationType,
  activationType,
  defineKernel,
  enableF16,
  type Kernel,
} from "../src/gpu/kernel.ts";
import { f32, type Recorder } from "../src/gpu/recorder.ts";
import type { Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";
import { grid1d } from "./fill.ts";
import { kvCacheAppendRope } from "./kv_cache.ts";
import { MV_UNROLL, MV_WG, SMS } from "./matmul.ts";

/**
 * A norm applied to each row of x before the product, computed in the same dispatch (f32 statistics):
 * `rms`: `x̂ = x * rsqrt(mean(x²) + eps) * weight` (llama RMSNorm); `layer`:
 * `x̂ = (x - mean) * rsqrt(var + eps) * weight + bias` (gpt2 LayerNorm, biased variance). Weight and
 * bias are f32 of K elements.
 */
export type MatvecPrologue =
  | { kind: "rms"; weight: Tensor; eps: number }
  | { kind: "layer"; weight: Tensor; bias: Tensor; eps: number };

/** An activation applied to each output before it is stored or added: `gelu_new` is gpt2's tanh GELU. */
export type MatvecEpilogue = "none" | "gelu_new";

/**
 * Tuning knobs for tests and benchmarks: `threads` forces the threads that reduce one output row (32,
 * 64, 128 or 256); `rowsPerGroup` caps the output rows of a group of threads (fewer where the
 * accumulators or workgroup memory would not fit). `null` lets the plan choose (see `plan`).
 */
export const decodeMatvecTuning: {
  threads: 32 | 64 | 128 | 256 | null;
  rowsPerGroup: 1 | 2 | 4 | null;
} = { threads: null, rowsPerGroup: null };

// rows of x, threads per workgroup, loads in flight and multiprocessors: those of matmul.ts's matvec
/** Rows (sequences of a decode step) the fused kernels take. */
const MAX_M = 4;
const WG = MV_WG, UNROLL = MV_UNROLL;

/** Options that change the WGSL of the fused kernel. */
interface MatvecOptions {
  /** M, the rows of x (1-4). */
  rows: number;
  /** Threads that reduce one output row. */
  threads: number;
  /** Output rows (n) per group of threads: each x load serves that many weight rows. */
  nr: number;
  /** Weights are f16 (read as vec4<f16>). */
  f16: boolean;
  /** Element type of x. */
  xt: ActivationType;
  /** Element type of out. */
  ot: ActivationType;
  prologue: "none" | "rms" | "layer";
  /** Two weights (gate, up) and `silu(gate) * up`. */
  swiglu: boolean;
  /**
   * q, k and v of one x in one dispatch (see {@link decodeQkvForward}): three weights, outputs (`ot` is
   * q's, `kt` and `vt` those of k and v) and, with `bias`, three bias bindings; null for one product.
   * With `rope` (never with `bias`), q is stored rotated, and k rotated and v go into the KV cache
   * instead of outputs of their own: `kt` and `vt` are then the caches' element types.
   */
  qkv: { kt: ActivationType; vt: ActivationType; bias: boolean; rope: boolean } | null;
}

/**
 * Bits of the uniform's `flags`: what does not change the WGSL (a uniform branch in the epilogue), so
 * that these combinations share one pipeline.
 */
const FLAG_BIAS = 1;
const FLAG_UP_BIAS = 2;
const FLAG_ACCUMULATE = 4;
const FLAG_GELU = 8;
/** qkv: bits of the q, k and v biases (each absent one is bound to a present one, never read). */
const QKV_BIAS_FLAGS = [1, 2, 4] as const;
/** qkv: the three products, in output-row (workgroup) order: output, weight and bias binding names. */
const QKV_STREAMS = [["outQ", "wq", "bq"], ["outK", "wk", "bk"], ["outV", "wv", "bv"]] as const;

/** The storage bindings of a variant, in binding order (the uniform follows). */
function bindingNames(o: MatvecOptions): string[] {
  if (o.qkv) {
    const names = o.qkv.rope
      ? ["outQ", "kc", "vc", "mask", "a", "wq", "wk", "wv"]
      : ["outQ", "outK", "outV", "a", "wq", "wk", "wv"];
    if (o.qkv.bias) names.push("bq", "bk", "bv");
    if (o.prologue !== "none") names.push("nw");
    if (o.prologue === "layer") names.push("nb");
    if (o.qkv.rope) names.push("invFreq", "positions", "state");
    return names;
  }
  // the biases are always bound (x stands in for an absent one, never read: its flag is off)
  const names = ["out", "a", "wg"];
  if (o.swiglu) names.push("wu");
  names.push("bias");
  if (o.swiglu) names.push("biasUp");
  if (o.prologue !== "none") names.push("nw");
  if (o.prologue === "layer") names.push("nb");
  return names;
}

/** The vec4 groups reduced over the threads of a row (see {@link decodeMatvecKernel}). */
function reducedGroups(o: Pick<MatvecOptions, "nr" | "prologue" | "swiglu">): string[] {
  const swiglu = o.swiglu;
  const rs = [...Array(o.nr).keys()];
  return [
    ...rs.map((r) => `S${r}`),
    ...(swiglu ? rs.map((r) => `SU${r}`) : []),
    ...(o.prologue !== "none" ? ["Q"] : []),
    ...(o.prologue === "layer" ? ["TB", ...(swiglu ? ["TBU"] : [])] : []),
  ];
}

/** Workgroups below which the plan takes more threads per output row or fewer rows per group. */
const MIN_GROUPS = 96;

/**
 * The kernel options of a product of N outputs over K for `rows` rows of x: element types, prologue and
 * kind (SwiGLU, or q/k/v with its own output types), with threads and rows per group from {@link plan}.
 */
function matvecOptions(
  rec: Recorder,
  rows: number,
  w: Tensor,
  xt: ActivationType,
  ot: ActivationType,
  prologue: MatvecPrologue | undefined,
  N: number,
  K: number,
  kind: { swiglu?: boolean; qkv?: MatvecOptions["qkv"] } = {},
): MatvecOptions {
  const base = {
    rows,
    f16: w.dtype === "f16",
    xt,
    ot,
    prologue: prologue?.kind ?? "none",
    swiglu: kind.swiglu ?? false,
    qkv: kind.qkv ?? null,
  } as const;
  return { ...base, ...plan(rec, base, N, K, kind.qkv?.rope ?? false) };
}

/**
 * Chooses the threads per output row (T) and the output rows per thread group (NR) of a product, from
 * H200 measurements at the TinyLlama and gpt2 decode shapes (bench/decode_matvec_bench.ts):
 * - T from K as matmul.ts's matvec (about 8-16 vec4 loads per thread), then doubled while there are
 *   fewer than SMS workgroups and each thread keeps ≥ 4 loads (k_proj 256x2048: 32 -> 128 threads,
 *   15 -> 8 µs);
 * - NR: each x load and norm-weight load serves NR weight rows (gpt2 c_fc with LayerNorm at M = 4: 11.5
 *   -> 8.7 µs with NR 4). Only with a norm: without one, the extra rows cost more than the loads they
 *   save (down_proj at M = 4: 17.7 -> 20.5 µs with NR 4). The largest NR that keeps MIN_GROUPS
 *   workgroups, 16 vec4 accumulators per thread and the device's workgroup memory.
 * `decodeMatvecTuning` forces T, and caps NR. With `rope` (q/k/v with RoPE, {@link decodeQkvForward}) a
 * workgroup needs at least two output rows, one of each half of a RoPE pair: T is at most 128, and the
 * staged pairs (16 bytes per row of the workgroup) count against the workgroup memory.
 */
function plan(
  rec: Recorder,
  o: Omit<MatvecOptions, "threads" | "nr" | "qkv">,
  N: number,
  K: number,
  rope = false,
): { threads: number; nr: number } {
  const K4 = K / 4;
  const maxThreads = rope ? WG / 2 : WG;
  let threads: number = Math.min(decodeMatvecTuning.threads ?? WG, maxThreads);
  if (decodeMatvecTuning.threads === null) {
    for (const t of [32, 64, 128]) {
      if (K4 <= 16 * t) {
        threads = t;
        break;
      }
    }
    while (threads < maxThreads && Math.ceil(N / (WG / threads)) < SMS && K4 / (2 * threads) >= 4) {
      threads *= 2;
    }
  }
  const R = WG / threads;
  const streams = o.swiglu ? 2 : 1;
  const limit = rec.gpu.limits.maxComputeWorkgroupStorageSize;
  const cap = decodeMatvecTuning.rowsPerGroup;
  for (const nr of [4, 2]) {
    if (cap !== null ? nr > cap : o.prologue === "none" || Math.ceil(N / (R * nr)) < MIN_GROUPS) continue;
    if (nr * o.rows * streams > 16) continue;
    if ((reducedGroups({ ...o, nr }).length * WG + (rope ? R * nr : 0)) * 16 > limit) continue;
    return { threads, nr };
  }
  return { threads, nr: 1 };
}

/**
 * The fused kernel. Thread group `tid / T` of workgroup `g` (T threads) owns output rows
 * `n0 .. n0 + NR - 1`, `n0 = (g * R + tid / T) * NR`, and reduces them over the vec4 k indices
 * `lane, lane + T, ...`: per k it loads the NR weight vec4s, then x (and the norm weight) once for all of
 * them; the accumulators are vec4 (4 consecutive k). Reduced values are packed into vec4 groups of the rows
 * of x (component m = row m) so one tree reduction serves all of them: S{r} (the dot products of output
 * row r), SU{r} (the up projection's), Q (sum x² or sum (x - mean)², shared by the NR rows), TB / TBU
 * (sum W b of the norm bias, component r = output row r).
 */
function decodeMatvecKernel(o: MatvecOptions): Kernel {
  const names = bindingNames(o);
  const rope = o.qkv?.rope ?? false;
  const outputs = rope ? ["outQ", "kc", "vc", "mask"] : o.qkv ? ["outQ", "outK", "outV"] : ["out"];
  const kinds: ("read" | "write" | "uniform")[] = names.map((n) => outputs.includes(n) ? "write" : "read");
  kinds.push("uniform");
  const { qkv, ...single } = o;
  const key = qkv
    ? { ...single, qkv: true, kt: qkv.kt, vt: qkv.vt, bias: qkv.bias, ...(rope ? { rope: true } : {}) }
    : single;
  return defineKernel("decode_matvec", key, kinds, () => {
    const L: string[] = [];
    const emit = (s: string) => L.push(s);
    const ms = [...Array(o.rows).keys()];
    const rs = [...Array(o.nr).keys()];
    const T = o.threads;
    const R = WG / T;
    const U = UNROLL;
    const swiglu = o.swiglu;
    const pro = o.prologue;
    const wElem = o.f16 ? "vec4<f16>" : "vec4<f32>";
    const groups = reducedGroups(o);
    // vec4 k of row m of x as vec4<f32> (f16 widened; the f32 text stays as it was)
    const xAt = (m: number, kk: string) =>
      o.xt === "f32" ? `a[x${m} + ${kk}]` : `vec4<f32>(a[x${m} + ${kk}])`;
    const slot = (grp: string) => `${groups.indexOf(grp) * WG}u`;

    // the element type of each output binding
    const outType: Record<string, ActivationType> = rope
      ? { outQ: o.ot, kc: qkv!.kt, vc: qkv!.vt }
      : qkv
      ? { outQ: o.ot, outK: qkv.kt, outV: qkv.vt }
      : { out: o.ot };
    const enable = enableF16(o.f16 ? "f16" : "f32", o.xt, ...Object.values(outType));
    if (enable) emit(enable);
    emit(`struct P {`);
    if (qkv) {
      // workgroups [0, tilesQ) compute q, [tilesQ, tilesQK) k, [tilesQK, tiles) v
      emit(`  Nq: u32, Nk: u32, Nv: u32, K: u32, K4: u32, groupsX: u32, tiles: u32, tilesQ: u32,`);
      emit(`  tilesQK: u32, eps: f32, flags: u32, // 1 q bias, 2 k bias, 4 v bias`);
      // RoPE: D/2, the tokens per batch row of the M rows (T) and the cache positions per batch row
      if (rope) emit(`  half: u32, T: u32, maxLen: u32,`);
    } else {
      emit(`  N: u32, K: u32, K4: u32, ldc: u32, cOff: u32, groupsX: u32, tiles: u32, eps: f32,`);
      emit(`  flags: u32, // 1 bias, 2 up bias, 4 accumulate, 8 gelu_new`);
    }
    emit(`}`);
    names.forEach((name, i) => {
      const type = name in outType
        ? `array<${outType[name]}>`
        : name === "mask" || name === "positions"
        ? "array<i32>"
        : name === "state"
        ? "array<u32, 4>"
        : name === "invFreq"
        ? "array<f32>"
        : name === "bias" || name === "biasUp" || name === "bq" || name === "bk" || name === "bv"
        ? "array<f32>"
        : name === "wg" || name === "wu" || name === "wq" || name === "wk" || name === "wv"
        ? `array<${wElem}>`
        : name === "a"
        ? `array<vec4<${o.xt}>>`
        : "array<vec4<f32>>";
      const access = outputs.includes(name) ? "read_write" : "read";
      emit(`@group(0) @binding(${i}) var<storage, ${access}> ${name}: ${type};`);
    });
    emit(`@group(0) @binding(${names.length}) var<uniform> p: P;`);
    emit(`var<workgroup> red: array<vec4<f32>, ${WG * groups.length}>;`);
    // RoPE: a workgroup's RT = R * NR output rows of q or k are P = RT / 2 pairs (i, i + D/2) of one
    // head each, pairs t * P .. t * P + P - 1 of the product (pair p: head p / (D/2), i = p % (D/2));
    // local rows [0, P) are their first elements, [P, RT) their second ones, so both halves of a pair
    // are reduced by one workgroup and meet in `rot` (the q / k rows of a pair past the product's end
    // are N: computed on row N - 1, never stored). v keeps consecutive rows.
    const RT = R * o.nr, P = RT / 2;
    if (rope) {
      emit(`var<workgroup> rot: array<vec4<f32>, ${RT}>;`);
      emit(`fn ropeRow(seg: u32, t: u32, l: u32, N: u32, half: u32) -> u32 {`);
      emit(`  if (seg == 2u) { return t * ${RT}u + l; }`);
      emit(`  let pp = t * ${P}u + l % ${P}u;`);
      emit(`  if (pp >= N / 2u) { return N; }`);
      emit(`  return (pp / half) * 2u * half + pp % half + select(0u, half, l >= ${P}u);`);
      emit(`}`);
    }
    if (!swiglu && !qkv) {
      // gelu_new as kernels/activation.ts computes it (tanh argument clamped: some drivers give NaN past ~44)
      emit(`const K0: f32 = 0.7978845608028654;`);
      emit(`const K1: f32 = 0.044715;`);
    }
    emit(`@compute @workgroup_size(${WG})`);
    emit(`fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) lid: vec3u) {`);
    emit(`  let g = wid.x + wid.y * p.groupsX; // folded into y past 65535 workgroups`);
    emit(`  if (g >= p.tiles) { return; }`);
    if (qkv) {
      // the product of this workgroup (0 q, 1 k, 2 v), its rows and its tile within them: uniform over
      // the workgroup, so the branches on it below do not diverge
      emit(`  let seg = select(select(2u, 1u, g < p.tilesQK), 0u, g < p.tilesQ);`);
      emit(`  let N = select(select(p.Nv, p.Nk, seg == 1u), p.Nq, seg == 0u);`);
      emit(`  let t = g - select(select(p.tilesQK, p.tilesQ, seg == 1u), 0u, seg == 0u);`);
    } else {
      emit(`  let N = p.N;`);
      emit(`  let t = g;`);
    }
    emit(`  let tid = lid.x;`);
    emit(`  let lane = tid % ${T}u;`);
    if (rope) {
      emit(`  let l0 = (tid / ${T}u) * ${o.nr}u; // the group's first row within the workgroup`);
      for (const r of rs) emit(`  let n${r} = ropeRow(seg, t, l0 + ${r}u, N, p.half);`);
    } else {
      emit(`  let n0 = (t * ${R}u + tid / ${T}u) * ${o.nr}u;`);
    }
    const rowOf = (r: number) => rope ? `n${r}` : `n0 + ${r}u`;
    // rows past N read row N - 1 (their results are not stored)
    for (const r of rs) emit(`  let wrow${r} = min(${rowOf(r)}, N - 1u) * p.K4;`);
    for (const m of ms) emit(`  let x${m} = ${m}u * p.K4;`);

    if (pro === "layer") {
      // row means over the whole workgroup first: the loop below needs them
      emit(`  var msum = vec4<f32>(0.0);`);
      emit(`  for (var k = tid; k < p.K4; k += ${WG}u) {`);
      const comps = [0, 1, 2, 3].map((m) => m < o.rows ? `dot(${xAt(m, "k")}, vec4<f32>(1.0))` : "0.0");
      emit(`    msum += vec4<f32>(${comps.join(", ")});`);
      emit(`  }`);
      emit(`  red[tid] = msum;`);
      emit(`  workgroupBarrier();`);
      for (let s = WG / 2; s >= 1; s /= 2) {
        emit(`  if (tid < ${s}u) { red[tid] += red[tid + ${s}u]; }`);
        emit(`  workgroupBarrier();`);
      }
      emit(`  let mean = red[0] / f32(p.K);`);
      emit(`  workgroupBarrier(); // red is reused by the reduction below`);
      for (const m of ms) emit(`  let mean${m} = mean.${"xyzw"[m]};`);
    }

    for (const r of rs) {
      for (const m of ms) {
        emit(`  var s${r}_${m} = vec4<f32>(0.0);`);
        if (swiglu) emit(`  var su${r}_${m} = vec4<f32>(0.0);`);
      }
      if (pro === "layer") {
        emit(`  var tb${r} = vec4<f32>(0.0);`);
        if (swiglu) emit(`  var tbu${r} = vec4<f32>(0.0);`);
      }
    }
    if (pro !== "none") { for (const m of ms) emit(`  var q${m} = vec4<f32>(0.0);`); }

    // the weight vec4s (of NR rows of weight binding wg, and of the up weight) at vec4 index kk: the
    // loads come first, so that all U * NR loads of an iteration are in flight before the first multiply
    // waits on one
    const load = (kk: string, w: string, wg: string) => {
      const s: string[] = [];
      for (const r of rs) {
        s.push(`let ${w}_${r} = vec4<f32>(${wg}[wrow${r} + ${kk}]);`);
        if (swiglu) s.push(`let ${w}u_${r} = vec4<f32>(wu[wrow${r} + ${kk}]);`);
      }
      return s;
    };
    const body = (kk: string, w: string) => {
      const s: string[] = [];
      if (pro !== "none") s.push(`let nw_ = nw[${kk}];`);
      if (pro === "layer") {
        s.push(`let nb_ = nb[${kk}];`);
        for (const r of rs) {
          s.push(`tb${r} = fma(${w}_${r}, nb_, tb${r});`);
          if (swiglu) s.push(`tbu${r} = fma(${w}u_${r}, nb_, tbu${r});`);
        }
      }
      for (const m of ms) {
        s.push(`{`);
        s.push(`  let xv = ${xAt(m, kk)}${pro === "layer" ? ` - mean${m}` : ""};`);
        if (pro !== "none") {
          s.push(`  q${m} = fma(xv, xv, q${m});`);
          s.push(`  let xn = xv * nw_;`); // rstd is applied to the sums
        }
        const xn = pro === "none" ? "xv" : "xn";
        for (const r of rs) {
          s.push(`  s${r}_${m} = fma(${w}_${r}, ${xn}, s${r}_${m});`);
          if (swiglu) s.push(`  su${r}_${m} = fma(${w}u_${r}, ${xn}, su${r}_${m});`);
        }
        s.push(`}`);
      }
      return s;
    };
    // the reduction over k of weight binding wg, indented by `ind`
    const loops = (ind: string, wg: string) => {
      emit(`${ind}var k = lane;`);
      emit(`${ind}loop {`);
      emit(`${ind}  if (k + ${(U - 1) * T}u >= p.K4) { break; }`);
      for (let u = 0; u < U; u++) for (const s of load(`k + ${u * T}u`, `w${u}`, wg)) emit(`${ind}  ${s}`);
      for (let u = 0; u < U; u++) {
        emit(`${ind}  {`);
        for (const s of body(`k + ${u * T}u`, `w${u}`)) emit(`${ind}    ${s}`);
        emit(`${ind}  }`);
      }
      emit(`${ind}  k += ${U * T}u;`);
      emit(`${ind}}`);
      emit(`${ind}loop {`);
      emit(`${ind}  if (k >= p.K4) { break; }`);
      for (const s of load("k", "wr", wg)) emit(`${ind}  ${s}`);
      for (const s of body("k", "wr")) emit(`${ind}  ${s}`);
      emit(`${ind}  k += ${T}u;`);
      emit(`${ind}}`);
    };
    // qkv: one code path per weight binding (WGSL cannot choose a binding at run time)
    const perStream = (f: (ind: string, s: number) => void) => {
      for (let s = 0; s < 3; s++) {
        emit(s === 0 ? `  if (seg == 0u) {` : s === 1 ? `  } else if (seg == 1u) {` : `  } else {`);
        f("    ", s);
      }
      emit(`  }`);
    };
    if (qkv) perStream((ind, s) => loops(ind, QKV_STREAMS[s]![1]));
    else loops("  ", "wg");

    // pack the per-thread sums (component m = row m of x, or r = output row) and reduce them over the
    // T threads of the group
    const hsum = (v: string) => `dot(${v}, vec4<f32>(1.0))`;
    const pack = (name: (i: number) => string, count: number) => {
      const c = [0, 1, 2, 3].map((i) => i < count ? hsum(name(i)) : "0.0");
      return `vec4<f32>(${c.join(", ")})`;
    };
    for (const r of rs) {
      emit(`  red[${slot(`S${r}`)} + tid] = ${pack((m) => `s${r}_${m}`, o.rows)};`);
      if (swiglu) emit(`  red[${slot(`SU${r}`)} + tid] = ${pack((m) => `su${r}_${m}`, o.rows)};`);
    }
    if (pro !== "none") emit(`  red[${slot("Q")} + tid] = ${pack((m) => `q${m}`, o.rows)};`);
    if (pro === "layer") {
      emit(`  red[${slot("TB")} + tid] = ${pack((r) => `tb${r}`, o.nr)};`);
      if (swiglu) emit(`  red[${slot("TBU")} + tid] = ${pack((r) => `tbu${r}`, o.nr)};`);
    }
    emit(`  workgroupBarrier();`);
    for (let stride = T / 2; stride >= 1; stride /= 2) {
      emit(`  if (lane < ${stride}u) {`);
      for (const grp of groups) {
        emit(`    red[${slot(grp)} + tid] += red[${slot(grp)} + tid + ${stride}u];`);
      }
      emit(`  }`);
      emit(`  workgroupBarrier();`);
    }

    // the statistics of the group's rows, in lane 0
    const stats = (ind: string) => {
      if (pro !== "none") {
        // rmsnormForward: 1 / sqrt(sum x² / C + eps); layernormForward: 1 / sqrt(sum (x - mean)² / C + eps)
        emit(`${ind}let rstd = 1.0 / sqrt(red[${slot("Q")} + tid] / f32(p.K) + p.eps);`);
      }
      if (pro === "layer") {
        emit(`${ind}let tb = red[${slot("TB")} + tid];`);
        if (swiglu) emit(`${ind}let tbu = red[${slot("TBU")} + tid];`);
      }
    };
    if (!rope) {
      emit(`  if (lane != 0u) { return; }`);
      stats("  ");
    }
    // one vec4 of outputs (component m = row m of x) of output row n, before the activation; `bias`
    // null: no bias binding
    const value = (
      ind: string,
      name: string,
      grp: string,
      tb: string,
      r: number,
      bias: { name: string; flag: number } | null,
    ) => {
      let v = `red[${slot(grp)} + tid]`;
      if (pro !== "none") v = `${v} * rstd`;
      if (pro === "layer") v = `${v} + ${tb}.${"xyzw"[r]}`;
      emit(`${ind}var ${name} = ${v};`);
      if (bias) emit(`${ind}if ((p.flags & ${bias.flag}u) != 0u) { ${name} += ${bias.name}[n]; }`);
    };
    // the NR output rows of the group into binding `out` (row length `ldc`, first column `cOff`)
    const store = (
      ind: string,
      out: string,
      ldc: string,
      cOff: string,
      bias: { name: string; flag: number } | null,
    ) => {
      for (const r of rs) {
        emit(`${ind}{`);
        emit(`${ind}  let n = n0 + ${r}u;`);
        emit(`${ind}  if (n < N) {`);
        const i4 = `${ind}    `;
        value(i4, "y", `S${r}`, "tb", r, bias);
        if (swiglu) {
          value(i4, "yu", `SU${r}`, "tbu", r, { name: "biasUp", flag: FLAG_UP_BIAS });
          emit(`${i4}y = y / (1.0 + exp(-y)) * yu; // silu(gate) * up, as swigluForward`);
        } else if (!qkv) {
          emit(`${i4}if ((p.flags & ${FLAG_GELU}u) != 0u) {`);
          emit(
            `${i4}  y = 0.5 * y * (1.0 + tanh(clamp(K0 * (y + K1 * y * y * y), vec4<f32>(-15.0), vec4<f32>(15.0))));`,
          );
          emit(`${i4}}`);
        }
        for (const m of ms) {
          const idx = `${m}u * ${ldc} + ${cOff}n`;
          const v = `y.${"xyzw"[m]}`;
          // f16: read as f32, add in f32, round once
          const f16 = outType[out] === "f16";
          const set = f16 ? `${out}[${idx}] = f16(${v});` : `${out}[${idx}] = ${v};`;
          if (qkv) {
            emit(`${i4}${set}`);
            continue;
          }
          const add = f16 ? `${out}[${idx}] = f16(f32(${out}[${idx}]) + ${v});` : `${out}[${idx}] += ${v};`;
          emit(`${i4}if ((p.flags & ${FLAG_ACCUMULATE}u) != 0u) { ${add} } else { ${set} }`);
        }
        emit(`${ind}  }`);
        emit(`${ind}}`);
      }
    };
    // q / k: lane 0 of each group stages its rows in `rot`; after a barrier, thread u < P rotates pair
    // u (as kvCacheAppendRope) and stores it, q in place of the plain product, k into the cache row of
    // each row m of x (batch row m / T at state[0] + m % T, dropped at or past maxLen) with the mask set
    // to 1 there. v: lane 0 stores its rows into the cache rows directly.
    const ropeEpilogue = (): void => {
      const c = (m: number) => "xyzw"[m];
      const cast = (t: ActivationType, v: string) => t === "f16" ? `f16(${v})` : v;
      emit(`  if (lane == 0u) {`);
      stats("    ");
      for (const r of rs) {
        emit(`    if (n${r} < N) {`);
        value("      ", "y", `S${r}`, "tb", r, null);
        emit(`      if (seg == 2u) {`);
        for (const m of ms) {
          emit(`        {`);
          emit(`          let j = state[0] + ${m}u % p.T; // cache position`);
          emit(`          if (j < p.maxLen) {`);
          emit(`            vc[((${m}u / p.T) * p.maxLen + j) * N + n${r}] = ${cast(qkv!.vt, `y.${c(m)}`)};`);
          emit(`          }`);
          emit(`        }`);
        }
        emit(`      } else {`);
        emit(`        rot[l0 + ${r}u] = y;`);
        emit(`      }`);
        emit(`    }`);
      }
      emit(`  }`);
      emit(`  workgroupBarrier();`);
      emit(`  if (seg == 2u || tid >= ${P}u) { return; }`);
      emit(`  let pp = t * ${P}u + tid;`);
      emit(`  if (pp >= N / 2u) { return; }`);
      emit(`  let i = pp % p.half;`);
      emit(`  let e0 = (pp / p.half) * 2u * p.half + i; // element i of the pair's head`);
      emit(`  let f = invFreq[i];`);
      emit(`  let h1 = rot[tid]; // the first and second halves of the pair`);
      emit(`  let h2 = rot[tid + ${P}u];`);
      for (const m of ms) {
        emit(`  {`);
        emit(`    let angle = f32(positions[${m}]) * f;`);
        emit(`    let c = cos(angle);`);
        emit(`    let s = sin(angle);`);
        emit(`    let r1 = h1.${c(m)} * c - h2.${c(m)} * s;`);
        emit(`    let r2 = h2.${c(m)} * c + h1.${c(m)} * s;`);
        emit(`    if (seg == 0u) {`);
        emit(`      outQ[${m}u * N + e0] = ${cast(o.ot, "r1")};`);
        emit(`      outQ[${m}u * N + e0 + p.half] = ${cast(o.ot, "r2")};`);
        emit(`    } else {`);
        emit(`      let b = ${m}u / p.T;`);
        emit(`      let j = state[0] + ${m}u % p.T; // cache position`);
        emit(`      if (j < p.maxLen) {`);
        emit(`        let dst = (b * p.maxLen + j) * N + e0;`);
        emit(`        kc[dst] = ${cast(qkv!.kt, "r1")};`);
        emit(`        kc[dst + p.half] = ${cast(qkv!.kt, "r2")};`);
        emit(`        if (pp == 0u) { mask[b * p.maxLen + j] = 1; }`);
        emit(`      }`);
        emit(`    }`);
        emit(`  }`);
      }
    };
    if (rope) {
      ropeEpilogue();
    } else if (qkv) {
      perStream((ind, s) => {
        const [out, , bias] = QKV_STREAMS[s]!;
        store(ind, out, "N", "", qkv.bias ? { name: bias, flag: QKV_BIAS_FLAGS[s]! } : null);
      });
    } else {
      store("  ", "out", "p.ldc", "p.cOff + ", { name: "bias", flag: FLAG_BIAS });
    }
    emit(`}`);
    return L.join("\n");
  });
}

/**
 * Whether the fused kernels can take a product of M rows by an "nk" weight: 1 ≤ M ≤ 4, K a positive
 * multiple of 4, the weight 2-D `(N, K)` and f32 or f16. x and out may be f32 or f16 in any case (K a
 * multiple of 4 keeps f16 x's vec4 loads aligned). (f16 also needs `shader-f16`, which
 * {@link decodeLinearForward} checks against the recorder's GPU.)
 *
 * @param M Rows of x.
 * @param K Input features (the reduction length).
 * @param w The weight, `(N, K)`.
 * @returns Whether {@link decodeLinearForward} / {@link decodeSwigluForward} accept it.
 * @example Fall back to the unfused sequence for prefill
 * ```ts ignore
 * if (decodeMatvecApplies(M, C, layer.q.weight)) decodeLinearForward(rec, q, x, layer.q.weight, null, { prologue });
 * else { rmsnormForward(rec, xn, rstd, x, normW, eps); linearForward(rec, q, xn, layer.q.weight, null); }
 * ```
 */
export function decodeMatvecApplies(M: number, K: number, w: Tensor): boolean {
  return Number.isInteger(M) && M >= 1 && M <= MAX_M && K > 0 && K % 4 === 0 && w.shape.length === 2 &&
    w.shape[1] === K && (w.dtype === "f32" || w.dtype === "f16");
}

function fail(what: string, message: string): never {
  throw new GpuError(`${what}: ${message}`);
}

/** Checks the weight and x; returns (N, K, M) and the element type of x. */
function checkProduct(
  rec: Recorder,
  what: string,
  x: Tensor,
  w: Tensor,
): [number, number, number, ActivationType] {
  if (w.shape.length !== 2) fail(what, `weight ${w.label} must be 2-D (N, K), got [${w.shape}]`);
  const [N, K] = w.shape as [number, number];
  if (w.dtype !== "f32" && w.dtype !== "f16") {
    fail(what, `weight ${w.label} must be f32 or f16, got ${w.dtype}`);
  }
  if (w.dtype === "f16" && !rec.gpu.hasF16) {
    fail(what, `weight ${w.label} is f16 but this GPU lacks shader-f16; load the weights as f32`);
  }
  if (K <= 0 || K % 4 !== 0) {
    fail(
      what,
      `K = ${K} (weight ${w.label} [${w.shape}]) must be a positive multiple of 4; use linearForward`,
    );
  }
  const xt = activationType(rec.gpu, x, `${what} x`);
  if (x.size % K !== 0) fail(what, `input ${x.label} [${x.shape}] is not a whole number of rows of ${K}`);
  const M = x.size / K;
  if (M < 1 || M > MAX_M) {
    fail(
      what,
      `input ${x.label} [${x.shape}] has ${M} rows; the fused kernels take 1 to ${MAX_M} (use linearForward)`,
    );
  }
  return [N, K, M, xt];
}

/** Checks the output's size; returns its element type. */
function checkOutput(rec: Recorder, what: string, out: Tensor, M: number, ld: number): ActivationType {
  if ((out.dtype !== "f32" && out.dtype !== "f16") || out.size !== M * ld) {
    fail(
      what,
      `output ${out.label} must be f32 or f16 of ${M}x${ld} elements, got ${out.dtype} [${out.shape}]`,
    );
  }
  return activationType(rec.gpu, out, `${what} out`);
}

function checkVector(what: string, t: Tensor, size: number, role: string): void {
  if (t.dtype !== "f32" || t.size !== size) {
    fail(what, `${role} ${t.label} must be f32 of ${size} elements, got ${t.dtype} [${t.shape}]`);
  }
}

function checkPrologue(what: string, pro: MatvecPrologue | undefined, K: number): void {
  if (!pro) return;
  if (pro.kind !== "rms" && pro.kind !== "layer") {
    fail(what, `unknown prologue ${(pro as { kind: string }).kind}; use "rms" or "layer"`);
  }
  checkVector(what, pro.weight, K, "norm weight");
  if (pro.kind === "layer") checkVector(what, pro.bias, K, "norm bias");
  if (!Number.isFinite(pro.eps) || pro.eps < 0) {
    fail(what, `norm eps must be a finite number ≥ 0, got ${pro.eps}`);
  }
}

/** WebGPU refuses a buffer bound writable and read in one dispatch where the ranges overlap. */
function checkNoOverlap(what: string, out: Tensor, inputs: (Tensor | null | undefined)[]): void {
  for (const t of inputs) {
    if (!t || t.buffer !== out.buffer) continue;
    if (t.offset < out.offset + out.byteLength && out.offset < t.offset + t.byteLength) {
      fail(what, `output ${out.label} overlaps input ${t.label}; write to another tensor`);
    }
  }
}

function prologueTensors(pro: MatvecPrologue | undefined): Tensor[] {
  if (!pro) return [];
  return pro.kind === "layer" ? [pro.weight, pro.bias] : [pro.weight];
}

/**
 * Records a decode linear layer in one dispatch: `out[m, outColOffset + n] (+)= act(sum_k x̂[m, k] w[n, k]
 * + bias[n])`, where `x̂` is x after the optional norm prologue and `act` the optional epilogue. With
 * `accumulate`, the activation is applied before adding (`out += act(...)`). A weight split into row
 * ranges writes its columns of a wider output through `outColOffset` and `ldOut` (as `linearForward`).
 * x and out are activations: each may be f32 or f16 (f16 needs `shader-f16`); with an f16 out and
 * `accumulate` (an f16 residual stream), the sum is formed in f32 and rounded once.
 *
 * @param rec The recorder.
 * @param out Output, (M, ldOut) f32 or f16; must not overlap x.
 * @param x Input, (M, K) f32 or f16 with 1 ≤ M ≤ 4 (any leading shape, e.g. (B, 1, K)).
 * @param w Weight, (N, K) f32 or f16 (HF Linear), K a multiple of 4.
 * @param bias Bias, (N) f32, or null.
 * @param opts `prologue`: RMSNorm or LayerNorm of each row of x first (f32 statistics); `epilogue`:
 *   `gelu_new` on each output; `accumulate`: add into `out`; `outColOffset`: first output column
 *   (default 0); `ldOut`: output row length (default N).
 * @throws {GpuError} when the product is not one the fused kernel takes (see {@link decodeMatvecApplies}),
 *   or a tensor has the wrong dtype or size.
 * @example RMSNorm and q_proj of one token in one dispatch
 * ```ts ignore
 * decodeLinearForward(rec, q, hidden, layer.q.weight, layer.q.bias, {
 *   prologue: { kind: "rms", weight: layer.norm1.weight, eps: config.normEps },
 * });
 * ```
 */
export function decodeLinearForward(
  rec: Recorder,
  out: Tensor,
  x: Tensor,
  w: Tensor,
  bias: Tensor | null,
  opts: {
    prologue?: MatvecPrologue;
    epilogue?: MatvecEpilogue;
    accumulate?: boolean;
    outColOffset?: number;
    ldOut?: number;
  } = {},
): void {
  // x: (M, K), w: (N, K), out: (M, ldOut)
  const what = "decodeLinearForward";
  const [N, K, M, xt] = checkProduct(rec, what, x, w);
  const ldc = opts.ldOut ?? N;
  const cOff = opts.outColOffset ?? 0;
  if (!Number.isInteger(cOff) || cOff < 0 || cOff + N > ldc) {
    fail(what, `columns ${cOff}..${cOff + N} exceed ldOut ${ldc}`);
  }
  const ot = checkOutput(rec, what, out, M, ldc);
  if (bias) checkVector(what, bias, N, "bias");
  checkPrologue(what, opts.prologue, K);
  const epilogue = opts.epilogue ?? "none";
  if (epilogue !== "none" && epilogue !== "gelu_new") {
    fail(what, `unknown epilogue ${epilogue}; use "none" or "gelu_new"`);
  }
  const pro = prologueTensors(opts.prologue);
  checkNoOverlap(what, out, [x, w, bias, ...pro]);
  if (N === 0) return;
  const o = matvecOptions(rec, M, w, xt, ot, opts.prologue, N, K);
  const flags = (bias ? FLAG_BIAS : 0) | (opts.accumulate ? FLAG_ACCUMULATE : 0) |
    (epilogue === "gelu_new" ? FLAG_GELU : 0);
  record(rec, o, [out, x, w, bias ?? x, ...pro], N, K, ldc, cOff, opts.prologue?.eps ?? 0, flags);
}

/**
 * Records a llama MLP's gate and up projections and SwiGLU in one dispatch:
 * `out[m, i] = silu(sum_k x̂[m, k] wGate[i, k] + gateBias[i]) * (sum_k x̂[m, k] wUp[i, k] + upBias[i])`,
 * where `x̂` is x after the optional norm prologue. Each output row i streams both weight rows together.
 * x and out may each be f32 or f16, as in {@link decodeLinearForward}.
 *
 * @param rec The recorder.
 * @param out Output, (M, I) f32 or f16; must not overlap x.
 * @param x Input, (M, K) f32 or f16 with 1 ≤ M ≤ 4.
 * @param wGate Gate weight, (I, K) f32 or f16, K a multiple of 4.
 * @param wUp Up weight, (I, K), the same dtype.
 * @param opts `prologue`: RMSNorm or LayerNorm of each row of x first; `gateBias`, `upBias`: (I) f32 or
 *   null (llama has none).
 * @throws {GpuError} when the product is not one the fused kernel takes, or the weights differ in shape
 *   or dtype.
 * @example post_attention_layernorm, gate_proj, up_proj and SwiGLU of one token
 * ```ts ignore
 * decodeSwigluForward(rec, act, hidden, layer.gate.weight, layer.up.weight, {
 *   prologue: { kind: "rms", weight: layer.norm2.weight, eps: config.normEps },
 * });
 * ```
 */
export function decodeSwigluForward(
  rec: Recorder,
  out: Tensor,
  x: Tensor,
  wGate: Tensor,
  wUp: Tensor,
  opts: { prologue?: MatvecPrologue; gateBias?: Tensor | null; upBias?: Tensor | null } = {},
): void {
  // x: (M, K), wGate, wUp: (I, K), out: (M, I)
  const what = "decodeSwigluForward";
  const [I, K, M, xt] = checkProduct(rec, what, x, wGate);
  if (wUp.dtype !== wGate.dtype || wUp.shape.length !== 2 || wUp.shape[0] !== I || wUp.shape[1] !== K) {
    fail(
      what,
      `up weight ${wUp.label} ${wUp.dtype} [${wUp.shape}] must match gate weight ${wGate.label} ${wGate.dtype} [${wGate.shape}]`,
    );
  }
  const ot = checkOutput(rec, what, out, M, I);
  const gateBias = opts.gateBias ?? null;
  const upBias = opts.upBias ?? null;
  if (gateBias) checkVector(what, gateBias, I, "gate bias");
  if (upBias) checkVector(what, upBias, I, "up bias");
  checkPrologue(what, opts.prologue, K);
  const pro = prologueTensors(opts.prologue);
  checkNoOverlap(what, out, [x, wGate, wUp, gateBias, upBias, ...pro]);
  if (I === 0) return;
  const o = matvecOptions(rec, M, wGate, xt, ot, opts.prologue, I, K, { swiglu: true });
  const flags = (gateBias ? FLAG_BIAS : 0) | (upBias ? FLAG_UP_BIAS : 0);
  const buffers = [out, x, wGate, wUp, gateBias ?? x, upBias ?? x, ...pro];
  record(rec, o, buffers, I, K, I, 0, opts.prologue?.eps ?? 0, flags);
}

/**
 * The storage buffers {@link decodeQkvForward}'s single dispatch binds: q, k, v, x, the three weights,
 * the three biases when any is present, and the norm's weight (and bias); with RoPE, k and v give way
 * to the two caches and the mask, and invFreq, positions and the decode state follow.
 */
function qkvBindings(biased: boolean, prologue: MatvecPrologue | undefined, rope = false): number {
  return 7 + (biased ? 3 : 0) + prologueTensors(prologue).length + (rope ? 4 : 0);
}

/**
 * RoPE and the KV-cache append of a replayed llama decode step, folded into {@link decodeQkvForward}:
 * what `kvCacheAppendRope` (kernels/kv_cache.ts) does after the products, with the same tensors.
 */
export interface QkvRope {
  /** RoPE inverse frequencies `(D/2)` f32. */
  invFreq: Tensor;
  /** Position of every row of x `(M)` i32 (the angle of row m is `positions[m] * invFreq[i]`). */
  positions: Tensor;
  /** Decode state u32 (4) `[pos, n, 0, 0]`: row m goes to cache position `pos + m % tokens`. */
  state: Tensor;
  /** Key cache `(B, maxLen, Hkv*D)` f32 or f16, B = M / tokens. */
  kCache: Tensor;
  /** Value cache `(B, maxLen, Hkv*D)` f32 or f16. */
  vCache: Tensor;
  /** Cache mask `(B, maxLen)` i32, set to 1 at the appended positions. */
  mask: Tensor;
  /** H, query heads: Nq = H * D. */
  numHeads: number;
  /** Hkv, key/value heads: Nk = Nv = Hkv * D. */
  numKvHeads: number;
  /** Positions per batch row of the caches. */
  maxLen: number;
  /** T, the tokens of each batch row among the M rows of x (default 1: one token per sequence). */
  tokens?: number;
}

/** Checks the RoPE / cache tensors of {@link decodeQkvForward} against q, k, v; returns B and T. */
function checkRope(
  what: string,
  r: QkvRope,
  M: number,
  Nq: number,
  Nk: number,
  Nv: number,
): [number, number] {
  const T = r.tokens ?? 1;
  if (!Number.isInteger(T) || T < 1 || M % T !== 0) {
    fail(what, `rope.tokens ${T} must divide the ${M} rows of x`);
  }
  const B = M / T;
  const half = r.invFreq.size;
  checkVector(what, r.invFreq, half, "rope invFreq");
  const D = 2 * half;
  const { numHeads: H, numKvHeads: Hkv, maxLen } = r;
  if (half < 1 || Nq !== H * D || Nk !== Hkv * D || Nv !== Hkv * D) {
    fail(
      what,
      `q, k, v of ${Nq}, ${Nk}, ${Nv} columns must be H*D, Hkv*D, Hkv*D with H = ${H}, Hkv = ${Hkv}, D = ${D} (2 * invFreq's ${half})`,
    );
  }
  if (!Number.isInteger(maxLen) || maxLen < 1) {
    fail(what, `rope.maxLen must be a positive integer, got ${maxLen}`);
  }
  for (const [c, name] of [[r.kCache, "kCache"], [r.vCache, "vCache"]] as const) {
    if (c.size < B * maxLen * Nk) {
      fail(what, `${name} ${c.label} [${c.shape}] is smaller than (B, maxLen, Hkv*D)`);
    }
  }
  if (r.mask.size < B * maxLen || (r.mask.dtype !== "i32" && r.mask.dtype !== "u32")) {
    fail(what, `mask ${r.mask.label} must be i32 (B, maxLen)`);
  }
  if (r.positions.size < M || r.positions.dtype !== "i32") {
    fail(what, `positions ${r.positions.label} must be i32 of ${M} rows`);
  }
  if (r.state.size !== 4 || r.state.dtype !== "u32") fail(what, `state ${r.state.label} must be u32 (4)`);
  return [B, T];
}

/**
 * Records the q, k and v projections of a decode step: `q = x̂ Wqᵀ + bq`, `k = x̂ Wkᵀ + bk`,
 * `v = x̂ Wvᵀ + bv`, with `x̂` x after the optional norm prologue, as three {@link decodeLinearForward}
 * calls would, in one dispatch where it can. The workgroups are spread over the concatenated output rows
 * Nq + Nk + Nv (each product gets whole workgroups, so a workgroup's choice of weight, bias and output is
 * uniform); the small k/v products, latency-bound on their own, run beside q's. One dispatch when the
 * three weights have one dtype and the bindings fit the device's `maxStorageBuffersPerShaderStage`: 7
 * (q, k, v, x, Wq, Wk, Wv), plus 3 when any bias is present, plus the norm's weight (rms) or weight and
 * bias (layer). Under WebGPU's default of 8 that is a bias-free llama with RMSNorm (8) or no prologue
 * (7); LayerNorm without biases (9), RMSNorm with biases (11, e.g. qwen2) and gpt2 (LayerNorm and
 * biases, 12) take the three dispatches there. Devices that raise the limit (the GPU is created with the
 * adapter's maximum, e.g. 32 on Mesa lavapipe) fuse all of them. Mixed weight dtypes take the three
 * dispatches too. x, q, k and v may each be f32 or f16.
 *
 * With `rope` (a replayed llama decode step), the call also does what `kvCacheAppendRope` would do
 * next: q is stored rotated (HF `rotate_half`, angle `positions[m] * invFreq[i]`, in f32), and the
 * rotated k and v are stored straight into the cache rows of the decode state's position (row m of x:
 * batch row `m / tokens`, position `state[0] + m % tokens`, dropped at or past `maxLen`), with the mask
 * set to 1 there; k and v are then not written. Each workgroup of q or k reduces both rows (i, i + D/2)
 * of its RoPE pairs. That is one dispatch when there are no biases, the weights have one dtype and 11
 * storage bindings plus the norm's (12 with RMSNorm) fit `maxStorageBuffersPerShaderStage`; otherwise
 * the products as above (k and v written, k unrotated) and then `kvCacheAppendRope`. The caches may be
 * f32 or f16 as well (rounded once, from the f32 rotation).
 *
 * @param rec The recorder.
 * @param q Output, (M, Nq) f32 or f16; q, k and v must not overlap each other or any input.
 * @param k Output, (M, Nk) f32 or f16.
 * @param v Output, (M, Nv) f32 or f16.
 * @param x Input, (M, K) f32 or f16 with 1 ≤ M ≤ 4.
 * @param wq Query weight, (Nq, K) f32 or f16 (HF Linear), K a multiple of 4.
 * @param wk Key weight, (Nk, K).
 * @param wv Value weight, (Nv, K).
 * @param bq Query bias, (Nq) f32, or null.
 * @param bk Key bias, (Nk) f32, or null.
 * @param bv Value bias, (Nv) f32, or null.
 * @param opts `prologue`: RMSNorm or LayerNorm of each row of x first (f32 statistics); `rope`: RoPE
 *   and the KV-cache append of a replayed decode step (see {@link QkvRope}).
 * @throws {GpuError} when a product is not one the fused kernel takes (see {@link decodeMatvecApplies}),
 *   the weights differ in K, a tensor has the wrong dtype or size, or an output overlaps another tensor.
 * @example input_layernorm, q_proj, k_proj and v_proj of one token
 * ```ts ignore
 * decodeQkvForward(rec, q, k, v, hidden, layer.q.weight, layer.k.weight, layer.v.weight, null, null, null, {
 *   prologue: { kind: "rms", weight: layer.norm1.weight, eps: config.normEps },
 * });
 * ```
 * @example The same with RoPE and the cache append of a replayed decode step
 * ```ts ignore
 * decodeQkvForward(rec, q, k, v, hidden, layer.q.weight, layer.k.weight, layer.v.weight, null, null, null, {
 *   prologue: { kind: "rms", weight: layer.norm1.weight, eps: config.normEps },
 *   rope: { invFreq, positions, state, kCache, vCache, mask, numHeads: 32, numKvHeads: 4, maxLen: 256 },
 * });
 * ```
 */
export function decodeQkvForward(
  rec: Recorder,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  x: Tensor,
  wq: Tensor,
  wk: Tensor,
  wv: Tensor,
  bq: Tensor | null,
  bk: Tensor | null,
  bv: Tensor | null,
  opts: { prologue?: MatvecPrologue; rope?: QkvRope } = {},
): void {
  // x: (M, K), wq: (Nq, K), wk: (Nk, K), wv: (Nv, K), q: (M, Nq), k: (M, Nk), v: (M, Nv);
  // rope: caches (B, maxLen, Hkv*D), mask (B, maxLen), M = B*T
  const what = "decodeQkvForward";
  const [Nq, K, M, xt] = checkProduct(rec, what, x, wq);
  const products = [[q, wq, bq], [k, wk, bk], [v, wv, bv]] as const;
  const ns = products.map(([out, w, b]) => {
    const [N, Kw] = checkProduct(rec, what, x, w);
    if (Kw !== K) {
      fail(what, `weight ${w.label} [${w.shape}] must have K = ${K} as ${wq.label} [${wq.shape}]`);
    }
    checkOutput(rec, what, out, M, N);
    if (b) checkVector(what, b, N, "bias");
    return N;
  });
  const [, Nk, Nv] = ns as [number, number, number];
  checkPrologue(what, opts.prologue, K);
  const pro = prologueTensors(opts.prologue);
  const inputs = [x, wq, wk, wv, bq, bk, bv, ...pro];
  checkNoOverlap(what, q, [...inputs, k, v]);
  checkNoOverlap(what, k, [...inputs, v]);
  checkNoOverlap(what, v, inputs);
  const biases = [bq, bk, bv];
  const present = biases.find((b) => b !== null) ?? null;
  const sameDtype = wk.dtype === wq.dtype && wv.dtype === wq.dtype;
  const limit = rec.gpu.limits.maxStorageBuffersPerShaderStage;
  const rope = opts.rope;
  if (rope) {
    const [B, T] = checkRope(what, rope, M, Nq, Nk, Nv);
    const ropeInputs = [rope.invFreq, rope.positions, rope.state];
    for (const out of [q, rope.kCache, rope.vCache, rope.mask]) {
      checkNoOverlap(what, out, [...inputs, ...ropeInputs]);
    }
    checkNoOverlap(what, q, [rope.kCache, rope.vCache, rope.mask]);
    checkNoOverlap(what, rope.kCache, [rope.vCache, rope.mask]);
    checkNoOverlap(what, rope.vCache, [rope.mask]);
    if (present !== null || !sameDtype || qkvBindings(false, opts.prologue, true) > limit) {
      // the products (one dispatch or three), then RoPE and the append as a dispatch of their own
      const { rope: _, ...plain } = opts;
      decodeQkvForward(rec, q, k, v, x, wq, wk, wv, bq, bk, bv, plain);
      kvCacheAppendRope(
        rec,
        rope.kCache,
        rope.vCache,
        rope.mask,
        q,
        k,
        v,
        rope.invFreq,
        rope.positions,
        rope.state,
        {
          batch: B,
          tokens: T,
          numHeads: rope.numHeads,
          numKvHeads: rope.numKvHeads,
          maxLen: rope.maxLen,
        },
      );
      return;
    }
    qkvRopeDispatch(rec, q, x, wq, wk, wv, opts.prologue, rope, [Nq, Nk, Nv, K, M, T], xt);
    return;
  }
  const fused = sameDtype && qkvBindings(present !== null, opts.prologue) <= limit;
  if (!fused) {
    for (const [out, w, b] of products) decodeLinearForward(rec, out, x, w, b, opts);
    return;
  }
  if (Nq + Nk + Nv === 0) return;
  // the plan of one product of all the rows: threads and rows per group are the same for the three
  const o = matvecOptions(
    rec,
    M,
    wq,
    xt,
    activationType(rec.gpu, q, `${what} q`),
    opts.prologue,
    Nq + Nk + Nv,
    K,
    {
      qkv: {
        kt: activationType(rec.gpu, k, `${what} k`),
        vt: activationType(rec.gpu, v, `${what} v`),
        bias: present !== null,
        rope: false,
      },
    },
  );
  const rowsPerTile = (WG / o.threads) * o.nr;
  const [tq, tk, tv] = [Nq, Nk, Nv].map((N) => Math.ceil(N / rowsPerTile)) as [number, number, number];
  const tiles = tq + tk + tv;
  const { groups, stride } = grid1d(tiles, 1);
  let flags = 0;
  biases.forEach((b, i) => flags |= b ? QKV_BIAS_FLAGS[i]! : 0);
  const buffers = [q, k, v, x, wq, wk, wv, ...(present ? biases.map((b) => b ?? present) : []), ...pro];
  const params = [Nq, Nk, Nv, K, K / 4, stride, tiles, tq, tq + tk, f32(opts.prologue?.eps ?? 0), flags];
  rec.dispatch(decodeMatvecKernel(o), buffers, params, groups);
}

/** The single dispatch of {@link decodeQkvForward} with RoPE and the cache append (checked by it). */
function qkvRopeDispatch(
  rec: Recorder,
  q: Tensor,
  x: Tensor,
  wq: Tensor,
  wk: Tensor,
  wv: Tensor,
  prologue: MatvecPrologue | undefined,
  rope: QkvRope,
  [Nq, Nk, Nv, K, M, T]: [number, number, number, number, number, number],
  xt: ActivationType,
): void {
  const what = "decodeQkvForward";
  if (Nq + Nk + Nv === 0) return;
  const o = matvecOptions(
    rec,
    M,
    wq,
    xt,
    activationType(rec.gpu, q, `${what} q`),
    prologue,
    Nq + Nk + Nv,
    K,
    {
      qkv: {
        kt: activationType(rec.gpu, rope.kCache, `${what} kCache`),
        vt: activationType(rec.gpu, rope.vCache, `${what} vCache`),
        bias: false,
        rope: true,
      },
    },
  );
  // q and k: whole RoPE pairs per workgroup (P of them); v: consecutive rows
  const rowsPerTile = (WG / o.threads) * o.nr;
  const P = rowsPerTile / 2;
  const tq = Math.ceil(Nq / 2 / P), tk = Math.ceil(Nk / 2 / P), tv = Math.ceil(Nv / rowsPerTile);
  const tiles = tq + tk + tv;
  const { groups, stride } = grid1d(tiles, 1);
  const buffers = [q, rope.kCache, rope.vCache, rope.mask, x, wq, wk, wv, ...prologueTensors(prologue)];
  buffers.push(rope.invFreq, rope.positions, rope.state);
  const params = [Nq, Nk, Nv, K, K / 4, stride, tiles, tq, tq + tk, f32(prologue?.eps ?? 0), 0];
  params.push(rope.invFreq.size, T, rope.maxLen);
  rec.dispatch(decodeMatvecKernel(o), buffers, params, groups);
}

function record(
  rec: Recorder,
  o: MatvecOptions,
  buffers: Tensor[],
  N: number,
  K: number,
  ldc: number,
  cOff: number,
  eps: number,
  flags: number,
): void {
  const tiles = Math.ceil(N / ((WG / o.threads) * o.nr));
  const { groups, stride } = grid1d(tiles, 1);
  const params = [N, K, K / 4, ldc, cOff, stride, tiles, f32(eps), flags];
  rec.dispatch(decodeMatvecKernel(o), buffers, params, groups);
}
