/**
 * Causal / padded / sliding-window multi-head attention with grouped-query heads, FlashAttention style:
 * no `[T, S]` score matrix is ever written to memory. The forward runs one workgroup per (batch, head,
 * query block); it loops over key blocks staged in workgroup memory and keeps an online softmax (running
 * max and sum) per query row, and saves the log-sum-exp of every row for the backward. For short query
 * blocks (decode: T = 1 or a few) the lanes of a row split the keys of each block between them and their
 * partial softmax states are merged at the end, so decode still keeps 32 lanes busy per (batch, head).
 *
 * The backward is FlashAttention-2's, without atomics and deterministic: a small kernel computes
 * `Di = rowsum(dout_i * out_i)`, one pass parallel over key blocks computes dk and dv (looping over the
 * query rows and over the query heads that share the key/value head), and one pass parallel over query
 * blocks computes dq. Both recompute `p = exp(s - lse)` from q, k and the saved lse, unless the dk/dv
 * pass leaves the `ds` it computed in a scratch (`dqFromScores` in `attentionTuning`, while the `B·H·T·S`
 * floats fit its budget): dq is then the product `ds k` over the visible keys.
 *
 * For D ≤ 64 the forward (T ≥ 48) runs a lane kernel, the dk/dv pass a tiled one and dq the product from
 * the scores, or a lane kernel (see "Lane kernels" and "Tiled kernels" below; they load their next block
 * into registers while computing the current one, and the dk/dv tile is chosen by the device's workgroup
 * memory, see `attentionTuning`); the forward can fold in the layer's adapter attention. The tiled dk/dv pass
 * runs one workgroup per (key block, query head, batch) and, under GQA, writes per-head partials that a
 * second small kernel sums in a fixed order (still deterministic, no atomics).
 *
 * Semantics follow HF eager/sdpa attention: `s = q·k * scale`; keys hidden by the causal mask, the
 * padding mask (HF `attention_mask`, 0 = padded key) or the sliding window (`i - j < window`, i.e. HF's
 * `kv_idx > q_idx - sliding_window`) get `-inf`; softmax in f32; `out = p·v`. A query row whose keys are
 * all hidden (a padded position, e.g. the first positions under left padding) gets `out = 0` and
 * `lse = 0` — never NaN — where HF returns NaN or a uniform average; such rows are padding whose outputs
 * the loss ignores, and the backward gives them zero gradients.
 *
 * Layouts: q and out `(B, T, H, D)`; k and v `(B, kvStride, Hkv, D)` where the first `keyLen` positions
 * of each batch row are valid (a preallocated KV cache has `kvStride = Smax`); the mask, when given, is
 * i32 `(B, kvStride)` (only the first `keyLen` columns are read); lse and the scratch `Di` are `(B, H, T)`.
 * Query head h uses key/value head `floor(h / (H / Hkv))` directly (no copies of K/V per head).
 *
 * Element types: q, k, v and out (the forward's output, read again by the backward) may each be f32 or
 * f16 — f16 is storage only: values are loaded into f32, staged in f32 workgroup tiles, computed in f32
 * and rounded once at the store. lse, dout and the gradients dq, dk, dv are always f32.
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
import { cachedScratch, createTensor, type Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";
import { grid1d } from "./fill.ts";
import { addInto } from "./activation.ts";
import {
  ADAPTER_GATE_MODE,
  adapterAttentionForward,
  type AdapterAttentionOptions,
  checkAdapterAttention,
  gateFunction,
  type GateKind,
} from "./adapter_attention.ts";

/** Options shared by {@link attentionForward} and {@link attentionBackward}. */
export interface AttentionOptions {
  /** H: query heads. */
  numHeads: number;
  /** Hkv: key/value heads (H is a multiple of it). */
  numKvHeads: number;
  /** D: head size. */
  headDim: number;
  /** B: batch size. */
  batch: number;
  /** T: query positions. */
  queryLen: number;
  /** S: valid key positions (S ≥ T); k/v may hold more (see `kvStride`). */
  keyLen: number;
  /** Positions per batch row in k, v (and the mask); default `keyLen`. */
  kvStride?: number;
  /** Score scale, `1/sqrt(D)` for llama (and gpt2 with `scale_attn_weights`). */
  scale: number;
  /** Whether query t sees only keys at positions ≤ its own. */
  causal: boolean;
  /** Query t sits at key position `queryOffset + t`; default `keyLen - queryLen`. */
  queryOffset?: number;
  /** Mistral sliding window: key j is visible to query i only if `i - j < slidingWindow`. */
  slidingWindow?: number | null;
  /** Backward only: add into dq, dk, dv instead of overwriting them. */
  accumulate?: boolean;
}

const NEG = "-1.0e30";

interface Resolved {
  B: number;
  T: number;
  S: number;
  H: number;
  Hkv: number;
  D: number;
  kvStride: number;
  qOff: number;
  window: number;
  causal: number;
}

function resolve(o: AttentionOptions): Resolved {
  const { numHeads: H, numKvHeads: Hkv, headDim: D, batch: B, queryLen: T, keyLen: S } = o;
  const kvStride = o.kvStride ?? S;
  const qOff = o.queryOffset ?? S - T;
  const window = o.slidingWindow ?? 0;
  if (H % Hkv !== 0) throw new GpuError(`attention: numHeads ${H} is not a multiple of numKvHeads ${Hkv}`);
  if (kvStride < S) throw new GpuError(`attention: kvStride ${kvStride} < keyLen ${S}`);
  if (qOff < 0) throw new GpuError(`attention: queryOffset ${qOff} < 0 (keyLen ${S} < queryLen ${T}?)`);
  if (window < 0) throw new GpuError(`attention: slidingWindow ${window} < 0`);
  return { B, T, S, H, Hkv, D, kvStride, qOff, window, causal: o.causal ? 1 : 0 };
}

// ---------------------------------------------------------------------------------------------------
// WGSL generation helpers: D is a compile-time option, each row of D floats lives in DV named vec4s
// (constant indices, so nothing spills), and loads/stores touch only the D real components.

function dv(D: number): number {
  return Math.ceil(D / 4);
}

/** Element types of the activation bindings: queries, keys, values, attention output. */
interface ActTypes {
  qt: ActivationType;
  kt: ActivationType;
  vt: ActivationType;
  ot: ActivationType;
}

/** The element `e` of an array of type `t`, as f32 (the text itself for f32). */
function ld(t: ActivationType, e: string): string {
  return t === "f32" ? e : `f32(${e})`;
}

/** The f32 value `e` converted for a store into an array of type `t` (the text itself for f32). */
function st(t: ActivationType, e: string): string {
  return t === "f32" ? e : `${t}(${e})`;
}

/** The vec4<f32> value `v` converted for a store into a vec4 array of type `t` (the text itself for f32). */
function stVec(t: ActivationType, v: string): string {
  return t === "f32" ? v : `vec4<f16>(${v})`;
}

/** `idx = value`, or `idx += value` when `addIf` holds, for an array element of type `t`. */
function storeOrAdd(t: ActivationType, idx: string, val: string, addIf: string): string {
  // branch rather than `flag * old`: an overwritten output may hold NaN (0 * NaN = NaN)
  return addIf
    ? `if (${addIf}) { ${idx} = ${st(t, `${ld(t, idx)} + ${val}`)}; } else { ${idx} = ${st(t, val)}; }`
    : `${idx} = ${st(t, val)};`;
}

/**
 * The vec4 `c` of the row at `arr[base ..]` as vec4<f32>; with `vec` the array is bound as vec4s of its
 * element type (D a multiple of 4, `base` a multiple of 4): one 16-byte (f32) or 8-byte (f16) load.
 */
function vecLoad(
  D: number,
  c: number,
  arr: string,
  base: string,
  t: ActivationType = "f32",
  vec = false,
): string {
  if (vec) return `vec4<f32>(${arr}[(${base}) / 4u + ${c}u])`;
  const comps = [0, 1, 2, 3].map((e) => (4 * c + e < D ? ld(t, `${arr}[${base} + ${4 * c + e}u]`) : "0.0"));
  return `vec4<f32>(${comps.join(", ")})`;
}

function vecStore(
  D: number,
  c: number,
  arr: string,
  base: string,
  value: string,
  addIf: string,
  t: ActivationType = "f32",
): string {
  const lines: string[] = [];
  const xyzw = "xyzw";
  for (let e = 0; e < 4 && 4 * c + e < D; e++) {
    lines.push(storeOrAdd(t, `${arr}[${base} + ${4 * c + e}u]`, `${value}.${xyzw[e]}`, addIf));
  }
  return lines.join(" ");
}

function each(n: number, f: (c: number) => string, sep = "\n"): string {
  return Array.from({ length: n }, (_, c) => f(c)).join(sep);
}

function dotRow(n: number, vars: string, arr: string, base: string): string {
  return each(n, (c) => `dot(${vars}${c}, ${arr}[${base} + ${c}u])`, " + ");
}

const PARAMS = `struct P {
  B: u32, T: u32, S: u32, H: u32,
  Hkv: u32, kvStride: u32, qOff: u32, window: u32,
  causal: u32, useMask: u32, flag: u32, scale: f32,
  outPerHead: u32, gridStride: u32, aMode: u32, aScale: f32,
}`;

/** The WGSL element type of an activation array: `t`, or `vec4<t>` when it is read as vec4s. */
function elem(t: ActivationType, vec: boolean): string {
  return vec ? `vec4<${t}>` : t;
}

/**
 * The forward kernels' first bindings: q, k, v, the mask, out and lse (each kernel adds the rest); with
 * `vec`, q, k, v and out are bound as vec4s (see {@link vecLoad}).
 */
function forwardBindings(ty: ActTypes, vec = false): string {
  return `@group(0) @binding(0) var<storage, read> q: array<${elem(ty.qt, vec)}>;
@group(0) @binding(1) var<storage, read> k: array<${elem(ty.kt, vec)}>;
@group(0) @binding(2) var<storage, read> v: array<${elem(ty.vt, vec)}>;
@group(0) @binding(3) var<storage, read> mask: array<i32>;
@group(0) @binding(4) var<storage, read_write> out: array<${elem(ty.ot, vec)}>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;`;
}

/** The dq kernels' bindings: q, k, v, the mask, dout, the stats [lse | Di], dq and the params. */
function dqBindings(ty: BwdTypes): string {
  return `@group(0) @binding(0) var<storage, read> q: array<${ty.qt}>;
@group(0) @binding(1) var<storage, read> k: array<${ty.kt}>;
@group(0) @binding(2) var<storage, read> v: array<${ty.vt}>;
@group(0) @binding(3) var<storage, read> mask: array<i32>;
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read> stats: array<f32>;
@group(0) @binding(6) var<storage, read_write> dq: array<f32>;
@group(0) @binding(7) var<uniform> p: P;`;
}

// Key j is visible to query position i (both absolute positions) in batch row b.
const VISIBLE = `
fn visible(b: u32, i: u32, j: u32) -> bool {
  if (j >= p.S) { return false; }
  if (p.causal != 0u && j > i) { return false; }
  if (p.window != 0u && i >= j + p.window) { return false; }
  if (p.useMask != 0u && mask[b * p.kvStride + j] == 0) { return false; }
  return true;
}`;

function params(
  r: Resolved,
  useMask: boolean,
  flag: number,
  scale: number,
  outPerHead = 0,
  gridStride = 0,
  adapter: { mode: number; scale: number } = { mode: 0, scale: 0 },
): (number | { f32: number })[] {
  return [
    r.B,
    r.T,
    r.S,
    r.H,
    r.Hkv,
    r.kvStride,
    r.qOff,
    r.window,
    r.causal,
    useMask ? 1 : 0,
    flag,
    f32(scale),
    outPerHead,
    gridStride,
    adapter.mode,
    f32(adapter.scale),
  ];
}

/** Key-block size: 32 keys for D ≤ 64, 16 above (workgroup memory). */
function keyBlock(D: number): number {
  return D <= 64 ? 32 : 16;
}

// ---------------------------------------------------------------------------------------------------
// Forward

function forwardKernel(D: number, R: number, ty: ActTypes): Kernel {
  const DVn = dv(D);
  const BK = keyBlock(D);
  const KS = R >= 64 ? 1 : 32 / R; // lanes per query row
  const WG = R * KS;
  const { qt, kt, vt, ot } = ty;
  const ke = ld(kt, "k[base + e]");
  const ve = ld(vt, "v[base + e]");
  return defineKernel("attention_fwd", { D, R, ...ty }, [
    "read",
    "read",
    "read",
    "read",
    "write",
    "write",
    "uniform",
  ], () => `
${enableF16(qt, kt, vt, ot)}${PARAMS}
${forwardBindings(ty)}
@group(0) @binding(6) var<uniform> p: P;
const D: u32 = ${D}u;
const DV: u32 = ${DVn}u;
const BK: u32 = ${BK}u;
const KS: u32 = ${KS}u;
const WG: u32 = ${WG}u;
const NEG: f32 = ${NEG};
var<workgroup> Ks: array<vec4<f32>, ${BK * DVn}>;
var<workgroup> Vs: array<vec4<f32>, ${BK * DVn}>;
var<workgroup> Ps: array<f32, ${R * (BK + 1)}>;
${KS > 1 ? `var<workgroup> Ms: array<f32, ${WG}>;\nvar<workgroup> Red: array<vec4<f32>, ${WG * DVn}>;` : ""}
${VISIBLE}
@compute @workgroup_size(${WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) tid: u32) {
  let row = tid / KS;
  let lane = tid % KS;
  let t0 = wid.x * ${R}u;
  let h = wid.y;
  let b = wid.z;
  let kvh = h / (p.H / p.Hkv);
  let t = t0 + row;
  let rowValid = t < p.T;
  let i = p.qOff + t;
  let qb = ((b * p.T + min(t, p.T - 1u)) * p.H + h) * D;
${each(DVn, (c) => `  let q${c} = ${vecLoad(D, c, "q", "qb", qt)};`)}
${each(DVn, (c) => `  var a${c} = vec4<f32>(0.0);`)}
  var m = NEG;
  var l = 0.0;
  let tLast = min(t0 + ${R}u, p.T) - 1u;
  let kEnd = select(p.S, min(p.S, p.qOff + tLast + 1u), p.causal != 0u);
  let iFirst = p.qOff + t0;
  let kStart = select(0u, iFirst + 1u - p.window, p.window != 0u && iFirst + 1u > p.window);
  for (var k0 = kStart; k0 < kEnd; k0 += BK) {
    workgroupBarrier();
    for (var x = tid; x < BK * DV; x += WG) {
      let j = k0 + x / DV;
      let c = x % DV;
      var kv = vec4<f32>(0.0);
      var vv = vec4<f32>(0.0);
      if (j < kEnd) {
        let base = ((b * p.kvStride + j) * p.Hkv + kvh) * D + 4u * c;
        ${D % 4 === 0 ? "" : "if (4u * c + 4u <= D) {"}
          kv = vec4<f32>(${[0, 1, 2, 3].map((e) => ld(kt, e ? `k[base + ${e}u]` : "k[base]")).join(", ")});
          vv = vec4<f32>(${[0, 1, 2, 3].map((e) => ld(vt, e ? `v[base + ${e}u]` : "v[base]")).join(", ")});
        ${
    D % 4 === 0 ? "" : `} else {
          for (var e = 0u; 4u * c + e < D; e++) { kv[e] = ${ke}; vv[e] = ${ve}; }
        }`
  }
      }
      Ks[x] = kv;
      Vs[x] = vv;
    }
    workgroupBarrier();
    var mb = NEG;
    for (var jj = lane; jj < BK; jj += KS) {
      let j = k0 + jj;
      var s = NEG;
      if (rowValid && j < kEnd && visible(b, i, j)) {
        let kb = jj * DV;
        s = (${dotRow(DVn, "q", "Ks", "kb")}) * p.scale;
      }
      Ps[row * ${BK + 1}u + jj] = s;
      mb = max(mb, s);
    }
    let mNew = max(m, mb);
    let corr = exp(m - mNew);
    l = l * corr;
${each(DVn, (c) => `    a${c} = a${c} * corr;`)}
    for (var jj = lane; jj < BK; jj += KS) {
      let s = Ps[row * ${BK + 1}u + jj];
      if (s > NEG * 0.5) {
        let pj = exp(s - mNew);
        l = l + pj;
        let vb = jj * DV;
${each(DVn, (c) => `        a${c} = a${c} + pj * Vs[vb + ${c}u];`)}
      }
    }
    m = mNew;
  }
${
    KS === 1
      ? `  if (rowValid) {
    let inv = select(0.0, 1.0 / l, l > 0.0);
    let ob = ((b * p.T + t) * p.H + h) * D;
${each(DVn, (c) => `    ${vecStore(D, c, "out", "ob", `(a${c} * inv)`, "", ot)}`)}
    if (p.flag != 0u) { lse[(b * p.H + h) * p.T + t] = select(0.0, m + log(l), l > 0.0); }
  }`
      : `  Ms[tid] = m;
  workgroupBarrier();
  var mr = NEG;
  for (var z = 0u; z < KS; z++) { mr = max(mr, Ms[row * KS + z]); }
  let f = exp(m - mr);
  workgroupBarrier();
  Ms[tid] = l * f;
${each(DVn, (c) => `  Red[tid * DV + ${c}u] = a${c} * f;`)}
  workgroupBarrier();
  if (rowValid && lane == 0u) {
    var lt = 0.0;
${each(DVn, (c) => `    var o${c} = vec4<f32>(0.0);`)}
    for (var z = 0u; z < KS; z++) {
      let y = row * KS + z;
      lt = lt + Ms[y];
${each(DVn, (c) => `      o${c} = o${c} + Red[y * DV + ${c}u];`)}
    }
    let inv = select(0.0, 1.0 / lt, lt > 0.0);
    let ob = ((b * p.T + t) * p.H + h) * D;
${each(DVn, (c) => `    ${vecStore(D, c, "out", "ob", `(o${c} * inv)`, "", ot)}`)}
    if (p.flag != 0u) { lse[(b * p.H + h) * p.T + t] = select(0.0, mr + log(lt), lt > 0.0); }
  }`
  }
}`);
}

// ---------------------------------------------------------------------------------------------------
// Tiled kernels (D ≤ 64, the model shapes): every tile (rows of q / dout / k / v) sits in workgroup memory
// as rows of vec4 padded to an odd stride (no bank conflicts), and 128 threads work as a 16 × 8 grid: in
// the score phase thread (ra, ca) computes an RT × KT block of scores (rows RT*ra + i, columns ca + 8j)
// from vec4 dot products, in the accumulation phase it owns the same RT rows and the vec4 columns
// ca + 8*cc of the output. Probabilities / score gradients travel between the phases through workgroup
// memory. No per-key barriers: three or four per tile of 16-32 keys or queries. The dk/dv pass takes its
// RT × KT from `attentionTuning.dkdvTiles` (see there) and loads the next query block into registers while
// it computes the current one.

const TILE_MAX_D = 64;
const NT = 128; // threads per tiled workgroup: 16 row groups × 8 column groups

function oddStride(DVn: number): number {
  return DVn % 2 === 0 ? DVn + 1 : DVn;
}

/**
 * WGSL statements filling the vec4 `dst` from `arr[base ..]` (of type t), only the components below D; with
 * `vec` (D a multiple of 4) one vec4 load from the array bound as vec4s.
 */
function gather(
  D: number,
  dst: string,
  arr: string,
  base: string,
  c: string,
  t: ActivationType,
  vec = false,
): string {
  if (vec) return `${dst} = vec4<f32>(${arr}[(${base}) / 4u]);`;
  const at = (e: number) => ld(t, e ? `${arr}[${base} + ${e}u]` : `${arr}[${base}]`);
  if (D % 4 === 0) return `${dst} = vec4<f32>(${at(0)}, ${at(1)}, ${at(2)}, ${at(3)});`;
  return `${dst}.x = ${at(0)}; ` +
    [1, 2, 3].map((e) => `if (4u * ${c} + ${e}u < D) { ${dst}.${"xyzw"[e]} = ${at(e)}; }`).join(" ");
}

/**
 * WGSL statements storing the vec4 `value` at `arr[base ..]` (of type t, runtime column c), adding when
 * `addIf`.
 */
function scatter(
  D: number,
  arr: string,
  base: string,
  c: string,
  value: string,
  addIf: string,
  t: ActivationType = "f32",
  vec = false,
): string {
  if (vec) {
    const idx = `${arr}[(${base}) / 4u]`;
    const put = (v: string) => `${idx} = ${stVec(t, v)};`;
    return addIf
      ? `if (${addIf}) { ${put(`vec4<f32>(${idx}) + ${value}`)} } else { ${put(value)} }`
      : put(value);
  }
  const out: string[] = [];
  for (let e = 0; e < 4; e++) {
    let s = storeOrAdd(t, `${arr}[${base} + ${e}u]`, `${value}.${"xyzw"[e]}`, addIf);
    if (D % 4 !== 0 && e > 0) s = `if (4u * ${c} + ${e}u < D) { ${s} }`;
    out.push(s);
  }
  return out.join(" ");
}

/**
 * Loop loading `rows` rows (local index r, global row expression of r) of one or two tensors: entries
 * `[workgroup tile, source array, its element type]`.
 */
function loadTile(
  D: number,
  rows: number,
  dsts: [string, string, ActivationType][],
  validExpr: string,
  baseExpr: string,
  vec = false,
): string {
  return `for (var x = tid; x < ${rows}u * DV; x += ${NT}u) {
    let r = x / DV;
    let c = x % DV;
${dsts.map(([d]) => `    var v_${d} = vec4<f32>(0.0);`).join("\n")}
    if (${validExpr}) {
      let base = ${baseExpr} + 4u * c;
${dsts.map(([d, src, t]) => `      ${gather(D, `v_${d}`, src, "base", "c", t, vec)}`).join("\n")}
    }
${dsts.map(([d]) => `    ${d}[r * SV + c] = v_${d};`).join("\n")}
  }`;
}

function tiledHeader(D: number): string {
  const DVn = dv(D);
  return `const D: u32 = ${D}u;
const DV: u32 = ${DVn}u;
const SV: u32 = ${oddStride(DVn)}u;
const NEG: f32 = ${NEG};`;
}

/**
 * WGSL: a tiled workgroup's (query head, batch, key/value head) from its id, and its thread's place: row
 * group `ra` of 16 (rows `rb`.. of `rowsPerThread` each) and vec4 column group `ca` of 8.
 */
function tiledThreads(rowsPerThread: number): string {
  return `let h = wid.y;
  let b = wid.z;
  let kvh = h / (p.H / p.Hkv);
  let ra = tid / 8u;
  let ca = tid % 8u;
  let rb = ${rowsPerThread}u * ra;`;
}

/** Column guard of the accumulation phase: vec4 column ca + 8*cc exists. */
function colGuard(DVn: number, cc: number): string {
  return (cc + 1) * 8 <= DVn ? "true" : `ca + ${8 * cc}u < DV`;
}

function forwardTiledKernel(D: number, ty: ActTypes): Kernel {
  const DVn = dv(D);
  const RT = 4;
  const KT = 2;
  const BQ = 16 * RT;
  const BK = 8 * KT;
  const PS = BQ + 1;
  const NCB = Math.ceil(DVn / 8);
  const SVn = oddStride(DVn);
  const I = range(RT);
  const J = range(KT);
  const CC = range(NCB);
  const { qt, kt, vt, ot } = ty;
  return defineKernel("attention_fwd", { D, tiled: 1, ...ty }, [
    "read",
    "read",
    "read",
    "read",
    "write",
    "write",
    "uniform",
  ], () => `
${enableF16(qt, kt, vt, ot)}${PARAMS}
${forwardBindings(ty)}
@group(0) @binding(6) var<uniform> p: P;
${tiledHeader(D)}
var<workgroup> Qs: array<vec4<f32>, ${BQ * SVn}>;
var<workgroup> Ks: array<vec4<f32>, ${BK * SVn}>;
var<workgroup> Vs: array<vec4<f32>, ${BK * SVn}>;
var<workgroup> Pt: array<f32, ${BK * PS}>;
var<workgroup> Cs: array<f32, ${BQ}>;
${VISIBLE}
@compute @workgroup_size(${NT}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) tid: u32) {
  let t0 = wid.x * ${BQ}u;
  ${tiledThreads(RT)}
  ${loadTile(D, BQ, [["Qs", "q", qt]], "t0 + r < p.T", "((b * p.T + t0 + r) * p.H + h) * D")}
  var m = NEG;
  var l = 0.0;
${I.flatMap((i) => CC.map((cc) => `  var o${i}_${cc} = vec4<f32>(0.0);`)).join("\n")}
  let tLast = min(t0 + ${BQ}u, p.T) - 1u;
  let kEnd = select(p.S, min(p.S, p.qOff + tLast + 1u), p.causal != 0u);
  let iFirst = p.qOff + t0;
  let kStart = select(0u, iFirst + 1u - p.window, p.window != 0u && iFirst + 1u > p.window);
  for (var k0 = kStart; k0 < kEnd; k0 += ${BK}u) {
    workgroupBarrier();
    ${
    loadTile(
      D,
      BK,
      [["Ks", "k", kt], ["Vs", "v", vt]],
      "k0 + r < kEnd",
      "((b * p.kvStride + k0 + r) * p.Hkv + kvh) * D",
    )
  }
    workgroupBarrier();
${I.flatMap((i) => J.map((j) => `    var s${i}_${j} = 0.0;`)).join("\n")}
    for (var c = 0u; c < DV; c++) {
${I.map((i) => `      let q${i} = Qs[(rb + ${i}u) * SV + c];`).join("\n")}
${J.map((j) => `      let k${j} = Ks[(ca + ${8 * j}u) * SV + c];`).join("\n")}
${I.flatMap((i) => J.map((j) => `      s${i}_${j} = s${i}_${j} + dot(q${i}, k${j});`)).join("\n")}
    }
${
    I.flatMap((i) =>
      J.map((j) =>
        `    {
      let t = t0 + rb + ${i}u;
      let j = k0 + ca + ${8 * j}u;
      var s = NEG;
      if (t < p.T && j < kEnd && visible(b, p.qOff + t, j)) { s = s${i}_${j} * p.scale; }
      Pt[(ca + ${8 * j}u) * ${PS}u + rb + ${i}u] = s;
    }`
      )
    ).join("\n")
  }
    workgroupBarrier();
    if (tid < ${BQ}u) {
      var mb = NEG;
      for (var jj = 0u; jj < ${BK}u; jj++) { mb = max(mb, Pt[jj * ${PS}u + tid]); }
      let mNew = max(m, mb);
      let corr = exp(m - mNew);
      var ls = 0.0;
      for (var jj = 0u; jj < ${BK}u; jj++) {
        let s = Pt[jj * ${PS}u + tid];
        let pj = select(0.0, exp(s - mNew), s > NEG * 0.5);
        ls = ls + pj;
        Pt[jj * ${PS}u + tid] = pj;
      }
      l = l * corr + ls;
      m = mNew;
      Cs[tid] = corr;
    }
    workgroupBarrier();
${
    I.map((i) =>
      `    let cr${i} = Cs[rb + ${i}u];\n${
        CC.map((cc) => `    o${i}_${cc} = o${i}_${cc} * cr${i};`).join("\n")
      }`
    ).join("\n")
  }
    for (var jj = 0u; jj < ${BK}u; jj++) {
${I.map((i) => `      let p${i} = Pt[jj * ${PS}u + rb + ${i}u];`).join("\n")}
${
    CC.map((cc) =>
      `      if (${colGuard(DVn, cc)}) {
        let vv = Vs[jj * SV + ca + ${8 * cc}u];
${I.map((i) => `        o${i}_${cc} = o${i}_${cc} + p${i} * vv;`).join("\n")}
      }`
    ).join("\n")
  }
    }
  }
  workgroupBarrier();
  if (tid < ${BQ}u) {
    Cs[tid] = select(0.0, 1.0 / l, l > 0.0);
    let t = t0 + tid;
    if (p.flag != 0u && t < p.T) { lse[(b * p.H + h) * p.T + t] = select(0.0, m + log(l), l > 0.0); }
  }
  workgroupBarrier();
${
    I.map((i) =>
      `  {
    let t = t0 + rb + ${i}u;
    if (t < p.T) {
      let inv = Cs[rb + ${i}u];
      let ob = ((b * p.T + t) * p.H + h) * D;
${
        CC.map((cc) =>
          `      if (${colGuard(DVn, cc)}) {
        let c = ca + ${8 * cc}u;
        ${scatter(D, "out", "ob + 4u * c", "c", `(o${i}_${cc} * inv)`, "", ot)}
      }`
        ).join("\n")
      }
    }
  }`
    ).join("\n")
  }
}`);
}

/**
 * Per-thread tile of the tiled dk/dv pass: `keys` key rows (of scores and of dk/dv) and `queries` query
 * columns of scores per thread; a workgroup takes 16·keys keys and steps over the queries 8·queries at a time.
 */
export interface DkdvTile {
  /** Key rows per thread (the workgroup's key block is 16× this). */
  keys: number;
  /** Query columns of scores per thread (the query step is 8× this). */
  queries: number;
  /** Load the next query block into registers while the current one is computed. */
  prefetch?: boolean;
}

/** Workgroup memory of the tiled dk/dv pass at head size D, in bytes. */
export function dkdvTileBytes(D: number, t: DkdvTile): number {
  const SVn = oddStride(dv(D));
  const BK = 16 * t.keys;
  const BQ = 8 * t.queries;
  return 16 * SVn * 2 * (BK + BQ) + 4 * (2 * BQ * (BK + 1) + 2 * BQ);
}

/** Where {@link prefetchRows} finds a block of rows and where it stages them. */
interface PrefetchRows {
  /** Head size. */
  D: number;
  /** Rows per block. */
  rows: number;
  /** Threads of the workgroup. */
  threads: number;
  /** Per source: register prefix, source array, its element type, workgroup tile and row offset in it. */
  srcs: [string, string, ActivationType, string, string][];
  /** WGSL: whether row `r` of the block starting at `start` exists. */
  valid: (start: string, r: string) => string;
  /** WGSL: element index of row `r`'s first component in the sources. */
  base: (start: string, r: string) => string;
  /** Whether the sources are bound as vec4s (see {@link gather}). */
  vec?: boolean;
}

/**
 * A block of rows staged in workgroup memory one step ahead through registers: `declare` (before the loop)
 * declares the registers, `fetch(start)` loads the block at `start` into them (issued right after the
 * barrier that makes the previous block visible, so its global-memory latency overlaps that block's
 * arithmetic) and `put` stores them in the workgroup tiles (between the loop's two barriers).
 */
function prefetchRows(o: PrefetchRows): { declare: string; fetch: (start: string) => string; put: string } {
  const n = o.rows * dv(o.D);
  const S = range(Math.ceil(n / o.threads));
  const guard = (s: number) => ((s + 1) * o.threads > n ? `x < ${n}u` : "true");
  const slot = (s: number) => `let x = tid + ${s * o.threads}u;`;
  return {
    declare: S.flatMap((s) => o.srcs.map(([reg]) => `  var ${reg}${s} = vec4<f32>(0.0);`)).join("\n"),
    fetch: (start) =>
      S.map((s) =>
        `    {
      ${slot(s)}
${o.srcs.map(([reg]) => `      ${reg}${s} = vec4<f32>(0.0);`).join("\n")}
      if (${guard(s)} && ${o.valid(start, "x / DV")}) {
        let c = x % DV;
        let base = ${o.base(start, "x / DV")} + 4u * c;
${
          o.srcs.map(([reg, arr, t]) => `        ${gather(o.D, `${reg}${s}`, arr, "base", "c", t, o.vec)}`)
            .join("\n")
        }
      }
    }`
      ).join("\n"),
    put: S.map((s) =>
      `{
      ${slot(s)}
      if (${guard(s)}) {
${
        o.srcs.map(([reg, , , tile, at]) => `        ${tile}[${at}(x / DV) * SV + x % DV] = ${reg}${s};`)
          .join("\n")
      }
      }
    }`
    ).join("\n    "),
  };
}

/** The dk/dv pass's query block (q, dout, lse, Di), prefetched (see {@link prefetchRows}). */
function prefetchQueries(D: number, BQ: number, qt: ActivationType, vec: boolean) {
  const rows = prefetchRows({
    vec,
    D,
    rows: BQ,
    threads: NT,
    srcs: [["fq", "q", qt, "Qs", ""], ["fo", "dout", "f32", "Os", ""]],
    valid: (t0, r) => `${t0} + ${r} < p.T`,
    base: (t0, r) => `((b * p.T + ${t0} + ${r}) * p.H + h) * D`,
  });
  const fetch = (t0: string) =>
    `${rows.fetch(t0)}
    if (tid < ${BQ}u) {
      let t = min(${t0} + tid, p.T - 1u);
      fl = stat((b * p.H + h) * p.T + t);
      fd = stat(BHT + (b * p.H + h) * p.T + t);
    }`;
  return {
    declare: `${rows.declare}\n  var fl = 0.0;\n  var fd = 0.0;\n  if (tStart < tEnd) {\n${
      fetch("tStart")
    }\n  }`,
    put: `${rows.put}\n    if (tid < ${BQ}u) { Ls[tid] = fl; Ds[tid] = fd; }`,
    fetchNext: `    if (t0 + ${BQ}u < tEnd) {\n${fetch(`(t0 + ${BQ}u)`)}\n    }`,
  };
}

/**
 * WGSL of the scores scratch `[lse | Di | ds]` seen as vec4s (the dq-from-scores path): `stat(i)` reads
 * float i of lse/Di, and ds row `(b, h, t)` starts at vec4 `dsRow(...)`: the ds block begins at the first
 * vec4 boundary after `[lse | Di]` and each row of S keys is padded to a multiple of 4.
 */
const SCORES_VIEW = `
fn stat(i: u32) -> f32 { return stats[i >> 2u][i & 3u]; }
fn dsRow(b: u32, h: u32, t: u32) -> u32 {
  return (2u * p.B * p.H * p.T + 3u) / 4u + ((b * p.H + h) * p.T + t) * ((p.S + 3u) / 4u);
}`;

/** Floats of the scores scratch `[lse | Di | ds]` (see {@link SCORES_VIEW}). */
function scoresScratchFloats(B: number, H: number, T: number, S: number): number {
  return Math.ceil((2 * B * H * T) / 4) * 4 + B * H * T * Math.ceil(S / 4) * 4;
}

/**
 * The tiled dk/dv pass. With `emitScores` it also writes every `ds = p * (dp - Di)` it computes (unscaled)
 * into the scores scratch after `[lse | Di]`, as `(B, H, T, S)` rows (see {@link SCORES_VIEW}), for
 * {@link dqScoresKernel}; only the (query, key) entries of its query steps are written.
 */
function dkdvTiledKernel(D: number, ty: BwdTypes, tile: DkdvTile, emitScores = false): Kernel {
  const DVn = dv(D);
  const RT = tile.keys; // keys per thread
  const KT = tile.queries; // queries per thread
  const BK = 16 * RT;
  const BQ = 8 * KT;
  const PS = BK + 1;
  const NCB = Math.ceil(DVn / 8);
  const SVn = oddStride(DVn);
  const I = range(RT);
  const J = range(KT);
  const CC = range(NCB);
  const { qt, kt, vt } = ty;
  const vec = vecRows(D);
  const pq = tile.prefetch ? prefetchQueries(D, BQ, qt, vec) : null;
  return defineKernel(
    "attention_bwd_dkdv",
    { D, tiled: 1, RT, KT, pf: tile.prefetch ? 1 : 0, ...ty, ds: emitScores ? 1 : 0, vec: vec ? 1 : 0 },
    ["read", "read", "read", "read", "read", emitScores ? "write" : "read", "write", "write", "uniform"],
    () => `
${enableF16(qt, kt, vt)}${PARAMS}
@group(0) @binding(0) var<storage, read> q: array<${elem(qt, vec)}>;
@group(0) @binding(1) var<storage, read> k: array<${elem(kt, vec)}>;
@group(0) @binding(2) var<storage, read> v: array<${elem(vt, vec)}>;
@group(0) @binding(3) var<storage, read> mask: array<i32>;
@group(0) @binding(4) var<storage, read> dout: array<${elem("f32", vec)}>;
@group(0) @binding(5) var<storage, ${
      emitScores ? "read_write> stats: array<vec4<f32>>" : "read> stats: array<f32>"
    };
@group(0) @binding(6) var<storage, read_write> dk: array<${elem("f32", vec)}>;
@group(0) @binding(7) var<storage, read_write> dv: array<${elem("f32", vec)}>;
@group(0) @binding(8) var<uniform> p: P;
${emitScores ? SCORES_VIEW : "fn stat(i: u32) -> f32 { return stats[i]; }"}
${tiledHeader(D)}
var<workgroup> Ks: array<vec4<f32>, ${BK * SVn}>;
var<workgroup> Vs: array<vec4<f32>, ${BK * SVn}>;
var<workgroup> Qs: array<vec4<f32>, ${BQ * SVn}>;
var<workgroup> Os: array<vec4<f32>, ${BQ * SVn}>;
var<workgroup> Pt: array<f32, ${BQ * PS}>;
var<workgroup> St: array<f32, ${BQ * PS}>;
var<workgroup> Ls: array<f32, ${BQ}>;
var<workgroup> Ds: array<f32, ${BQ}>;
${VISIBLE}
@compute @workgroup_size(${NT}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) tid: u32) {
  let k0 = wid.x * ${BK}u;
  ${tiledThreads(RT)}
  ${
      loadTile(
        D,
        BK,
        [["Ks", "k", kt], ["Vs", "v", vt]],
        "k0 + r < p.S",
        "((b * p.kvStride + k0 + r) * p.Hkv + kvh) * D",
        vec,
      )
    }
${
      I.flatMap((i) =>
        CC.map((cc) => `  var gk${i}_${cc} = vec4<f32>(0.0);\n  var gv${i}_${cc} = vec4<f32>(0.0);`)
      ).join("\n")
    }
  let BHT = p.B * p.H * p.T;
  let kLast = min(k0 + ${BK}u, p.S) - 1u;
  // query rows that can see some key of this block: causal needs i >= k0, the window i < kLast + window
  let tStart = select(0u, select(0u, k0 - p.qOff, k0 > p.qOff), p.causal != 0u);
  let tEnd = select(p.T, min(p.T, select(0u, kLast + p.window - p.qOff, kLast + p.window > p.qOff)), p.window != 0u);
${pq ? pq.declare : ""}
  for (var t0 = tStart; t0 < tEnd; t0 += ${BQ}u) {
    workgroupBarrier();
    ${
      pq ? pq.put : `${
        loadTile(
          D,
          BQ,
          [["Qs", "q", qt], ["Os", "dout", "f32"]],
          "t0 + r < p.T",
          "((b * p.T + t0 + r) * p.H + h) * D",
          vec,
        )
      }
    if (tid < ${BQ}u) {
      let t = min(t0 + tid, p.T - 1u);
      Ls[tid] = stat((b * p.H + h) * p.T + t);
      Ds[tid] = stat(BHT + (b * p.H + h) * p.T + t);
    }`
    }
    workgroupBarrier();
${pq ? pq.fetchNext : ""}
${I.flatMap((i) => J.map((j) => `    var s${i}_${j} = 0.0;\n    var e${i}_${j} = 0.0;`)).join("\n")}
    for (var c = 0u; c < DV; c++) {
${
      I.map((i) =>
        `      let k${i} = Ks[(rb + ${i}u) * SV + c];\n      let v${i} = Vs[(rb + ${i}u) * SV + c];`
      ).join("\n")
    }
${
      J.map((j) =>
        `      let q${j} = Qs[(ca + ${8 * j}u) * SV + c];\n      let o${j} = Os[(ca + ${8 * j}u) * SV + c];`
      ).join("\n")
    }
${
      I.flatMap((i) =>
        J.map((j) =>
          `      s${i}_${j} = s${i}_${j} + dot(k${i}, q${j});\n      e${i}_${j} = e${i}_${j} + dot(v${i}, o${j});`
        )
      ).join("\n")
    }
    }
${
      I.flatMap((i) =>
        J.map((j) =>
          `    {
      let key = k0 + rb + ${i}u;
      let t = t0 + ca + ${8 * j}u;
      var pr = 0.0;
      var ds = 0.0;
      if (key < p.S && t < p.T && visible(b, p.qOff + t, key)) {
        pr = exp(s${i}_${j} * p.scale - Ls[ca + ${8 * j}u]);
        ds = pr * (e${i}_${j} - Ds[ca + ${8 * j}u]);
      }
      Pt[(ca + ${8 * j}u) * ${PS}u + rb + ${i}u] = pr;
      St[(ca + ${8 * j}u) * ${PS}u + rb + ${i}u] = ds;
    }`
        )
      ).join("\n")
    }
    workgroupBarrier();
${
      emitScores
        ? `    // ds rows for the dq pass, 4 keys per store (k0 is a multiple of 4; keys ≥ S hold ds = 0)
    for (var x = tid; x < ${BQ * BK / 4}u; x += ${NT}u) {
      let r = x / ${BK / 4}u;
      let c = 4u * (x % ${BK / 4}u);
      if (t0 + r < p.T && k0 + c < p.S) {
        let sb = r * ${PS}u + c;
        stats[dsRow(b, h, t0 + r) + (k0 + c) / 4u] = vec4<f32>(St[sb], St[sb + 1u], St[sb + 2u], St[sb + 3u]);
      }
    }`
        : ""
    }
    for (var jj = 0u; jj < ${BQ}u; jj++) {
${
      I.map((i) =>
        `      let p${i} = Pt[jj * ${PS}u + rb + ${i}u];\n      let d${i} = St[jj * ${PS}u + rb + ${i}u];`
      ).join("\n")
    }
${
      CC.map((cc) =>
        `      if (${colGuard(DVn, cc)}) {
        let ov = Os[jj * SV + ca + ${8 * cc}u];
        let qv = Qs[jj * SV + ca + ${8 * cc}u];
${
          I.map((i) =>
            `        gv${i}_${cc} = gv${i}_${cc} + p${i} * ov;\n        gk${i}_${cc} = gk${i}_${cc} + d${i} * qv;`
          ).join("\n")
        }
      }`
      ).join("\n")
    }
    }
  }
  // per-head partials (GQA: summed by attention_bwd_dkdv_reduce) or, with one head per group, dk/dv
  let per = p.outPerHead != 0u;
  let oh = select(kvh, h, per);
  let nh = select(p.Hkv, p.H, per);
  let ost = select(p.kvStride, p.S, per);
${
      I.map((i) =>
        `  {
    let key = k0 + rb + ${i}u;
    if (key < p.S) {
      let ob = ((b * ost + key) * nh + oh) * D;
${
          CC.map((cc) =>
            `      if (${colGuard(DVn, cc)}) {
        let c = ca + ${8 * cc}u;
        ${scatter(D, "dk", "ob + 4u * c", "c", `(gk${i}_${cc} * p.scale)`, "p.flag != 0u", "f32", vec)}
        ${scatter(D, "dv", "ob + 4u * c", "c", `gv${i}_${cc}`, "p.flag != 0u", "f32", vec)}
      }`
          ).join("\n")
        }
    }
  }`
      ).join("\n")
    }
}`,
  );
}

/** Sums the per-query-head dk/dv partials `(B, S, H, D)` of a GQA group in a fixed order. */
function dkdvReduceKernel(D: number): Kernel {
  return defineKernel(
    "attention_bwd_dkdv_reduce",
    { D },
    ["read", "read", "write", "write", "uniform"],
    () => `
${PARAMS}
@group(0) @binding(0) var<storage, read> pk: array<f32>;
@group(0) @binding(1) var<storage, read> pv: array<f32>;
@group(0) @binding(2) var<storage, read_write> dk: array<f32>;
@group(0) @binding(3) var<storage, read_write> dv: array<f32>;
@group(0) @binding(4) var<uniform> p: P;
const D: u32 = ${D}u;
@compute @workgroup_size(256) fn main(@builtin(global_invocation_id) g: vec3u) {
  let idx = g.x + g.y * p.gridStride;
  if (idx >= p.B * p.S * p.Hkv * D) { return; }
  let d = idx % D;
  let rest = idx / D;
  let kvh = rest % p.Hkv;
  let bj = rest / p.Hkv;
  let j = bj % p.S;
  let b = bj / p.S;
  let group = p.H / p.Hkv;
  var sk = 0.0;
  var sv = 0.0;
  let base = ((b * p.S + j) * p.H + kvh * group) * D + d;
  for (var hh = 0u; hh < group; hh++) {
    sk = sk + pk[base + hh * D];
    sv = sv + pv[base + hh * D];
  }
  let o = ((b * p.kvStride + j) * p.Hkv + kvh) * D + d;
  if (p.flag != 0u) { dk[o] = dk[o] + sk; dv[o] = dv[o] + sv; } else { dk[o] = sk; dv[o] = sv; }
}`,
  );
}

const DQS_BK = 32; // keys per block of the dq-from-scores pass

/**
 * dq from the scores the tiled dk/dv pass wrote (`emitScores`): `dq_t = scale * Σ_j ds_tj k_j`, a small
 * matrix product per (batch, head) over the visible keys only (the dk/dv pass leaves the other entries of
 * the scratch unwritten; they are read as 0). One workgroup per (16·rows query rows, head, batch),
 * heaviest causal blocks first; a thread keeps `rows` rows × its vec4 columns (ca, ca + 8) of dq in
 * registers and steps over blocks of 32 keys and their ds (4 keys per vec4) staged in workgroup memory,
 * the next block loaded into registers while the current one is computed. Where the lane dq pass
 * recomputes both dot products of every (query, key) pair, this one reads ds once.
 */
function dqScoresKernel(D: number, kt: ActivationType, rows: number): Kernel {
  const DVn = dv(D);
  const NCB = Math.ceil(DVn / 8);
  const SVn = oddStride(DVn);
  const BT = 16 * rows;
  const C4 = DQS_BK / 4; // vec4s of ds per row of a block
  const PS = C4 + 1;
  const I = range(rows);
  const CC = range(NCB);
  const E = range(4);
  const vec = vecRows(D);
  const keyRows = prefetchRows({
    vec,
    D,
    rows: DQS_BK,
    threads: NT,
    srcs: [["pk", "k", kt, "Ks", ""]],
    valid: (k0, r) => `${k0} + ${r} < kEnd`,
    base: (k0, r) => `((b * p.kvStride + ${k0} + ${r}) * p.Hkv + kvh) * D`,
  });
  // BT rows × C4 vec4s of ds per block: `rows` vec4s per thread
  const fetchDs = (k0: string) =>
    I.map((s) =>
      `    pd${s} = dsAt(b, h, t0 + (tid + ${s * NT}u) / ${C4}u, ${k0} + 4u * ((tid + ${
        s * NT
      }u) % ${C4}u), ${k0}, kEnd, iFirst, iLast);`
    )
      .join("\n");
  return defineKernel(
    "attention_bwd_dq_scores",
    { D, kt, rows, vec: vec ? 1 : 0 },
    ["read", "read", "read", "write", "uniform"],
    () => `
${enableF16(kt)}${PARAMS}
@group(0) @binding(0) var<storage, read> k: array<${elem(kt, vec)}>;
@group(0) @binding(1) var<storage, read> mask: array<i32>;
@group(0) @binding(2) var<storage, read> stats: array<vec4<f32>>; // lse | Di | ds rows
@group(0) @binding(3) var<storage, read_write> dq: array<${elem("f32", vec)}>;
@group(0) @binding(4) var<uniform> p: P;
${SCORES_VIEW}
${tiledHeader(D)}
const BK: u32 = ${DQS_BK}u;
const BT: u32 = ${BT}u;
var<workgroup> Ks: array<vec4<f32>, ${DQS_BK * SVn}>;
var<workgroup> Ss: array<vec4<f32>, ${BT * PS}>;
${VISIBLE}
// ds of query t for keys key..key+3 of the block at k0 (0 where hidden: never an unwritten entry)
fn dsAt(b: u32, h: u32, t: u32, key: u32, k0: u32, kEnd: u32, iFirst: u32, iLast: u32) -> vec4<f32> {
  if (t >= p.T || key >= kEnd) { return vec4<f32>(0.0); }
  let d = stats[dsRow(b, h, t) + key / 4u];
  if (${BLOCK_FULL}) { return d; }
  let i = p.qOff + t;
  return vec4<f32>(${E.map((e) => `select(0.0, d[${e}], visible(b, i, key + ${e}u))`).join(", ")});
}
@compute @workgroup_size(${NT}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) tid: u32) {
  let nb = (p.T + BT - 1u) / BT;
  let t0 = (nb - 1u - wid.x) * BT; // heaviest causal blocks first
  ${tiledThreads(rows)}
  let tLast = min(t0 + BT, p.T) - 1u;
  let iFirst = p.qOff + t0;
  let iLast = p.qOff + tLast;
  let kEnd = select(p.S, min(p.S, iLast + 1u), p.causal != 0u);
  // from a multiple of 4 keys (ds is read 4 keys at a time; the keys before the window read as hidden)
  let kStart = select(0u, iFirst + 1u - p.window, p.window != 0u && iFirst + 1u > p.window) / 4u * 4u;
${I.flatMap((i) => CC.map((cc) => `  var g${i}_${cc} = vec4<f32>(0.0);`)).join("\n")}
${keyRows.declare}
${I.map((s) => `  var pd${s} = vec4<f32>(0.0);`).join("\n")}
  if (kStart < kEnd) {
${keyRows.fetch("kStart")}
${fetchDs("kStart")}
  }
  for (var k0 = kStart; k0 < kEnd; k0 += BK) {
    workgroupBarrier();
    ${keyRows.put}
${
      I.map((s) => `    Ss[((tid + ${s * NT}u) / ${C4}u) * ${PS}u + (tid + ${s * NT}u) % ${C4}u] = pd${s};`)
        .join("\n")
    }
    workgroupBarrier();
    if (k0 + BK < kEnd) {
${keyRows.fetch("(k0 + BK)")}
${fetchDs("(k0 + BK)")}
    }
    for (var j4 = 0u; j4 < ${C4}u; j4++) {
${I.map((i) => `      let d${i} = Ss[(rb + ${i}u) * ${PS}u + j4];`).join("\n")}
${
      E.map((e) =>
        CC.map((cc) =>
          `      if (${colGuard(DVn, cc)}) {
        let kv = Ks[(4u * j4 + ${e}u) * SV + ca + ${8 * cc}u];
${I.map((i) => `        g${i}_${cc} = fma(vec4<f32>(d${i}[${e}]), kv, g${i}_${cc});`).join("\n")}
      }`
        ).join("\n")
      ).join("\n")
    }
    }
  }
${
      I.map((i) =>
        `  {
    let t = t0 + rb + ${i}u;
    if (t < p.T) {
      let qb = ((b * p.T + t) * p.H + h) * D;
${
          CC.map((cc) =>
            `      if (${colGuard(DVn, cc)}) {
        let c = ca + ${8 * cc}u;
        ${scatter(D, "dq", "qb + 4u * c", "c", `(g${i}_${cc} * p.scale)`, "p.flag != 0u", "f32", vec)}
      }`
          ).join("\n")
        }
    }
  }`
      ).join("\n")
    }
}`,
  );
}

// ---------------------------------------------------------------------------------------------------
// Lane kernels (D ≤ 64, the model shapes): R query rows per workgroup, KS threads ("lanes") per row that
// split each staged block of BK keys between them (lane z takes keys z, z + KS, ...; adjacent lanes read
// adjacent key rows of the odd-strided tile, so no bank conflicts, and the rows of a warp share each
// read). Each lane keeps its row's q and accumulator in registers and takes G keys at a time: G
// independent score chains, one online-softmax update per G keys. At the end lanes 1.. leave their
// partial state (max, sum, accumulator) in workgroup memory (rows at an odd stride: no bank conflicts)
// and lane 0 merges it. Query blocks run heaviest first under the causal mask. No per-key barriers: two
// per block of BK keys. Where D is a multiple of 4 (`attentionTuning.vecRows`) the forward reads q, k and
// v as vec4s, lane 0 leaves the merged row in workgroup memory and the row's lanes store it together
// (lane z the vec4s z, z + KS, ...: whole 32-byte sectors per warp store).
//
// The forward can also fold in the LLaMA-Adapter attention of the layer (kernels/adapter_attention.ts):
// the L ≤ 16 adapter keys and values are staged after the main loop; lane 0 merges the main softmax,
// writes `out` and leaves the row's result in the merge area; then the last lane of each row runs the
// second softmax over the adapter tokens and writes the adapter output (plus the main one for llama) —
// with vec4 rows every lane of the row computes the adapter scores and stores its share of the output.

/** Shape of a lane kernel: rows per workgroup, lanes per row, keys per online-softmax step. */
export interface LaneShape {
  /** Query rows per workgroup. */
  R: number;
  /** Threads per row; R * KS = 128. */
  KS: number;
  /** Keys a lane takes per step (independent score chains); KS * G divides 48. */
  G: number;
  /** Load the next key block into registers while the current one is computed. */
  prefetch?: boolean;
}

/**
 * Whether the lane forward, the tiled dk/dv pass and dq from the scores bind their rows (q, k, v, out,
 * dout and the gradients) as vec4s (`attentionTuning.vecRows`, D a multiple of 4): one 16-byte access per
 * vec4 instead of four 4-byte ones.
 */
function vecRows(D: number): boolean {
  return attentionTuning.vecRows && D % 4 === 0;
}

const LANE_BK = 48; // keys staged per block
const LANE_WG = 128;
const FUSED_MAX_L = 16; // adapter tokens the fused forward stages

/** vec4 slots of the lane kernels' staging tile (keys, then values; reused for the merge at the end). */
function laneTileSlots(D: number): number {
  return 2 * LANE_BK * oddStride(dv(D));
}

/** Whether a lane kernel of this shape fits its tile and the device's workgroup memory. */
function laneShapeFits(rec: Recorder, D: number, s: LaneShape): boolean {
  const slots = laneTileSlots(D);
  // lanes 1..'s accumulators (or one adapter output per row), then the adapter's keys and values
  const merge = (s.R * Math.max(1, s.KS - 1) + 2 * FUSED_MAX_L) * oddStride(dv(D));
  const bytes = 16 * slots + 8 * LANE_WG; // KV, Ms and Ls
  return s.R * s.KS === LANE_WG && LANE_BK % (s.KS * s.G) === 0 && merge <= slots &&
    bytes <= rec.gpu.limits.maxComputeWorkgroupStorageSize;
}

/** WGSL loop staging `n` rows of two (rows, Hkv, D) arrays into KV rows 0.. and BK.. (zero past the valid rows). */
function stageRows(
  D: number,
  src: [string, ActivationType, string, ActivationType],
  n: string,
  valid: string,
  base: string,
  at = "0u",
  valueRows = "BK",
  vec = false,
): string {
  const [ka, kt, va, vt] = src;
  return `for (var x = tid; x < ${n} * DV; x += ${LANE_WG}u) {
      let r = x / DV;
      let c = x % DV;
      var kv = vec4<f32>(0.0);
      var vv = vec4<f32>(0.0);
      if (${valid}) {
        let base = ${base} + 4u * c;
        ${gather(D, "kv", ka, "base", "c", kt, vec)}
        ${gather(D, "vv", va, "base", "c", vt, vec)}
      }
      KV[${at} + r * SV + c] = kv;
      KV[${at} + (${valueRows} + r) * SV + c] = vv;
    }`;
}

/** WGSL: `true` when every key of the staged block is visible to every row of the workgroup. */
const BLOCK_FULL = `p.useMask == 0u && k0 + BK <= kEnd && (p.causal == 0u || k0 + BK <= iFirst + 1u) &&
      (p.window == 0u || iLast < k0 + p.window)`;

/** The key and value rows of a lane kernel's key block, prefetched (see {@link prefetchRows}). */
function laneKeyRows(D: number, kt: ActivationType, vt: ActivationType, vec: boolean) {
  return prefetchRows({
    vec,
    D,
    rows: LANE_BK,
    threads: LANE_WG,
    srcs: [["pk", "k", kt, "KV", ""], ["pv", "v", vt, "KV", "BK * SV + "]],
    valid: (k0, r) => `${k0} + ${r} < kEnd`,
    base: (k0, r) => `((b * p.kvStride + ${k0} + ${r}) * p.Hkv + kvh) * D`,
  });
}

/** WGSL before a lane kernel's key-block loop: with `prefetch`, the registers and the first block's loads. */
function laneLoopPrologue(
  D: number,
  kt: ActivationType,
  vt: ActivationType,
  s: LaneShape,
  vec = false,
): string {
  if (!s.prefetch) return "";
  const rows = laneKeyRows(D, kt, vt, vec);
  return `${rows.declare}\n  if (kStart < kEnd) {\n${rows.fetch("kStart")}\n  }`;
}

/** WGSL: the start of a lane kernel's key-block loop body: stage the block, then whether it is all visible. */
function laneBlockStart(
  D: number,
  kt: ActivationType,
  vt: ActivationType,
  s: LaneShape,
  vec = false,
): string {
  if (s.prefetch) {
    const rows = laneKeyRows(D, kt, vt, vec);
    return `workgroupBarrier();
    ${rows.put}
    workgroupBarrier();
    if (k0 + BK < kEnd) {
${rows.fetch("(k0 + BK)")}
    }
    let full = ${BLOCK_FULL};`;
  }
  return `workgroupBarrier();
    ${
    stageRows(
      D,
      ["k", kt, "v", vt],
      "BK",
      "k0 + r < kEnd",
      "((b * p.kvStride + k0 + r) * p.Hkv + kvh) * D",
      "0u",
      "BK",
      vec,
    )
  }
    workgroupBarrier();
    let full = ${BLOCK_FULL};`;
}

/**
 * WGSL: `acc = Σ_c x_c * KV[base + c]` as one vec4 accumulator (the lane's key `w` of this step, `kb{w}`),
 * declaring `kb{w}` first when `declare`.
 */
function laneDot(
  s: LaneShape,
  DVn: number,
  w: number,
  acc: string,
  x: string,
  at: string,
  declare: boolean,
): string {
  const kb = declare
    ? `      let kb${w} = (g + lane + ${s.KS * w}u) * SV;
`
    : "";
  return `${kb}      var ${acc}${w} = ${x}0 * KV[${at}kb${w}];
${
    range(DVn).slice(1).map((c) => `      ${acc}${w} = fma(${x}${c}, KV[${at}kb${w} + ${c}u], ${acc}${w});`)
      .join("\n")
  }`;
}

/** WGSL: `stmt` when the lane's key `w` of this step is hidden from its row (checked only in partial blocks). */
function laneHidden(s: LaneShape, w: number, stmt: string): string {
  return `      if (!full) {
        let j = k0 + g + lane + ${s.KS * w}u;
        if (!(rowValid && j < kEnd && visible(b, i, j))) { ${stmt} }
      }`;
}

/** WGSL: lanes 1.. leave `x{c}` in their merge slots (after the barrier that ends the key loop). */
function laneLeave(s: LaneShape, DVn: number, x: string): string {
  return range(DVn).map((c) => `    KV[${mergeSlot(s, "lane")} + ${c}u] = ${x}${c};`).join("\n");
}

/** Shared prologue of the lane kernels: which rows, which keys. */
function laneProlog(s: LaneShape): string {
  return `let row = tid / ${s.KS}u;
  let lane = tid % ${s.KS}u;
  let nb = (p.T + ${s.R - 1}u) / ${s.R}u;
  let t0 = (nb - 1u - wid.x) * ${s.R}u; // heaviest causal blocks first
  let h = wid.y;
  let b = wid.z;
  let kvh = h / (p.H / p.Hkv);
  let t = t0 + row;
  let rowValid = t < p.T;
  let i = p.qOff + t;
  let qb = ((b * p.T + min(t, p.T - 1u)) * p.H + h) * D;
  let tLast = min(t0 + ${s.R}u, p.T) - 1u;
  let iFirst = p.qOff + t0;
  let iLast = p.qOff + tLast;
  let kEnd = select(p.S, min(p.S, iLast + 1u), p.causal != 0u);
  let kStart = select(0u, iFirst + 1u - p.window, p.window != 0u && iFirst + 1u > p.window);`;
}

/** Slot of lane z ≥ 1 of `row` in the merge area. */
function mergeSlot(s: LaneShape, z: string): string {
  return `(row * ${s.KS - 1}u + ${z} - 1u) * SV`;
}

/** Element types of the fused adapter output (null: no adapter). */
type FusedTypes = { at: ActivationType; L: number } | null;

/**
 * WGSL of the fused forward's second softmax, over the L adapter tokens staged at ADP (keys, then values at
 * FUSED_MAX_L rows on): the scores `sa{j}` from the thread's q row, their exponentials `pa{j}`, the factor
 * `fa` (the gate over their sum) and `withMain` (whether the main output is added).
 */
function adapterSoftmax(L: number, DVn: number, SVn: number): string {
  const LA = range(L);
  return `${
    LA.map((j) =>
      `    var sa${j}: f32;
    {
      var a = q0 * KV[ADP + ${j * SVn}u];
${range(DVn).slice(1).map((c) => `      a = fma(q${c}, KV[ADP + ${j * SVn + c}u], a);`).join("\n")}
      sa${j} = ((a.x + a.y) + (a.z + a.w)) * p.aScale;
    }`
    ).join("\n")
  }
    let ma = ${LA.map((j) => `sa${j}`).reduce((x, y) => `max(${x}, ${y})`)};
${LA.map((j) => `    let pa${j} = exp(sa${j} - ma);`).join("\n")}
    let fa = gateOf(h) / (${LA.map((j) => `pa${j}`).join(" + ")});
    let withMain = select(0.0, 1.0, (p.aMode & 4u) != 0u);`;
}

/**
 * WGSL ending the lane forward where rows are written as vec4s: lane 0 has left the row's merged output in
 * its merge slot, and every lane of the row stores vec4s `lane, lane + KS, ...` of it (a row's lanes write
 * neighbouring 16-byte pieces, so a warp's stores fill whole 32-byte sectors). With the adapter folded in,
 * every lane computes the L adapter scores and stores its vec4s of `main · withMain + gate · adapter`.
 */
function sharedStores(
  s: LaneShape,
  DVn: number,
  SVn: number,
  mainSlot: string,
  ot: ActivationType,
  fused: FusedTypes,
): string {
  const own = range(Math.ceil(DVn / s.KS));
  const LA = range(fused?.L ?? 0);
  const each = (body: (c: string) => string) =>
    own.map((i) =>
      `    {
      let c = ${i * s.KS}u + lane;
      if (c < DV) { ${body("c")} }
    }`
    ).join("\n");
  const adapter = fused
    ? `${adapterSoftmax(LA.length, DVn, SVn)}
${
      each((c) =>
        `let d = ${
          LA.reduce(
            (acc, j) => `fma(vec4<f32>(pa${j}), KV[ADP + ${(FUSED_MAX_L + j) * SVn}u + ${c}], ${acc})`,
            "vec4<f32>(0.0)",
          )
        };
        aout[ob4 + ${c}] = ${stVec(fused.at, `KV[${mainSlot} + ${c}] * withMain + d * fa`)};`
      )
    }`
    : "";
  return `  // every lane stores its share of the row${
    fused ? " (and of the adapter's second softmax over the L tokens)" : ""
  }
  workgroupBarrier();
  if (rowValid) {
    let ob4 = ((b * p.T + t) * p.H + h) * DV;
${each((c) => `out[ob4 + ${c}] = ${stVec(ot, `KV[${mainSlot} + ${c}]`)};`)}
${adapter}
  }`;
}

function forwardLanesKernel(D: number, ty: ActTypes, s: LaneShape, fused: FusedTypes): Kernel {
  const DVn = dv(D);
  const SVn = oddStride(DVn);
  const C = range(DVn);
  const W = range(s.G);
  const { qt, kt, vt, ot } = ty;
  const at = fused?.at;
  const LA = range(fused?.L ?? 0);
  const last = `${s.KS - 1}u`;
  const vec = vecRows(D);
  // where lane 0 leaves a row's merged output (for the adapter lane, or for all lanes' vec4 stores): its
  // row's first merge slot
  const mainSlot = s.KS > 1 ? mergeSlot(s, "1u") : "row * SV";
  const adapterBindings = at
    ? `@group(0) @binding(6) var<storage, read> ka: array<f32>;
@group(0) @binding(7) var<storage, read> va: array<f32>;
@group(0) @binding(8) var<storage, read> gate: array<f32>;
@group(0) @binding(9) var<storage, read_write> aout: array<${elem(at, vec)}>;
@group(0) @binding(10) var<uniform> p: P;
${gateFunction("(p.aMode & 3u)")}`
    : `@group(0) @binding(6) var<uniform> p: P;`;
  return defineKernel(
    "attention_fwd_lanes",
    {
      D,
      ...ty,
      R: s.R,
      KS: s.KS,
      G: s.G,
      pf: s.prefetch ? 1 : 0,
      adapter: at ? `${at} L=${LA.length}` : "none",
      vec: vec ? 1 : 0,
    },
    [
      "read",
      "read",
      "read",
      "read",
      "write",
      "write",
      ...(at ? ["read", "read", "read", "write"] as const : []),
      "uniform",
    ],
    () => `
${enableF16(qt, kt, vt, ot, at ?? "f32")}${PARAMS}
${forwardBindings(ty, vec)}
${adapterBindings}
${tiledHeader(D)}
const BK: u32 = ${LANE_BK}u;
const ADP: u32 = ${
      laneTileSlots(D) - 2 * FUSED_MAX_L * SVn
    }u; // the adapter's keys/values after the merge area
// key rows then value rows; at the end the partial accumulators of lanes 1.. (and the adapter's keys/values)
var<workgroup> KV: array<vec4<f32>, ${laneTileSlots(D)}>;
var<workgroup> Ms: array<f32, ${LANE_WG}>;
var<workgroup> Ls: array<f32, ${LANE_WG}>;
${VISIBLE}
@compute @workgroup_size(${LANE_WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) tid: u32) {
  ${laneProlog(s)}
${C.map((c) => `  let q${c} = ${vecLoad(D, c, "q", "qb", qt, vec)} * p.scale;`).join("\n")}
${C.map((c) => `  var o${c} = vec4<f32>(0.0);`).join("\n")}
  var m = NEG;
  var l = 0.0;
${laneLoopPrologue(D, kt, vt, s, vec)}
  for (var k0 = kStart; k0 < kEnd; k0 += BK) {
    ${laneBlockStart(D, kt, vt, s, vec)}
    for (var g = 0u; g < BK; g += ${s.KS * s.G}u) {
${
      W.map((w) =>
        `${laneDot(s, DVn, w, "a", "q", "", true)}
      var s${w} = (a${w}.x + a${w}.y) + (a${w}.z + a${w}.w);
${laneHidden(s, w, `s${w} = NEG;`)}`
      ).join("\n")
    }
      let mNew = max(m, ${W.map((w) => `s${w}`).reduce((a, b) => `max(${a}, ${b})`)});
      let corr = exp(m - mNew);
${W.map((w) => `      let p${w} = select(0.0, exp(s${w} - mNew), s${w} > NEG * 0.5);`).join("\n")}
      l = l * corr + ${W.map((w) => `p${w}`).join(" + ")};
${
      C.map((c) =>
        `      o${c} = ${
          W.reduce(
            (acc, w) => `fma(vec4<f32>(p${w}), KV[(BK * SV + kb${w}) + ${c}u], ${acc})`,
            `o${c} * corr`,
          )
        };`
      ).join("\n")
    }
      m = mNew;
    }
  }
  workgroupBarrier();
  if (lane != 0u) {
    Ms[tid] = m;
    Ls[tid] = l;
${laneLeave(s, DVn, "o")}
  }
${
      at
        ? `  // the adapter's keys and values (L ≤ ${FUSED_MAX_L}, shared by the batch) after the merge area
  ${
          stageRows(
            D,
            ["ka", "f32", "va", "f32"],
            `${LA.length}u`,
            "true",
            "(r * p.Hkv + kvh) * D",
            "ADP",
            `${FUSED_MAX_L}u`,
          )
        }`
        : ""
    }
  workgroupBarrier();
  if (lane == 0u) {
    var mr = m;
    for (var z = 1u; z < ${s.KS}u; z++) { mr = max(mr, Ms[row * ${s.KS}u + z]); }
    let f0 = exp(m - mr);
    l = l * f0;
${C.map((c) => `    o${c} = o${c} * f0;`).join("\n")}
    for (var z = 1u; z < ${s.KS}u; z++) {
      let fz = exp(Ms[row * ${s.KS}u + z] - mr);
      l = l + Ls[row * ${s.KS}u + z] * fz;
${C.map((c) => `      o${c} = fma(vec4<f32>(fz), KV[${mergeSlot(s, "z")} + ${c}u], o${c});`).join("\n")}
    }
    let inv = select(0.0, 1.0 / l, l > 0.0);
${C.map((c) => `    o${c} = o${c} * inv;`).join("\n")}
    if (rowValid) {
${
      vec ? "" : `      let ob = ((b * p.T + t) * p.H + h) * D;
${C.map((c) => `      ${vecStore(D, c, "out", "ob", `o${c}`, "", ot)}`).join("\n")}`
    }
      if (p.flag != 0u) { lse[(b * p.H + h) * p.T + t] = select(0.0, mr + log(l), l > 0.0); }
    }
${at || vec ? C.map((c) => `    KV[${mainSlot} + ${c}u] = o${c};`).join("\n") : ""}
  }
${vec ? sharedStores(s, DVn, SVn, mainSlot, ot, fused) : ""}
${
      at && !vec
        ? `  // the second softmax, over the L adapter tokens only (two passes, L scores in registers), by the
  // last lane of each row (lane 0 for KS = 1), which then adds lane 0's main output from the merge area
  workgroupBarrier();
  if (lane == ${last} && rowValid) {
${adapterSoftmax(LA.length, DVn, SVn)}
    let ob = ((b * p.T + t) * p.H + h) * D;
${
          C.map((c) =>
            `    {
      let d = ${
              LA.reduce(
                (acc, j) => `fma(vec4<f32>(pa${j}), KV[ADP + ${(FUSED_MAX_L + j) * SVn + c}u], ${acc})`,
                "vec4<f32>(0.0)",
              )
            };
      ${vecStore(D, c, "aout", "ob", `(KV[${mainSlot} + ${c}u] * withMain + d * fa)`, "", at)}
    }`
          ).join("\n")
        }
  }`
        : ""
    }
}`,
  );
}

function dqLanesKernel(D: number, ty: BwdTypes, s: LaneShape): Kernel {
  const DVn = dv(D);
  const C = range(DVn);
  const W = range(s.G);
  const { qt, kt, vt } = ty;
  return defineKernel(
    "attention_bwd_dq_lanes",
    { D, ...ty, R: s.R, KS: s.KS, G: s.G, pf: s.prefetch ? 1 : 0 },
    ["read", "read", "read", "read", "read", "read", "write", "uniform"],
    () => `
${enableF16(qt, kt, vt)}${PARAMS}
${dqBindings(ty)}
${tiledHeader(D)}
const BK: u32 = ${LANE_BK}u;
var<workgroup> KV: array<vec4<f32>, ${
      laneTileSlots(D)
    }>; // key rows, then value rows; at the end lanes 1..'s dq
${VISIBLE}
@compute @workgroup_size(${LANE_WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) tid: u32) {
  ${laneProlog(s)}
  let tc = min(t, p.T - 1u);
${C.map((c) => `  let q${c} = ${vecLoad(D, c, "q", "qb", qt)} * p.scale;`).join("\n")}
${C.map((c) => `  let o${c} = ${vecLoad(D, c, "dout", "qb")};`).join("\n")}
${C.map((c) => `  var g${c} = vec4<f32>(0.0);`).join("\n")}
  let li = stats[(b * p.H + h) * p.T + tc];
  let di = stats[p.B * p.H * p.T + (b * p.H + h) * p.T + tc];
${laneLoopPrologue(D, kt, vt, s)}
  for (var k0 = kStart; k0 < kEnd; k0 += BK) {
    ${laneBlockStart(D, kt, vt, s)}
    for (var g = 0u; g < BK; g += ${s.KS * s.G}u) {
${
      W.map((w) =>
        `${laneDot(s, DVn, w, "a", "q", "", true)}
${laneDot(s, DVn, w, "e", "o", "BK * SV + ", false)}
      var d${w} = exp((a${w}.x + a${w}.y) + (a${w}.z + a${w}.w) - li) * ((e${w}.x + e${w}.y) + (e${w}.z + e${w}.w) - di);
${laneHidden(s, w, `d${w} = 0.0;`)}`
      ).join("\n")
    }
${
      C.map((c) =>
        `      g${c} = ${W.reduce((acc, w) => `fma(vec4<f32>(d${w}), KV[kb${w} + ${c}u], ${acc})`, `g${c}`)};`
      ).join("\n")
    }
    }
  }
  workgroupBarrier();
  if (lane != 0u) {
${laneLeave(s, DVn, "g")}
  }
  workgroupBarrier();
  if (rowValid && lane == 0u) {
    for (var z = 1u; z < ${s.KS}u; z++) {
${C.map((c) => `      g${c} = g${c} + KV[${mergeSlot(s, "z")} + ${c}u];`).join("\n")}
    }
${C.map((c) => `    ${vecStore(D, c, "dq", "qb", `(g${c} * p.scale)`, "p.flag != 0u")}`).join("\n")}
  }
}`,
  );
}

const spares = new WeakMap<GPUDevice, Tensor>();

/**
 * A small f32 tensor, one per device, to bind where a kernel declares an f32 array that this dispatch
 * does not read (an absent mask or adapter).
 *
 * @param rec The recorder.
 * @returns The spare tensor.
 */
export function spareF32(rec: Recorder): Tensor {
  let t = spares.get(rec.gpu.device);
  if (!t) {
    t = createTensor(rec.gpu, [4], "f32", "spare f32 binding");
    spares.set(rec.gpu.device, t);
  }
  return t;
}

function checkShapes(r: Resolved, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | null): void {
  if (q.size < r.B * r.T * r.H * r.D) throw new GpuError(`attention: q [${q.shape}] smaller than (B,T,H,D)`);
  const kv = r.B * r.kvStride * r.Hkv * r.D;
  if (k.size < kv || v.size < kv) throw new GpuError(`attention: k/v smaller than (B, kvStride, Hkv, D)`);
  if (mask && mask.size < r.B * r.kvStride) {
    throw new GpuError(`attention: mask [${mask.shape}] < (B, kvStride)`);
  }
  if (mask && mask.dtype !== "i32" && mask.dtype !== "u32") throw new GpuError(`attention: mask must be i32`);
}

/** Throws unless every tensor is f32 (statistics and gradients never travel in f16). */
function requireF32(what: string, tensors: Record<string, Tensor>): void {
  for (const [name, t] of Object.entries(tensors)) {
    if (t.dtype !== "f32") throw new GpuError(`${what}: ${name} (${t.label}) must be f32, is ${t.dtype}`);
  }
}

/** The element types of q, k, v and out (each f32 or f16). */
function actTypes(rec: Recorder, what: string, q: Tensor, k: Tensor, v: Tensor, out: Tensor): ActTypes {
  return {
    qt: activationType(rec.gpu, q, `${what} q`),
    kt: activationType(rec.gpu, k, `${what} k`),
    vt: activationType(rec.gpu, v, `${what} v`),
    ot: activationType(rec.gpu, out, `${what} out`),
  };
}

/**
 * Records the attention forward: `out = softmax(mask(q·kᵀ * scale)) · v` per head, and (for training)
 * the log-sum-exp of every query row. Rows with no visible key get `out = 0`, `lse = 0`. q, k, v and out
 * may each be f32 or f16 (f16 is storage only: loaded into f32, computed in f32, rounded once at the store).
 * With `adapter`, also writes the layer's adapter attention `gate · softmax(q·kₐᵀ * scaleₐ) · vₐ` (plus `out`
 * when `adapter.withMain`) to `adapter.out`, in the same dispatch where the lane kernels run.
 *
 * @param rec The recorder.
 * @param out Output `(B, T, H, D)` f32 or f16, overwritten.
 * @param lse Log-sum-exp per query row `(B, H, T)` f32 for the backward, or null (inference).
 * @param q Queries `(B, T, H, D)` f32 or f16.
 * @param k Keys `(B, kvStride, Hkv, D)` f32 or f16 (e.g. an f16 KV cache).
 * @param v Values `(B, kvStride, Hkv, D)` f32 or f16.
 * @param mask HF attention mask, i32 `(B, kvStride)` (1 = attend, 0 = padded key), or null.
 * @param opts Sizes and masking options.
 * @param adapter The layer's adapter attention, folded into the same dispatch where it fits.
 */
export function attentionForward(
  rec: Recorder,
  out: Tensor, // (B, T, H, D)
  lse: Tensor | null, // (B, H, T)
  q: Tensor, // (B, T, H, D)
  k: Tensor, // (B, kvStride, Hkv, D)
  v: Tensor, // (B, kvStride, Hkv, D)
  mask: Tensor | null, // (B, kvStride) i32
  opts: AttentionOptions,
  adapter?: FusedAdapterAttention,
): void {
  const r = resolve(opts);
  checkShapes(r, q, k, v, mask);
  if (lse) requireF32("attentionForward", { lse });
  const ty = actTypes(rec, "attentionForward", q, k, v, out);
  const rows = r.B * r.T;
  if (adapter) {
    checkAdapterAttention(adapterOptions(r, adapter, rows), q, adapter.ka, adapter.va, adapter.gate);
  }
  const R = r.T >= 48 ? 64 : Math.min(32, 2 ** Math.ceil(Math.log2(Math.max(1, r.T))));
  const tiledOk = R === 64 && r.D <= TILE_MAX_D && attentionTuning.tiled;
  const shape = attentionTuning.forwardShape;
  if (tiledOk && attentionTuning.lanes && laneShapeFits(rec, r.D, shape)) {
    const fuse = adapter && adapter.adapterLen <= FUSED_MAX_L &&
      rec.gpu.limits.maxStorageBuffersPerShaderStage >= 10;
    const fusedTypes = fuse
      ? { at: activationType(rec.gpu, adapter.out, "attentionForward adapter out"), L: adapter.adapterLen }
      : null;
    const mode = fuse ? ADAPTER_GATE_MODE[adapter.gateKind] + (adapter.withMain ? 4 : 0) : 0;
    rec.dispatch(
      forwardLanesKernel(r.D, ty, shape, fusedTypes),
      [
        q,
        k,
        v,
        mask ?? q,
        out,
        lse ?? spareF32(rec),
        ...(fuse ? [adapter.ka, adapter.va, adapter.gate, adapter.out] : []),
      ],
      params(r, mask !== null, lse ? 1 : 0, opts.scale, 0, 0, {
        mode,
        scale: fuse ? adapter.scale / opts.scale : 0,
      }),
      [Math.ceil(r.T / shape.R), r.H, r.B],
    );
    if (adapter && !fuse) adapterAfter(rec, out, q, adapter, adapterOptions(r, adapter, rows));
    return;
  }
  if (tiledOk) {
    rec.dispatch(
      forwardTiledKernel(r.D, ty),
      [q, k, v, mask ?? q, out, lse ?? spareF32(rec)],
      params(r, mask !== null, lse ? 1 : 0, opts.scale),
      [Math.ceil(r.T / 64), r.H, r.B],
    );
  } else {
    rec.dispatch(
      forwardKernel(r.D, R, ty),
      [q, k, v, mask ?? q, out, lse ?? spareF32(rec)],
      params(r, mask !== null, lse ? 1 : 0, opts.scale),
      [Math.ceil(r.T / R), r.H, r.B],
    );
  }
  if (adapter) adapterAfter(rec, out, q, adapter, adapterOptions(r, adapter, rows));
}

/**
 * The layer's LLaMA-Adapter attention (kernels/adapter_attention.ts) for {@link attentionForward} to fold
 * into the same dispatch (the lane kernels, L ≤ 16, where 10 storage bindings fit; otherwise it runs
 * the adapter kernel after the main one, with the same result).
 */
export interface FusedAdapterAttention {
  /** Adapter keys `(L, Hkv, D)` f32. */
  ka: Tensor;
  /** Adapter values `(L, Hkv, D)` f32. */
  va: Tensor;
  /** The gate, `(1)` or `(H)` f32. */
  gate: Tensor;
  /** L: adapter tokens. */
  adapterLen: number;
  /** Gate form. */
  gateKind: GateKind;
  /** Score scale of the adapter softmax (PEFT: `1/sqrt(D)`). */
  scale: number;
  /** Output `(B, T, H, D)` f32 or f16, overwritten: `gate · adapter attention`, plus the main output when `withMain`. */
  out: Tensor;
  /** Whether `out` also gets the main attention output (llama: one o_proj over the sum; gpt2: no). */
  withMain: boolean;
}

function adapterOptions(r: Resolved, a: FusedAdapterAttention, rows: number): AdapterAttentionOptions {
  return {
    numHeads: r.H,
    numKvHeads: r.Hkv,
    headDim: r.D,
    adapterLen: a.adapterLen,
    rows,
    scale: a.scale,
    gateKind: a.gateKind,
  };
}

/** The adapter in its own dispatches, after the main attention wrote `out`. */
function adapterAfter(
  rec: Recorder,
  out: Tensor,
  q: Tensor,
  a: FusedAdapterAttention,
  o: AdapterAttentionOptions,
): void {
  adapterAttentionForward(rec, a.out, q, a.ka, a.va, a.gate, o);
  if (a.withMain) addInto(rec, a.out, out);
}

// ---------------------------------------------------------------------------------------------------
// Backward

/** Threads per row of the row-dot kernel, and its rows per workgroup. */
const ROWDOT_TEAM = 16;
const ROWDOT_ROWS = 16;

/**
 * `Di = rowsum(dout * out)` per (b, t, h) row, and lse copied beside it: a team of 16 threads per row, each
 * over every 16th element (a warp's loads are 2 rows of contiguous bytes; one thread per row read 32 rows
 * 256 bytes apart per load), then the team's partial sums added in a fixed order.
 */
function rowDotKernel(D: number, ot: ActivationType): Kernel {
  return defineKernel(
    "attention_bwd_rowdot",
    { D, ot, team: ROWDOT_TEAM },
    ["read", "read", "read", "write", "uniform"],
    () => `
${enableF16(ot)}struct P { rows: u32, T: u32, H: u32, stride: u32 }
@group(0) @binding(0) var<storage, read> dout: array<f32>;
@group(0) @binding(1) var<storage, read> o: array<${ot}>;
@group(0) @binding(2) var<storage, read> lse: array<f32>;
@group(0) @binding(3) var<storage, read_write> stats: array<f32>; // [lse (B,H,T) | Di (B,H,T)]
@group(0) @binding(4) var<uniform> p: P;
var<workgroup> part: array<f32, ${ROWDOT_TEAM * ROWDOT_ROWS}>;
@compute @workgroup_size(${
      ROWDOT_TEAM * ROWDOT_ROWS
    }) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) tid: u32) {
  let r = tid / ${ROWDOT_TEAM}u;
  let c = tid % ${ROWDOT_TEAM}u;
  let n = (wid.x + wid.y * p.stride) * ${ROWDOT_ROWS}u + r; // row (b, t, h) of dout
  var s = 0.0;
  if (n < p.rows) {
    let base = n * ${D}u;
    for (var d = c; d < ${D}u; d += ${ROWDOT_TEAM}u) { s = s + dout[base + d] * ${ld(ot, "o[base + d]")}; }
  }
  part[tid] = s;
  workgroupBarrier();
  if (c != 0u || n >= p.rows) { return; }
  s = 0.0;
  for (var j = 0u; j < ${ROWDOT_TEAM}u; j++) { s = s + part[tid + j]; }
  let h = n % p.H;
  let bt = n / p.H;
  let t = bt % p.T;
  let b = bt / p.T;
  let at = (b * p.H + h) * p.T + t;
  stats[at] = lse[at];
  stats[p.rows + at] = s;
}`,
  );
}

const BQB = 32; // query rows staged per step in the dk/dv pass
const BKB = 32; // keys per workgroup in the dk/dv pass (one per thread)
const RQ = 64; // query rows per workgroup in the dq pass (one per thread)

/** Element types of the saved activations the dk/dv and dq passes read. */
type BwdTypes = Omit<ActTypes, "ot">;

function dkdvKernel(D: number, ty: BwdTypes): Kernel {
  const DVn = dv(D);
  const { qt, kt, vt } = ty;
  const qe = ld(qt, "q[base + e]");
  return defineKernel(
    "attention_bwd_dkdv",
    { D, ...ty },
    ["read", "read", "read", "read", "read", "read", "write", "write", "uniform"],
    () => `
${enableF16(qt, kt, vt)}${PARAMS}
@group(0) @binding(0) var<storage, read> q: array<${qt}>;
@group(0) @binding(1) var<storage, read> k: array<${kt}>;
@group(0) @binding(2) var<storage, read> v: array<${vt}>;
@group(0) @binding(3) var<storage, read> mask: array<i32>;
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read> stats: array<f32>; // lse (B,H,T) then Di (B,H,T)
@group(0) @binding(6) var<storage, read_write> dk: array<f32>;
@group(0) @binding(7) var<storage, read_write> dv: array<f32>;
@group(0) @binding(8) var<uniform> p: P;
const D: u32 = ${D}u;
const DV: u32 = ${DVn}u;
const BQ: u32 = ${BQB}u;
var<workgroup> Qs: array<vec4<f32>, ${BQB * DVn}>;
var<workgroup> Os: array<vec4<f32>, ${BQB * DVn}>;
var<workgroup> Ls: array<f32, ${BQB}>;
var<workgroup> Ds: array<f32, ${BQB}>;
${VISIBLE}
@compute @workgroup_size(${BKB}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) tid: u32) {
  let k0 = wid.x * ${BKB}u;
  let kvh = wid.y;
  let b = wid.z;
  let j = k0 + tid;
  let kLast = min(k0 + ${BKB}u, p.S) - 1u;
  let jc = min(j, kLast);
  let kb = ((b * p.kvStride + jc) * p.Hkv + kvh) * D;
${each(DVn, (c) => `  let kr${c} = ${vecLoad(D, c, "k", "kb", kt)};`)}
${each(DVn, (c) => `  let vr${c} = ${vecLoad(D, c, "v", "kb", vt)};`)}
${each(DVn, (c) => `  var gk${c} = vec4<f32>(0.0);\n  var gv${c} = vec4<f32>(0.0);`)}
  let group = p.H / p.Hkv;
  let BHT = p.B * p.H * p.T;
  // query rows that can see some key of this block: causal needs i >= k0, the window i < kLast + window
  let tStart = select(0u, select(0u, k0 - p.qOff, k0 > p.qOff), p.causal != 0u);
  let tEnd = select(p.T, min(p.T, select(0u, kLast + p.window - p.qOff, kLast + p.window > p.qOff)), p.window != 0u);
  for (var hh = 0u; hh < group; hh++) {
    let h = kvh * group + hh;
    for (var t0 = tStart; t0 < tEnd; t0 += BQ) {
      workgroupBarrier();
      for (var x = tid; x < BQ * DV; x += ${BKB}u) {
        let t = min(t0 + x / DV, p.T - 1u);
        let c = x % DV;
        let base = ((b * p.T + t) * p.H + h) * D + 4u * c;
        var qv = vec4<f32>(0.0);
        var ov = vec4<f32>(0.0);
        for (var e = 0u; e < 4u && 4u * c + e < D; e++) { qv[e] = ${qe}; ov[e] = dout[base + e]; }
        Qs[x] = qv;
        Os[x] = ov;
      }
      for (var x = tid; x < BQ; x += ${BKB}u) {
        let t = min(t0 + x, p.T - 1u);
        Ls[x] = stats[(b * p.H + h) * p.T + t];
        Ds[x] = stats[BHT + (b * p.H + h) * p.T + t];
      }
      workgroupBarrier();
      let rows = min(BQ, tEnd - t0);
      for (var r = 0u; r < rows; r++) {
        if (j <= kLast && visible(b, p.qOff + t0 + r, j)) {
          let rb = r * DV;
          let s = (${dotRow(DVn, "kr", "Qs", "rb")}) * p.scale;
          let pr = exp(s - Ls[r]);
          let dp = ${dotRow(DVn, "vr", "Os", "rb")};
          let ds = pr * (dp - Ds[r]);
${
      each(
        DVn,
        (c) =>
          `          gv${c} = gv${c} + pr * Os[rb + ${c}u];\n          gk${c} = gk${c} + ds * Qs[rb + ${c}u];`,
      )
    }
        }
      }
    }
  }
  if (j <= kLast) {
    let ob = ((b * p.kvStride + j) * p.Hkv + kvh) * D;
${each(DVn, (c) => `    ${vecStore(D, c, "dk", "ob", `(gk${c} * p.scale)`, "p.flag != 0u")}`)}
${each(DVn, (c) => `    ${vecStore(D, c, "dv", "ob", `gv${c}`, "p.flag != 0u")}`)}
  }
}`,
  );
}

function dqKernel(D: number, ty: BwdTypes): Kernel {
  const DVn = dv(D);
  const BK = keyBlock(D);
  const { qt, kt, vt } = ty;
  const ke = ld(kt, "k[base + e]");
  const ve = ld(vt, "v[base + e]");
  return defineKernel(
    "attention_bwd_dq",
    { D, ...ty },
    ["read", "read", "read", "read", "read", "read", "write", "uniform"],
    () => `
${enableF16(qt, kt, vt)}${PARAMS}
${dqBindings(ty)}
const D: u32 = ${D}u;
const DV: u32 = ${DVn}u;
const BK: u32 = ${BK}u;
var<workgroup> Ks: array<vec4<f32>, ${BK * DVn}>;
var<workgroup> Vs: array<vec4<f32>, ${BK * DVn}>;
${VISIBLE}
@compute @workgroup_size(${RQ}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) tid: u32) {
  let t0 = wid.x * ${RQ}u;
  let h = wid.y;
  let b = wid.z;
  let kvh = h / (p.H / p.Hkv);
  let t = t0 + tid;
  let rowValid = t < p.T;
  let tc = min(t, p.T - 1u);
  let i = p.qOff + t;
  let qb = ((b * p.T + tc) * p.H + h) * D;
${each(DVn, (c) => `  let q${c} = ${vecLoad(D, c, "q", "qb", qt)};`)}
${each(DVn, (c) => `  let o${c} = ${vecLoad(D, c, "dout", "qb")};`)}
${each(DVn, (c) => `  var g${c} = vec4<f32>(0.0);`)}
  let li = stats[(b * p.H + h) * p.T + tc];
  let di = stats[p.B * p.H * p.T + (b * p.H + h) * p.T + tc];
  let tLast = min(t0 + ${RQ}u, p.T) - 1u;
  let kEnd = select(p.S, min(p.S, p.qOff + tLast + 1u), p.causal != 0u);
  let iFirst = p.qOff + t0;
  let kStart = select(0u, iFirst + 1u - p.window, p.window != 0u && iFirst + 1u > p.window);
  for (var k0 = kStart; k0 < kEnd; k0 += BK) {
    workgroupBarrier();
    for (var x = tid; x < BK * DV; x += ${RQ}u) {
      let j = min(k0 + x / DV, kEnd - 1u);
      let c = x % DV;
      let base = ((b * p.kvStride + j) * p.Hkv + kvh) * D + 4u * c;
      var kv = vec4<f32>(0.0);
      var vv = vec4<f32>(0.0);
      for (var e = 0u; e < 4u && 4u * c + e < D; e++) { kv[e] = ${ke}; vv[e] = ${ve}; }
      Ks[x] = kv;
      Vs[x] = vv;
    }
    workgroupBarrier();
    let n = min(BK, kEnd - k0);
    for (var jj = 0u; jj < n; jj++) {
      if (rowValid && visible(b, i, k0 + jj)) {
        let kb = jj * DV;
        let s = (${dotRow(DVn, "q", "Ks", "kb")}) * p.scale;
        let pr = exp(s - li);
        let dp = ${dotRow(DVn, "o", "Vs", "kb")};
        let ds = pr * (dp - di);
${each(DVn, (c) => `        g${c} = g${c} + ds * Ks[kb + ${c}u];`)}
      }
    }
  }
  if (rowValid) {
${each(DVn, (c) => `    ${vecStore(D, c, "dq", "qb", `(g${c} * p.scale)`, "p.flag != 0u")}`)}
  }
}`,
  );
}

const statsCache = new WeakMap<GPUBuffer, Tensor>();
const partialsCache = new WeakMap<GPUBuffer, [Tensor, Tensor]>();

/** Scratch for the per-query-head dk and dv partials `(B, S, H, D)`, cached per dk buffer. */
function partialsScratch(rec: Recorder, dk: Tensor, n: number): [Tensor, Tensor] {
  const hit = partialsCache.get(dk.buffer);
  if (hit && hit[0].size >= n) return hit;
  const t: [Tensor, Tensor] = [
    createTensor(rec.gpu, [n], "f32", "attention dk partials"),
    createTensor(rec.gpu, [n], "f32", "attention dv partials"),
  ];
  partialsCache.set(dk.buffer, t);
  return t;
}

/**
 * Kernel choice: `tiled: true` runs the tiled kernels for D ≤ 64 (the forward from 48 query rows), 1.3×
 * (forward) and 2.2-3.7× (dK/dV) faster on an H200; `false` runs the first (per-row / per-key thread)
 * kernels. Both are tested. One whole-model training benchmark on an H200 failed with "out of GPU
 * memory" at its first step when the tiled kernels first went in (2026-11-27, cause not found, see
 * bench/RESULTS.md); the same benchmark then trained with them on an H100 (gpt2-124M: 72.4 → 64.3 ms per
 * step) and across all three benchmark models, so they are the default again. With `tiled`, `lanes: true`
 * (the default) runs the lane kernels instead for the forward (T ≥ 48, with the adapter folded in) and dq:
 * forward 1.8-1.9× faster than the tiled one at the model shapes on an H100, dq 1.0-1.4×; `forwardShape` and
 * `dqShape` are the measured best of the sweep in bench/RESULTS.md. All three families are tested.
 *
 * The lane kernels load the next key block into registers while they compute the current one
 * (`prefetch`; forward and dq take 4-10% less time with f32 activations on an H100, 0-2% less with f16).
 * The dk/dv pass runs the first tile of `dkdvTiles` whose workgroup memory fits the device
 * ({@link dkdvTileFor}), with the next query block prefetched the same way: 2 keys × 4 queries per thread
 * where 48 KiB allow it (H100/H200: 20-27% less time than the 2×2 tile at the model shapes), else 2 × 1
 * (fits 32 KiB at D = 64; 16-31% less); where none fits, the per-row kernels run. Every tile is tested (on lavapipe's 32 KiB at head sizes up to 32);
 * all tiles give the same bits, as each sums over the queries in the same order.
 *
 * `dqFromScores` (with the tiled dk/dv pass): that pass also writes the ds it computes into a scratch of
 * `B·H·T·S` floats and dq is the product of ds and k ({@link dqScoresKernel}, `dqScoresRows` rows per
 * thread) instead of the lane dq pass, which recomputes both dot products of every (query, key) pair;
 * used while the scratch (one per dq buffer) stays within `scoresMaxBytes` and the device's binding size,
 * else the lane dq pass runs. H100, B=4, T=512, f32, per layer: dq 0.257 → 0.065 ms (SmolLM2), 0.714 →
 * 0.184 (TinyLlama), 0.341 → 0.087 (gpt2) at 2 rows per thread (1 and 4 are 10-40% slower); the dk/dv pass
 * takes 4-5% longer writing ds; the scratch is 38 MB (SmolLM2), 50 MB (gpt2), 134 MB (TinyLlama).
 *
 * `vecRows` (where D is a multiple of 4): the lane forward binds q, k, v, out and the adapter's output as
 * vec4s (16-byte loads and stores instead of four 4-byte ones), and every lane of a row stores its share of
 * the merged row (and of the adapter's output) from workgroup memory, so a warp's stores fill whole
 * sectors; the tiled dk/dv pass and dq from the scores read q, k, v, dout and write dk, dv, dq as vec4s.
 * H100, B=4, T=512, f32, causal, per layer: lane forward with the adapter folded in 0.180 → 0.155 ms
 * (SmolLM2), 0.232 → 0.196 (gpt2), 0.518 → 0.431 (TinyLlama); dk/dv 5-10% and dq 9-10% less time
 * (bench/attention_probe.ts). `false` keeps the element-wise accesses (tested).
 */
export const attentionTuning: {
  tiled: boolean;
  lanes: boolean;
  forwardShape: LaneShape;
  dqShape: LaneShape;
  dkdvTiles: DkdvTile[];
  dqFromScores: boolean;
  dqScoresRows: number;
  scoresMaxBytes: number;
  vecRows: boolean;
} = {
  tiled: true,
  lanes: true,
  forwardShape: { R: 64, KS: 2, G: 4, prefetch: true },
  dqShape: { R: 64, KS: 2, G: 1, prefetch: true },
  dkdvTiles: [{ keys: 2, queries: 4, prefetch: true }, { keys: 2, queries: 1, prefetch: true }],
  dqFromScores: true,
  dqScoresRows: 2,
  scoresMaxBytes: 512 * 2 ** 20,
  vecRows: true,
};

/**
 * The first tile of `attentionTuning.dkdvTiles` whose workgroup memory fits the device, or null when none
 * does (the backward then runs the per-row kernels, which need little workgroup memory).
 */
export function dkdvTileFor(rec: Recorder, D: number): DkdvTile | null {
  const limit = rec.gpu.limits.maxComputeWorkgroupStorageSize;
  return attentionTuning.dkdvTiles.find((t) => dkdvTileBytes(D, t) <= limit) ?? null;
}

const scoresCache = new WeakMap<GPUBuffer, Tensor>();

/**
 * Scratch `[lse | Di | ds]` (`(B, H, T)` twice, then `(B, H, T, S)`) of the dq-from-scores path, cached per
 * dq buffer like the stats scratch (the layers of a model share their gradient buffers, so one per
 * activation set), grown when a larger one is needed (recorded steps keep the one they bound).
 */
function scoresScratch(rec: Recorder, dq: Tensor, n: number): Tensor {
  return cachedScratch(scoresCache, rec.gpu, dq, n, "attention scores scratch");
}

/**
 * The `[lse | Di | ds]` scratch of the dq-from-scores path for this dq, or null before the first backward
 * that used it (tests poison it to show that no unwritten entry is read).
 */
export function attentionScoresScratch(dq: Tensor): Tensor | null {
  return scoresCache.get(dq.buffer) ?? null;
}

/** How {@link attentionBackward} computes the gradients for these options on this device. */
export interface AttentionBackwardPlan {
  /** The dk/dv pass's per-thread tile, or null for the per-row kernels. */
  dkdv: DkdvTile | null;
  /** dq: from the scores the dk/dv pass wrote, by the lane kernel, or by the per-row kernel. */
  dq: "scores" | "lanes" | "rows";
}

/**
 * The kernels {@link attentionBackward} runs for `opts` on this device (see `attentionTuning`).
 *
 * @example
 * ```ts ignore
 * const plan = attentionBackwardPlan(rec, opts); // { dkdv: { keys: 2, queries: 4, prefetch: true }, dq: "scores" }
 * ```
 */
export function attentionBackwardPlan(rec: Recorder, opts: AttentionOptions): AttentionBackwardPlan {
  const r = resolve(opts);
  const group = r.H / r.Hkv;
  const partN = r.B * r.S * r.H * r.D;
  const limit = rec.gpu.limits.maxStorageBufferBindingSize;
  const partsFit = group === 1 || partN * 4 <= limit;
  const tile = r.D <= TILE_MAX_D && attentionTuning.tiled ? dkdvTileFor(rec, r.D) : null;
  if (!tile || !partsFit) return { dkdv: null, dq: "rows" };
  const scoresBytes = 4 * scoresScratchFloats(r.B, r.H, r.T, r.S);
  if (
    attentionTuning.dqFromScores && scoresBytes <= Math.min(attentionTuning.scoresMaxBytes, limit) &&
    scoresBytes <= rec.gpu.limits.maxBufferSize
  ) {
    return { dkdv: tile, dq: "scores" };
  }
  const lanes = attentionTuning.lanes && laneShapeFits(rec, r.D, attentionTuning.dqShape);
  return { dkdv: tile, dq: lanes ? "lanes" : "rows" };
}

/** Scratch `[lse | Di]`, each `(B, H, T)`, cached per dq buffer (no allocation on replays). */
function statsScratch(rec: Recorder, dq: Tensor, n: number): Tensor {
  return cachedScratch(statsCache, rec.gpu, dq, n, "attention stats");
}
/**
 * Records the FlashAttention-2 backward: `Di = rowsum(dout_i * out_i)`; `p` recomputed from q, k and lse;
 * `dv = pᵀ dout`, `dp = dout vᵀ`, `ds = p * (dp - Di)`, `dq = ds k * scale`, `dk = dsᵀ q * scale`. dk and
 * dv sum over the query heads that share a key/value head. Deterministic (no atomics). dk and dv use k's
 * layout `(B, kvStride, Hkv, D)`; only the first `keyLen` positions of each batch row are written. The
 * saved activations q, k, v and out may each be f32 or f16 (as the forward wrote or read them); dout, lse
 * and the gradients are f32.
 *
 * @param rec The recorder.
 * @param dq Gradient of q `(B, T, H, D)`, overwritten (added into with `opts.accumulate`).
 * @param dk Gradient of k `(B, kvStride, Hkv, D)`, overwritten (or added into).
 * @param dv Gradient of v `(B, kvStride, Hkv, D)`, overwritten (or added into).
 * @param dout Gradient of out `(B, T, H, D)` f32.
 * @param out The forward's output `(B, T, H, D)`, f32 or f16.
 * @param lse The forward's log-sum-exp `(B, H, T)` f32.
 * @param q Queries `(B, T, H, D)`, f32 or f16.
 * @param k Keys `(B, kvStride, Hkv, D)`, f32 or f16.
 * @param v Values `(B, kvStride, Hkv, D)`, f32 or f16.
 * @param mask HF attention mask i32 `(B, kvStride)` or null.
 * @param opts The forward's options, plus `accumulate`.
 */
export function attentionBackward(
  rec: Recorder,
  dq: Tensor, // (B, T, H, D)
  dk: Tensor, // (B, kvStride, Hkv, D)
  dv: Tensor, // (B, kvStride, Hkv, D)
  dout: Tensor, // (B, T, H, D)
  out: Tensor, // (B, T, H, D)
  lse: Tensor, // (B, H, T)
  q: Tensor, // (B, T, H, D)
  k: Tensor, // (B, kvStride, Hkv, D)
  v: Tensor, // (B, kvStride, Hkv, D)
  mask: Tensor | null, // (B, kvStride) i32
  opts: AttentionOptions,
): void {
  const r = resolve(opts);
  checkShapes(r, q, k, v, mask);
  if (lse.size < r.B * r.H * r.T) throw new GpuError(`attention backward: lse [${lse.shape}] < (B, H, T)`);
  requireF32("attentionBackward", { dq, dk, dv, dout, lse });
  const { ot, ...ty } = actTypes(rec, "attentionBackward", q, k, v, out);
  const bht = r.B * r.H * r.T;
  const plan = attentionBackwardPlan(rec, opts);
  const fromScores = plan.dq === "scores";
  // lse and Di (and ds) travel in one scratch so that no pass binds more than 8 storage buffers
  const stats = fromScores
    ? scoresScratch(rec, dq, scoresScratchFloats(r.B, r.H, r.T, r.S))
    : statsScratch(rec, dq, 2 * bht);
  const g = grid1d(Math.ceil(bht / ROWDOT_ROWS), 1);
  rec.dispatch(rowDotKernel(r.D, ot), [dout, out, lse, stats], [bht, r.T, r.H, g.stride], g.groups);
  const flag = opts.accumulate ? 1 : 0;
  const m = mask ?? q;
  const prm = params(r, mask !== null, flag, opts.scale);
  const group = r.H / r.Hkv;
  const partN = r.B * r.S * r.H * r.D;
  const tile = plan.dkdv;
  if (!tile) {
    const grid: [number, number, number] = [Math.ceil(r.S / BKB), r.Hkv, r.B];
    rec.dispatch(dkdvKernel(r.D, ty), [q, k, v, m, dout, stats, dk, dv], prm, grid);
    rec.dispatch(dqKernel(r.D, ty), [q, k, v, m, dout, stats, dq], prm, [Math.ceil(r.T / RQ), r.H, r.B]);
    return;
  }
  const kvGrid: [number, number, number] = [Math.ceil(r.S / (16 * tile.keys)), r.H, r.B];
  if (group === 1) {
    rec.dispatch(dkdvTiledKernel(r.D, ty, tile, fromScores), [q, k, v, m, dout, stats, dk, dv], prm, kvGrid);
  } else {
    // one workgroup per (key block, query head): partials per query head, summed in a fixed order
    const [pk, pv] = partialsScratch(rec, dk, partN);
    rec.dispatch(
      dkdvTiledKernel(r.D, ty, tile, fromScores),
      [q, k, v, m, dout, stats, pk, pv],
      params(r, mask !== null, 0, opts.scale, 1),
      kvGrid,
    );
    const rg = grid1d(r.B * r.S * r.Hkv * r.D, 256);
    rec.dispatch(
      dkdvReduceKernel(r.D),
      [pk, pv, dk, dv],
      params(r, false, flag, opts.scale, 0, rg.stride),
      rg.groups,
    );
  }
  if (fromScores) {
    const BT = 16 * attentionTuning.dqScoresRows;
    rec.dispatch(dqScoresKernel(r.D, ty.kt, attentionTuning.dqScoresRows), [k, mask ?? k, stats, dq], prm, [
      Math.ceil(r.T / BT),
      r.H,
      r.B,
    ]);
    return;
  }
  // dq: the per-row kernel (q, dout and dq in registers, k/v tiles broadcast) measured faster than a
  // tiled one here (H200, 2026-11-27: TinyLlama 0.72 vs 1.04 ms)
  if (plan.dq === "lanes") {
    const s = attentionTuning.dqShape;
    rec.dispatch(dqLanesKernel(r.D, ty, s), [q, k, v, m, dout, stats, dq], prm, [
      Math.ceil(r.T / s.R),
      r.H,
      r.B,
    ]);
    return;
  }
  rec.dispatch(dqKernel(r.D, ty), [q, k, v, m, dout, stats, dq], prm, [Math.ceil(r.T / RQ), r.H, r.B]);
}
