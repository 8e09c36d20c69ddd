/**
 * LLaMA-Adapter adaption-prompt attention (PEFT `tuners/adaption_prompt` AdaptedAttention): every query
 * also attends to L adapter tokens whose keys and values `ka`, `va` `(L, Hkv, D)` are shared by the
 * whole batch, through a softmax over those L tokens only (no causal or padding mask), scaled by a gate:
 *
 *   out[b,t,h,:] (+)= g_h · Σ_j softmax_j(q[b,t,h,:]·ka[kvh(h),j,:] * scale) · va[kvh(h),j,:]
 *
 * as PEFT computes it for llama/mistral and gpt2 (`scores / sqrt(head_dim)`, then
 * `adaption_gate * softmax(scores, dtype=float32)`; the caller passes `scale = 1/sqrt(D)`). Gate forms:
 * `"scalar"` (one value, PEFT), `"per-head"` (H values, official LLaMA-Adapter / litgpt without tanh),
 * `"per-head-tanh"` (`g_h = tanh(gate_h)`, the official training form). A zero gate adds exactly zero.
 *
 * The backward writes dq (adding into it after the main attention's backward) and the gradients of the
 * adapter keys, values and gate, which are sums over all B*T rows: each workgroup reduces a fixed block
 * of rows into its own slot of a scratch (cached per shape), and a second kernel sums the slots in a fixed
 * order, so results are deterministic without atomics.
 *
 * q and out may be f32 or f16 (computed in f32, rounded once at the store); the adapter keys, values and
 * gate, dout and every gradient are f32.
 *
 * @module
 */

import {
  type ActivationType,
  activationType,
  defineKernel,
  enableF16,
  type Kernel,
  range,
} from "../src/gpu/kernel.ts";
import { f32, type Recorder } from "../src/gpu/recorder.ts";
import { cachedScratch, type Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";
import { grid1d } from "./fill.ts";

/** How the gate multiplies each head's adapter output. */
export type GateKind = "scalar" | "per-head" | "per-head-tanh";

/** Options of {@link adapterAttentionForward} and {@link adapterAttentionBackward}. */
export interface AdapterAttentionOptions {
  /** H: query heads. */
  numHeads: number;
  /** Hkv: key/value heads of the adapter keys/values. */
  numKvHeads: number;
  /** D: head size. */
  headDim: number;
  /** L: adapter tokens (1 ≤ L ≤ 64). */
  adapterLen: number;
  /** N = B*T query rows. */
  rows: number;
  /** Score scale (PEFT: `1/sqrt(D)`). */
  scale: number;
  /** Gate form. */
  gateKind: GateKind;
  /** Forward: add into out; backward: add into dq. Otherwise overwrite. */
  accumulate?: boolean;
}

const MAX_L = 64;
const WG = 64;

/**
 * Backward tuning: `subChunks` is how many blocks of rows one partials workgroup reduces in turn (fewer
 * partials to sum, fewer workgroups); null (the default) picks the power of two that gives closest to 320
 * workgroups ({@link adapterSubChunks}; H100, B*T = 2048, L = 10, paired partials: 2 for gpt2 and
 * SmolLM2, 8 for TinyLlama, 15-27% faster than 4 with one row per load, bench/RESULTS.md). `pairs` takes
 * the two-threads-per-row partials kernel for L ≤ 16 (both are tested); its dka/dva sums over a whole
 * block of rows load `rowBatch` rows at a time (1 = one per loop step, the earlier loop). `reduceSlices`
 * (1, 2, 4 or 8) is how many threads of the final reduction share one output, each summing every
 * `reduceSlices`-th slot (1 = one thread per output summing all slots in turn, the earlier kernel).
 * `vec4: false` makes the paired partials kernel read q and dout (and update dq) one element at a time
 * even where D is a multiple of 4 (the earlier kernel; by default one vec4 per load there).
 */
export const adapterAttentionTuning: {
  subChunks: number | null;
  pairs: boolean;
  rowBatch: number;
  reduceSlices: 1 | 2 | 4 | 8;
  vec4: boolean;
} = {
  subChunks: null,
  pairs: true,
  rowBatch: 8,
  reduceSlices: 8,
  vec4: true,
};

/**
 * Row blocks per partials workgroup: `adapterAttentionTuning.subChunks`, or the power of two (1-16) whose
 * workgroup count `ceil(rows / (RC * sub)) * H` is closest to 320 (about 2.4 per multiprocessor of an
 * H100) in ratio.
 *
 * @param rows Query rows B*T.
 * @param H Query heads.
 * @param RC Rows per block.
 * @returns Blocks per workgroup.
 */
export function adapterSubChunks(rows: number, H: number, RC: number): number {
  if (adapterAttentionTuning.subChunks !== null) return adapterAttentionTuning.subChunks;
  let best = 1;
  for (const sub of [1, 2, 4, 8, 16]) {
    const off = (s: number) => Math.abs(Math.log((Math.ceil(rows / (RC * s)) * H) / 320));
    if (off(sub) < off(best)) best = sub;
  }
  return best;
}

/** Each gate form's code in the kernels' params (`gmode`; kernels/attention.ts's fused forward too). */
export const ADAPTER_GATE_MODE: Readonly<Record<GateKind, number>> = {
  "scalar": 0,
  "per-head": 1,
  "per-head-tanh": 2,
};

function dvOf(D: number): number {
  return Math.ceil(D / 4);
}

function each(n: number, f: (c: number) => string, sep = "\n"): string {
  return Array.from({ length: n }, (_, c) => f(c)).join(sep);
}

/** The element `e` of an array of type `t`, as f32 (the text itself for f32). */
function ld(t: ActivationType, e: string): string {
  return t === "f32" ? e : `f32(${e})`;
}

/** The f32 value `e` converted for a store into an array of type `t` (the text itself for f32). */
function st(t: ActivationType, e: string): string {
  return t === "f32" ? e : `${t}(${e})`;
}

/** vec4 column c of the row at `base` of `arr` (elements of type t) as a vec4<f32>, zero past D. */
function vecLoad(D: number, c: number, arr: string, base: string, t: ActivationType = "f32"): string {
  const comps = [0, 1, 2, 3].map((e) => (4 * c + e < D ? ld(t, `${arr}[${base} + ${4 * c + e}u]`) : "0.0"));
  return `vec4<f32>(${comps.join(", ")})`;
}

/**
 * Stores `value` (a vec4<f32> expression) into the real components of `arr` (elements of type t); adds
 * to the old value (in f32, rounded once) when p.flag != 0.
 */
function vecStore(
  D: number,
  c: number,
  arr: string,
  base: string,
  value: string,
  t: ActivationType = "f32",
): string {
  const lines: string[] = [];
  for (let e = 0; e < 4 && 4 * c + e < D; e++) {
    const idx = `${arr}[${base} + ${4 * c + e}u]`;
    const val = `${value}.${"xyzw"[e]}`;
    // a branch rather than `flag * old`: an overwritten output may hold NaN
    lines.push(
      `if (p.flag != 0u) { ${idx} = ${st(t, `${ld(t, idx)} + ${val}`)}; } else { ${idx} = ${st(t, val)}; }`,
    );
  }
  return lines.join(" ");
}

const PARAMS = `struct P {
  rows: u32, H: u32, Hkv: u32, L: u32,
  gmode: u32, flag: u32, stride: u32, scale: f32,
  nGroups: u32, _a: u32, _b: u32, _c: u32,
}`;

/**
 * WGSL `gateOf(h)`: head h's gate for the gate form coded by the u32 expression `mode` (see
 * {@link ADAPTER_GATE_MODE}); reads a `gate` binding. kernels/attention.ts's fused forward uses it too.
 *
 * @param mode WGSL expression of the gate form's code.
 * @returns The WGSL function.
 */
export function gateFunction(mode: string): string {
  return `
fn gateOf(h: u32) -> f32 {
  if (${mode} == 0u) { return gate[0]; }
  if (${mode} == 1u) { return gate[h]; }
  return tanh(gate[h]);
}`;
}

const GATE_FN = gateFunction("p.gmode");

/**
 * Throws a GpuError unless the sizes, gate and dtypes fit (also used by kernels/attention.ts's fused
 * forward).
 *
 * @param o The options.
 * @param q Queries `(N, H, D)`.
 * @param ka Adapter keys `(L, Hkv, D)` f32.
 * @param va Adapter values `(L, Hkv, D)` f32.
 * @param gate The gate, `(1)` or `(H)` f32.
 */
export function checkAdapterAttention(
  o: AdapterAttentionOptions,
  q: Tensor,
  ka: Tensor,
  va: Tensor,
  gate: Tensor,
): void {
  const { numHeads: H, numKvHeads: Hkv, headDim: D, adapterLen: L, rows: N } = o;
  if (H % Hkv !== 0) {
    throw new GpuError(`adapter attention: numHeads ${H} not a multiple of numKvHeads ${Hkv}`);
  }
  if (L < 1 || L > MAX_L) throw new GpuError(`adapter attention: adapterLen ${L} outside 1..${MAX_L}`);
  if (q.size < N * H * D) throw new GpuError(`adapter attention: q [${q.shape}] smaller than (N, H, D)`);
  if (ka.size < Hkv * L * D || va.size < Hkv * L * D) {
    throw new GpuError(`adapter attention: ka/va smaller than (L, Hkv, D) = (${L}, ${Hkv}, ${D})`);
  }
  const g = o.gateKind === "scalar" ? 1 : H;
  if (gate.size < g) throw new GpuError(`adapter attention: gate [${gate.shape}] needs ${g} values`);
  for (const [name, t] of [["ka", ka], ["va", va], ["gate", gate]] as const) {
    // adapter parameters (and the keys/values computed from them) stay f32
    if (t.dtype !== "f32") throw new GpuError(`adapter attention: ${name} must be f32, is ${t.dtype}`);
  }
}

function params(o: AdapterAttentionOptions, stride: number, nGroups: number): (number | { f32: number })[] {
  return [
    o.rows,
    o.numHeads,
    o.numKvHeads,
    o.adapterLen,
    ADAPTER_GATE_MODE[o.gateKind],
    o.accumulate ? 1 : 0,
    stride,
    f32(o.scale),
    nGroups,
    0,
    0,
    0,
  ];
}

/** The forward kernels' bindings (q, ka, va, gate, out, the uniform) and the params struct. */
function forwardBindings(qt: ActivationType, ot: ActivationType): string {
  return `${enableF16(qt, ot)}${PARAMS}
@group(0) @binding(0) var<storage, read> q: array<${qt}>;
@group(0) @binding(1) var<storage, read> ka: array<f32>;
@group(0) @binding(2) var<storage, read> va: array<f32>;
@group(0) @binding(3) var<storage, read> gate: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<${ot}>;
@group(0) @binding(5) var<uniform> p: P;`;
}

// ---------------------------------------------------------------------------------------------------
// Forward: one thread per (row, head) with an online softmax over the L adapter tokens.

function forwardKernel(D: number, qt: ActivationType, ot: ActivationType): Kernel {
  const DV = dvOf(D);
  return defineKernel(
    "adapter_attention_fwd",
    { D, qt, ot },
    ["read", "read", "read", "read", "write", "uniform"],
    () => `
${forwardBindings(qt, ot)}
${GATE_FN}
@compute @workgroup_size(${WG}) fn main(@builtin(global_invocation_id) gid: vec3u) {
  let idx = gid.x + gid.y * p.stride; // (n, h), h fastest: the (N, H, D) layout
  if (idx >= p.rows * p.H) { return; }
  let h = idx % p.H;
  let kvh = h / (p.H / p.Hkv);
  let qb = idx * ${D}u;
${each(DV, (c) => `  let q${c} = ${vecLoad(D, c, "q", "qb", qt)};`)}
${each(DV, (c) => `  var a${c} = vec4<f32>(0.0);`)}
  var m = -1.0e30;
  var l = 0.0;
  for (var j = 0u; j < p.L; j++) {
    let kb = (j * p.Hkv + kvh) * ${D}u;
    let s = (${each(DV, (c) => `dot(q${c}, ${vecLoad(D, c, "ka", "kb")})`, " + ")}) * p.scale;
    let mNew = max(m, s);
    let corr = exp(m - mNew);
    let pj = exp(s - mNew);
    l = l * corr + pj;
${each(DV, (c) => `    a${c} = a${c} * corr + pj * ${vecLoad(D, c, "va", "kb")};`)}
    m = mNew;
  }
  let f = gateOf(h) / l;
${each(DV, (c) => `  ${vecStore(D, c, "out", "qb", `(a${c} * f)`, ot)}`)}
}`,
  );
}

/** (row, head) pairs per workgroup of the split forward, and threads per pair. */
const SPLIT_PAIRS = 16;
const SPLIT_THREADS = 4;

/**
 * The forward with each (row, head) split over 4 threads (D a multiple of 16): thread t holds D/4
 * contiguous elements of q and of the output, so 4 threads read a row coalesced and each keeps few
 * registers; the L partial scores go through workgroup memory once (one barrier), and every thread of
 * the pair then runs the same softmax over the summed scores. The one-thread-per-pair kernel above
 * serves the other head sizes.
 */
function forwardSplitKernel(D: number, LMAX: number, qt: ActivationType, ot: ActivationType): Kernel {
  const SEG = D / SPLIT_THREADS; // elements per thread
  const SV = SEG / 4; // vec4 per thread
  const part = (k: string, j: string) => `part[(pl * ${SPLIT_THREADS}u + ${k}) * ${LMAX}u + ${j}]`;
  return defineKernel(
    "adapter_attention_fwd_split",
    { D, LMAX, qt, ot },
    ["read", "read", "read", "read", "write", "uniform"],
    () => `
${forwardBindings(qt, ot)}
var<workgroup> part: array<f32, ${SPLIT_PAIRS * SPLIT_THREADS * LMAX}>;
${GATE_FN}
@compute @workgroup_size(${SPLIT_PAIRS * SPLIT_THREADS})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) li: u32) {
  let pl = li / ${SPLIT_THREADS}u; // pair within the workgroup
  let t = li % ${SPLIT_THREADS}u; // this thread's quarter of D
  let idx = (wid.x + wid.y * p.stride) * ${SPLIT_PAIRS}u + pl; // (n, h), h fastest
  let valid = idx < p.rows * p.H;
  let pair = min(idx, p.rows * p.H - 1u); // past the end: a real pair, never stored (uniform barriers)
  let h = pair % p.H;
  let kvh = h / (p.H / p.Hkv);
  let qb = pair * ${D}u + t * ${SEG}u;
${each(SV, (c) => `  let q${c} = ${vecLoad(4 * SV, c, "q", "qb", qt)};`)}
  for (var j = 0u; j < p.L; j++) {
    let kb = (j * p.Hkv + kvh) * ${D}u + t * ${SEG}u;
    ${part("t", "j")} = ${each(SV, (c) => `dot(q${c}, ${vecLoad(4 * SV, c, "ka", "kb")})`, " + ")};
  }
  workgroupBarrier();
  var m = -1.0e30;
  for (var j = 0u; j < p.L; j++) {
    m = max(m, (${each(SPLIT_THREADS, (k) => part(`${k}u`, "j"), " + ")}) * p.scale);
  }
${each(SV, (c) => `  var a${c} = vec4<f32>(0.0);`)}
  var l = 0.0;
  for (var j = 0u; j < p.L; j++) {
    let pj = exp((${each(SPLIT_THREADS, (k) => part(`${k}u`, "j"), " + ")}) * p.scale - m);
    l += pj;
    let kb = (j * p.Hkv + kvh) * ${D}u + t * ${SEG}u;
${each(SV, (c) => `    a${c} += pj * ${vecLoad(4 * SV, c, "va", "kb")};`)}
  }
  if (!valid) { return; }
  let f = gateOf(h) / l;
${each(SV, (c) => `  ${vecStore(4 * SV, c, "out", "qb", `(a${c} * f)`, ot)}`)}
}`,
  );
}

/**
 * Records the adapter attention forward (see the module doc), adding into `out` with
 * `opts.accumulate` (after the main attention) or overwriting it. q and out may each be f32 or f16 (f16
 * out with accumulate: read, added in f32, rounded once); the adapter keys, values and gate are f32.
 *
 * @param rec The recorder.
 * @param out Output `(B, T, H, D)` f32 or f16 (N = B*T rows).
 * @param q Queries `(B, T, H, D)` f32 or f16.
 * @param ka Adapter keys `(L, Hkv, D)` f32.
 * @param va Adapter values `(L, Hkv, D)` f32.
 * @param gate f32 gate: `(1)` for `"scalar"`, `(H)` for the per-head kinds.
 * @param opts Sizes, scale, gate kind, accumulate.
 */
export function adapterAttentionForward(
  rec: Recorder,
  out: Tensor, // (B, T, H, D)
  q: Tensor, // (B, T, H, D)
  ka: Tensor, // (L, Hkv, D)
  va: Tensor, // (L, Hkv, D)
  gate: Tensor, // (1) or (H)
  opts: AdapterAttentionOptions,
): void {
  checkAdapterAttention(opts, q, ka, va, gate);
  const qt = activationType(rec.gpu, q, "adapterAttentionForward q");
  const ot = activationType(rec.gpu, out, "adapterAttentionForward out");
  const D = opts.headDim;
  if (D % (4 * SPLIT_THREADS) === 0) {
    const wgs = Math.ceil((opts.rows * opts.numHeads) / SPLIT_PAIRS);
    const gx = Math.min(wgs, 65535);
    rec.dispatch(
      forwardSplitKernel(D, lmaxOf(opts.adapterLen), qt, ot),
      [q, ka, va, gate, out],
      params(opts, gx, 0),
      [gx, Math.ceil(wgs / gx)],
    );
    return;
  }
  const { groups, stride } = grid1d(opts.rows * opts.numHeads, WG);
  rec.dispatch(forwardKernel(D, qt, ot), [q, ka, va, gate, out], params(opts, stride, 0), groups);
}

// ---------------------------------------------------------------------------------------------------
// Backward

function lmaxOf(L: number): number {
  return Math.max(8, 2 ** Math.ceil(Math.log2(L)));
}

function rowsPerChunk(L: number): number {
  return lmaxOf(L) <= 16 ? 32 : 16;
}

/**
 * The backward partials kernels' bindings (q, ka, va, gate, dout, dq, the scratch, the uniform) and params;
 * with `vec4`, q, dout and dq are vec4 arrays (D a multiple of 4).
 */
function backwardBindings(qt: ActivationType, vec4 = false): string {
  const v = (t: string) => (vec4 ? `vec4<${t}>` : t);
  return `${enableF16(qt)}${PARAMS}
@group(0) @binding(0) var<storage, read> q: array<${v(qt)}>;
@group(0) @binding(1) var<storage, read> ka: array<f32>;
@group(0) @binding(2) var<storage, read> va: array<f32>;
@group(0) @binding(3) var<storage, read> gate: array<f32>;
@group(0) @binding(4) var<storage, read> dout: array<${v("f32")}>;
@group(0) @binding(5) var<storage, read_write> dq: array<${v("f32")}>;
// scratch: [dka partials (G, H, L, D) | dva partials (G, H, L, D) | dgate partials (G, H)], G = row groups
@group(0) @binding(6) var<storage, read_write> scr: array<f32>;
@group(0) @binding(7) var<uniform> p: P;`;
}

function partialsKernel(D: number, LMAX: number, RC: number, SUB: number, qt: ActivationType): Kernel {
  const DV = dvOf(D);
  const qd = ld(qt, "q[qb + d]");
  return defineKernel(
    "adapter_attention_bwd_partials",
    { D, LMAX, RC, SUB, qt },
    ["read", "read", "read", "read", "read", "write", "write", "uniform"],
    () => `
${backwardBindings(qt)}
const D: u32 = ${D}u;
const RC: u32 = ${RC}u;
const LMAX: u32 = ${LMAX}u;
var<workgroup> Qs: array<f32, ${RC * D}>;
var<workgroup> Os: array<f32, ${RC * D}>;
var<workgroup> Ps: array<f32, ${RC * LMAX}>;
var<workgroup> DSs: array<f32, ${RC * LMAX}>;
var<workgroup> Gs: array<f32, ${RC}>;
${GATE_FN}
@compute @workgroup_size(${WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) tid: u32) {
  let grp = wid.x;
  let h = wid.y;
  let kvh = h / (p.H / p.Hkv);
  let g = gateOf(h);
  let LD = p.L * D;
  let slot = (grp * p.H + h) * LD;
  let half = p.nGroups * p.H * LD;
  for (var sub = 0u; sub < ${SUB}u; sub++) {
    let r0 = (grp * ${SUB}u + sub) * RC;
    workgroupBarrier();
    if (tid < RC) {
      let n = r0 + tid;
      let rb = tid * LMAX;
      if (n < p.rows) {
        let qb = (n * p.H + h) * D;
${
      each(DV, (c) =>
        `        let q${c} = ${vecLoad(D, c, "q", "qb", qt)};\n        let o${c} = ${
          vecLoad(D, c, "dout", "qb")
        };`)
    }
        for (var d = 0u; d < D; d++) { Qs[tid * D + d] = ${qd}; Os[tid * D + d] = dout[qb + d]; }
        var m = -1.0e30;
        for (var j = 0u; j < p.L; j++) {
          let kb = (j * p.Hkv + kvh) * D;
          let s = (${each(DV, (c) => `dot(q${c}, ${vecLoad(D, c, "ka", "kb")})`, " + ")}) * p.scale;
          Ps[rb + j] = s;
          DSs[rb + j] = ${
      each(DV, (c) => `dot(o${c}, ${vecLoad(D, c, "va", "kb")})`, " + ")
    }; // a_j = dout·va_j
          m = max(m, s);
        }
        var l = 0.0;
        for (var j = 0u; j < p.L; j++) {
          let e = exp(Ps[rb + j] - m);
          Ps[rb + j] = e;
          l = l + e;
        }
        var pa = 0.0; // Σ p_j a_j = dout · (unscaled adapter output): the gate's gradient
        for (var j = 0u; j < p.L; j++) {
          let pj = Ps[rb + j] / l;
          Ps[rb + j] = pj;
          pa = pa + pj * DSs[rb + j];
        }
        Gs[tid] = pa;
${each(DV, (c) => `        var gq${c} = vec4<f32>(0.0);`)}
        for (var j = 0u; j < p.L; j++) {
          let ds = g * Ps[rb + j] * (DSs[rb + j] - pa) * p.scale; // d(score)/d(q·ka) folded with scale
          DSs[rb + j] = ds;
          let kb = (j * p.Hkv + kvh) * D;
${each(DV, (c) => `          gq${c} = gq${c} + ds * ${vecLoad(D, c, "ka", "kb")};`)}
        }
${each(DV, (c) => `        ${vecStore(D, c, "dq", "qb", `gq${c}`)}`)}
      } else {
        for (var d = 0u; d < D; d++) { Qs[tid * D + d] = 0.0; Os[tid * D + d] = 0.0; }
        for (var j = 0u; j < p.L; j++) { Ps[rb + j] = 0.0; DSs[rb + j] = 0.0; }
        Gs[tid] = 0.0;
      }
    }
    workgroupBarrier();
    for (var x = tid; x < LD; x += ${WG}u) {
      let j = x / D;
      let d = x % D;
      var sk = 0.0;
      var sv = 0.0;
      for (var r = 0u; r < RC; r++) {
        sk = sk + DSs[r * LMAX + j] * Qs[r * D + d];
        sv = sv + Ps[r * LMAX + j] * Os[r * D + d];
      }
      sv = sv * g;
      if (sub == 0u) {
        scr[slot + x] = sk;
        scr[half + slot + x] = sv;
      } else {
        scr[slot + x] = scr[slot + x] + sk;
        scr[half + slot + x] = scr[half + slot + x] + sv;
      }
    }
    if (tid == 0u) {
      var sg = 0.0;
      for (var r = 0u; r < RC; r++) { sg = sg + Gs[r]; }
      let gi = 2u * half + grp * p.H + h;
      if (sub == 0u) { scr[gi] = sg; } else { scr[gi] = scr[gi] + sg; }
    }
  }
}`,
  );
}

/** Most adapter tokens {@link pairedPartialsKernel} takes (its workgroup arrays are sized for them). */
const PAIRED_MAX_L = 16;

/**
 * The backward partials with two threads per row (L ≤ 16, L compile-time): the adapter keys and values
 * sit in workgroup memory once per workgroup; each thread of a pair dots its half of the row's q and
 * dout with them, the first thread of the pair runs the softmax over the summed halves, and both write
 * their half of dq. For the dka/dva partials each thread owns one vec4 column and a few adapter tokens,
 * reads the block's q and dout rows (cached: the pairs just read them) and keeps its sums in registers
 * across the row blocks, writing its scratch slots once.
 */
function pairedPartialsKernel(
  D: number,
  L: number,
  RC: number,
  SUB: number,
  qt: ActivationType,
  RB: number,
  vec4: boolean,
): Kernel {
  const DV = dvOf(D);
  const HALF = Math.ceil(DV / 2);
  const JG = Math.max(1, Math.floor(WG / DV)); // token groups for the dka/dva sums
  const NJ = Math.ceil(L / JG); // tokens per thread
  const J = Array.from({ length: L }, (_, j) => j);
  const I = Array.from({ length: HALF }, (_, i) => i);
  const U = Array.from({ length: NJ }, (_, u) => u);
  // D a multiple of 4: q, dout and dq are bound as vec4 arrays (one load or store per vec4 column)
  const V4 = D % 4 === 0 && vec4;
  const vecArrays = ["q", "dout", "dq"];
  // vec4 column `c` (runtime) of the row at `base` of `arr` (elements of type t), zero past D
  const load = (arr: string, base: string, c: string, t: ActivationType) =>
    V4 && vecArrays.includes(arr)
      ? `vec4<f32>(${arr}[(${base}) / 4u + ${c}])`
      : `vec4<f32>(${
        [0, 1, 2, 3].map((e) =>
          D % 4 === 0
            ? ld(t, `${arr}[${base} + 4u * ${c} + ${e}u]`)
            : `select(0.0, ${
              ld(t, `${arr}[min(${base} + 4u * ${c} + ${e}u, ${base} + ${D - 1}u)]`)
            }, 4u * ${c} + ${e}u < D)`
        ).join(", ")
      })`;
  const store = (arr: string, base: string, c: string, value: string, acc: boolean) =>
    V4 && vecArrays.includes(arr)
      ? `{ let i = (${base}) / 4u + ${c}; ${
        acc
          ? `if (p.flag != 0u) { ${arr}[i] = ${arr}[i] + ${value}; } else { ${arr}[i] = ${value}; }`
          : `${arr}[i] = ${value};`
      } }`
      : [0, 1, 2, 3].map((e) => {
        const idx = `${arr}[${base} + 4u * ${c} + ${e}u]`;
        const v = `${value}.${"xyzw"[e]}`;
        const s = acc
          ? `if (p.flag != 0u) { ${idx} = ${idx} + ${v}; } else { ${idx} = ${v}; }`
          : `${idx} = ${v};`;
        return D % 4 === 0 || e === 0 ? s : `if (4u * ${c} + ${e}u < D) { ${s} }`;
      }).join(" ");
  return defineKernel(
    "adapter_attention_bwd_pairs",
    { D, L, RC, SUB, qt, RB, vec4: vec4 && D % 4 === 0 ? 1 : 0 },
    ["read", "read", "read", "read", "read", "write", "write", "uniform"],
    () => `
${backwardBindings(qt, V4)}
const D: u32 = ${D}u;
const DV: u32 = ${DV}u;
const L: u32 = ${L}u;
var<workgroup> KA: array<vec4<f32>, ${L * DV}>;
var<workgroup> VA: array<vec4<f32>, ${L * DV}>;
var<workgroup> PT: array<f32, ${WG * L * 2}>; // per thread: its half's (q·ka_j, dout·va_j)
var<workgroup> PS: array<f32, ${RC * L}>; // p_j per row
var<workgroup> DS: array<f32, ${RC * L}>; // ds_j per row (gate and scale folded in)
var<workgroup> Gs: array<f32, ${RC}>; // Σ p_j a_j per row: the gate's gradient
${GATE_FN}
@compute @workgroup_size(${WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) tid: u32) {
  let grp = wid.x;
  let h = wid.y;
  let kvh = h / (p.H / p.Hkv);
  let g = gateOf(h);
  for (var x = tid; x < L * DV; x += ${WG}u) {
    let kb = ((x / DV) * p.Hkv + kvh) * D;
    let c = x % DV;
    KA[x] = ${load("ka", "kb", "c", "f32")};
    VA[x] = ${load("va", "kb", "c", "f32")};
  }
  let r = tid / 2u; // this pair's row in the block
  let z = tid % 2u; // this thread's half of the row
  let col = tid % DV; // dka/dva: this thread's vec4 column and token group
  let jg = tid / DV;
${U.map((u) => `  var sk${u} = vec4<f32>(0.0);\n  var sv${u} = vec4<f32>(0.0);`).join("\n")}
  var sg = 0.0;
  for (var sub = 0u; sub < ${SUB}u; sub++) {
    let r0 = (grp * ${SUB}u + sub) * ${RC}u;
    let n = r0 + r;
    let valid = n < p.rows;
    let qb = (min(n, p.rows - 1u) * p.H + h) * D;
    workgroupBarrier();
${
      I.map((i) =>
        `    let c${i} = min(z * ${HALF}u + ${i}u, DV - 1u);
    let own${i} = z * ${HALF}u + ${i}u < DV;
    let q${i} = select(vec4<f32>(0.0), ${load("q", "qb", `c${i}`, qt)}, own${i});
    let o${i} = select(vec4<f32>(0.0), ${load("dout", "qb", `c${i}`, "f32")}, own${i});`
      ).join("\n")
    }
${
      J.map((j) =>
        `    PT[(tid * L + ${j}u) * 2u] = ${I.map((i) => `dot(q${i}, KA[${j * DV}u + c${i}])`).join(" + ")};
    PT[(tid * L + ${j}u) * 2u + 1u] = ${I.map((i) => `dot(o${i}, VA[${j * DV}u + c${i}])`).join(" + ")};`
      ).join("\n")
    }
    workgroupBarrier();
    if (z == 0u) {
${
      J.map((j) =>
        `      let s${j} = (PT[(tid * L + ${j}u) * 2u] + PT[((tid + 1u) * L + ${j}u) * 2u]) * p.scale;
      let a${j} = PT[(tid * L + ${j}u) * 2u + 1u] + PT[((tid + 1u) * L + ${j}u) * 2u + 1u];`
      ).join("\n")
    }
      let m = ${J.map((j) => `s${j}`).reduce((x, y) => `max(${x}, ${y})`)};
${J.map((j) => `      let e${j} = exp(s${j} - m);`).join("\n")}
      let inv = 1.0 / (${J.map((j) => `e${j}`).join(" + ")});
      let pa = (${J.map((j) => `e${j} * a${j}`).join(" + ")}) * inv; // Σ p_j a_j
      let keep = select(0.0, 1.0, valid);
${
      J.map((j) =>
        `      PS[r * L + ${j}u] = e${j} * inv * keep;
      DS[r * L + ${j}u] = g * e${j} * inv * (a${j} - pa) * p.scale * keep;`
      ).join("\n")
    }
      Gs[r] = pa * keep;
    }
    workgroupBarrier();
    if (valid) {
${
      I.map((i) =>
        `      if (own${i}) {
        let gq = ${J.map((j) => `DS[r * L + ${j}u] * KA[${j * DV}u + c${i}]`).join(" + ")};
        ${store("dq", "qb", `c${i}`, "gq", true)}
      }`
      ).join("\n")
    }
    }
    if (jg < ${JG}u) {
      ${
      RB > 1
        ? `if (r0 + ${RC}u <= p.rows) {
        // a whole block: ${RB} rows' loads issued together, then their sums
        for (var rr0 = 0u; rr0 < ${RC}u; rr0 += ${RB}u) {
${
          range(RB).map((i) =>
            `          let rb${i} = ((r0 + rr0 + ${i}u) * p.H + h) * D;
          let qv${i} = ${load("q", `rb${i}`, "col", qt)};
          let ov${i} = ${load("dout", `rb${i}`, "col", "f32")};`
          ).join("\n")
        }
${
          U.map((u) =>
            `          if (jg + ${u * JG}u < L) {
${
              range(RB).map((i) =>
                `            sk${u} = sk${u} + DS[(rr0 + ${i}u) * L + jg + ${u * JG}u] * qv${i};
            sv${u} = sv${u} + PS[(rr0 + ${i}u) * L + jg + ${u * JG}u] * ov${i};`
              ).join("\n")
            }
          }`
          ).join("\n")
        }
        }
      } else {`
        : "{"
    }
      for (var rr = 0u; rr < ${RC}u; rr++) {
        let nn = r0 + rr;
        if (nn >= p.rows) { break; }
        let rb = (nn * p.H + h) * D;
        let qv = ${load("q", "rb", "col", qt)};
        let ov = ${load("dout", "rb", "col", "f32")};
${
      U.map((u) =>
        `        if (jg + ${u * JG}u < L) {
          sk${u} = sk${u} + DS[rr * L + jg + ${u * JG}u] * qv;
          sv${u} = sv${u} + PS[rr * L + jg + ${u * JG}u] * ov;
        }`
      ).join("\n")
    }
      }
      }
    }
    if (tid == 0u) {
      for (var rr = 0u; rr < ${RC}u; rr++) { sg = sg + Gs[rr]; }
    }
  }
  let LD = L * D;
  let slot = (grp * p.H + h) * LD;
  let half = p.nGroups * p.H * LD;
  if (jg < ${JG}u) {
${
      U.map((u) =>
        `    if (jg + ${u * JG}u < L) {
      let jb = slot + (jg + ${u * JG}u) * D;
      ${store("scr", "jb", "col", `sk${u}`, false)}
      ${store("scr", "half + jb", "col", `(sv${u} * g)`, false)}
    }`
      ).join("\n")
    }
  }
  if (tid == 0u) { scr[2u * half + grp * p.H + h] = sg; }
}`,
  );
}

/** Threads of the reduction workgroup. */
const RED_WG = 256;

/**
 * Sums the partials kernel's slots: dka/dva over every row-block slot and the query heads of a key/value
 * head, dgate over the slots (and the heads, for a scalar gate). Each output is summed by `slices` threads,
 * slice s taking slots s, s + slices, ... in order, then a tree over the slices in workgroup memory: a fixed
 * order (deterministic), and (at 8) 8x fewer dependent loads per thread than one thread per output (the
 * adapter's L x Hkv x D outputs are few, so one thread each summed all slots in a long chain).
 */
function reduceKernel(D: number, slices: number): Kernel {
  const RED_SLICES = slices, RED_OUTS = RED_WG / slices;
  return defineKernel(
    "adapter_attention_bwd_reduce",
    { D, slices },
    ["read", "read", "write", "write", "write", "uniform"],
    () => `
${PARAMS}
@group(0) @binding(0) var<storage, read> scr: array<f32>;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read_write> dka: array<f32>;
@group(0) @binding(3) var<storage, read_write> dva: array<f32>;
@group(0) @binding(4) var<storage, read_write> dgate: array<f32>;
@group(0) @binding(5) var<uniform> p: P;
const D: u32 = ${D}u;
const S: u32 = ${RED_SLICES}u;
const OUTS: u32 = ${RED_OUTS}u;
var<workgroup> rk: array<f32, ${RED_WG}>;
var<workgroup> rv: array<f32, ${RED_WG}>;
@compute @workgroup_size(${RED_WG}) fn main(
  @builtin(workgroup_id) wid: vec3u,
  @builtin(local_invocation_index) tid: u32,
) {
  let slice = tid / OUTS;
  let idx = (wid.x + wid.y * p.stride) * OUTS + tid % OUTS;
  let LD = p.L * D;
  let HLD = p.Hkv * LD;
  let half = p.nGroups * p.H * LD;
  let group = p.H / p.Hkv;
  let nGate = select(p.H, 1u, p.gmode == 0u);
  var sk = 0.0;
  var sv = 0.0;
  if (idx < HLD) {
    let kvh = idx / LD;
    let x = idx % LD;
    for (var c = slice; c < p.nGroups; c += S) {
      for (var hh = 0u; hh < group; hh++) {
        let at = (c * p.H + kvh * group + hh) * LD + x;
        sk = sk + scr[at];
        sv = sv + scr[half + at];
      }
    }
  } else if (idx < HLD + nGate) {
    let gi = idx - HLD;
    for (var c = slice; c < p.nGroups; c += S) {
      if (p.gmode == 0u) {
        for (var h = 0u; h < p.H; h++) { sk = sk + scr[2u * half + c * p.H + h]; }
      } else {
        sk = sk + scr[2u * half + c * p.H + gi];
      }
    }
  }
  rk[tid] = sk;
  rv[tid] = sv;
  workgroupBarrier();
  for (var st = S / 2u; st > 0u; st = st / 2u) {
    if (slice < st) {
      rk[tid] = rk[tid] + rk[tid + st * OUTS];
      rv[tid] = rv[tid] + rv[tid + st * OUTS];
    }
    workgroupBarrier();
  }
  if (slice != 0u) { return; }
  if (idx < HLD) {
    let kvh = idx / LD;
    let x = idx % LD;
    // scratch is (L, Hkv, D)-ordered; ka/va are (L, Hkv, D) as the k/v projections write them
    let o = ((x / D) * p.Hkv + kvh) * D + x % D;
    dka[o] = rk[tid];
    dva[o] = rv[tid];
  } else if (idx < HLD + nGate) {
    let gi = idx - HLD;
    var g = rk[tid];
    if (p.gmode == 2u) {
      let t = tanh(gate[gi]);
      g = g * (1.0 - t * t);
    }
    dgate[gi] = g;
  }
}`,
  );
}

const scratchCache = new WeakMap<GPUBuffer, Tensor>();

function scratchFor(rec: Recorder, dka: Tensor, n: number): Tensor {
  return cachedScratch(scratchCache, rec.gpu, dka, n, "adapter attention partials");
}

/**
 * Records the adapter attention backward: dq (added into with `opts.accumulate`, after the main
 * attention's backward wrote it), and dka, dva, dgate summed over all rows (and, for dka/dva, over the
 * query heads sharing a key/value head; for a scalar gate, over all heads), deterministically. The saved
 * q may be f32 or f16; dout and every gradient are f32.
 *
 * @param rec The recorder.
 * @param dq Gradient of q `(B, T, H, D)`; overwritten, or added into with `opts.accumulate`.
 * @param dka Gradient of the adapter keys `(L, Hkv, D)`, overwritten.
 * @param dva Gradient of the adapter values `(L, Hkv, D)`, overwritten.
 * @param dgate Gradient of the gate `(1)` or `(H)` (through tanh for `"per-head-tanh"`), overwritten.
 * @param dout Gradient of the attention output `(B, T, H, D)` f32.
 * @param q Queries `(B, T, H, D)`, f32 or f16.
 * @param ka Adapter keys `(L, Hkv, D)`.
 * @param va Adapter values `(L, Hkv, D)`.
 * @param gate The gate `(1)` or `(H)`.
 * @param opts The forward's options (`accumulate` applies to dq).
 */
export function adapterAttentionBackward(
  rec: Recorder,
  dq: Tensor, // (B, T, H, D)
  dka: Tensor, // (L, Hkv, D)
  dva: Tensor, // (L, Hkv, D)
  dgate: Tensor, // (1) or (H)
  dout: Tensor, // (B, T, H, D)
  q: Tensor, // (B, T, H, D)
  ka: Tensor, // (L, Hkv, D)
  va: Tensor, // (L, Hkv, D)
  gate: Tensor, // (1) or (H)
  opts: AdapterAttentionOptions,
): void {
  checkAdapterAttention(opts, q, ka, va, gate);
  const qt = activationType(rec.gpu, q, "adapterAttentionBackward q");
  for (const [name, t] of Object.entries({ dq, dka, dva, dgate, dout })) {
    if (t.dtype !== "f32") throw new GpuError(`adapterAttentionBackward: ${name} must be f32, is ${t.dtype}`);
  }
  const { numHeads: H, numKvHeads: Hkv, headDim: D, adapterLen: L, rows: N } = opts;
  const LMAX = lmaxOf(L);
  const RC = rowsPerChunk(L);
  const SUB = adapterSubChunks(N, H, RC);
  const nGroups = Math.max(1, Math.ceil(N / (RC * SUB)));
  if (nGroups > rec.gpu.limits.maxComputeWorkgroupsPerDimension) {
    throw new GpuError(`adapter attention backward: ${N} rows is too many for one dispatch; split the rows`);
  }
  const scr = scratchFor(rec, dka, 2 * nGroups * H * L * D + nGroups * H);
  const paired = adapterAttentionTuning.pairs && L <= PAIRED_MAX_L && RC === 32;
  if (paired && RC % adapterAttentionTuning.rowBatch !== 0) {
    throw new GpuError(
      `adapterAttentionTuning.rowBatch must divide ${RC}, got ${adapterAttentionTuning.rowBatch}`,
    );
  }
  rec.dispatch(
    paired
      ? pairedPartialsKernel(D, L, RC, SUB, qt, adapterAttentionTuning.rowBatch, adapterAttentionTuning.vec4)
      : partialsKernel(D, LMAX, RC, SUB, qt),
    [q, ka, va, gate, dout, dq, scr],
    params(opts, 0, nGroups),
    [nGroups, H],
  );
  const nGate = opts.gateKind === "scalar" ? 1 : H;
  const slices = adapterAttentionTuning.reduceSlices;
  if (![1, 2, 4, 8].includes(slices)) {
    throw new GpuError(`adapterAttentionTuning.reduceSlices must be 1, 2, 4 or 8, got ${slices}`);
  }
  const { groups, stride } = grid1d(Math.ceil((Hkv * L * D + nGate) / (RED_WG / slices)), 1);
  rec.dispatch(reduceKernel(D, slices), [scr, gate, dka, dva, dgate], params(opts, stride, nGroups), groups);
}
