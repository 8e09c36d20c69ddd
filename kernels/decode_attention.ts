/**
 * Fused decode attention: at a decode step (B batch rows, one new query token each) one dispatch per
 * layer computes the causal / padded / sliding-window attention of the query against the KV cache and,
 * when the layer has an adaption prompt, the LLaMA-Adapter attention over its L adapter tokens — what
 * `attentionForward` with `queryLen = 1`, then `adapterAttentionForward`, then an add would record as three
 * dispatches. It exists for speed: decode runs it at every step of every layer, and the general forward
 * keeps only 32 lanes per head busy and synchronises twice per 32 keys.
 *
 * One workgroup of 256 threads per (query head, batch row). The visible keys `[kStart, kEnd)` (causal end,
 * sliding-window start; only the padding mask is tested per key) are walked in chunks of 1024, two barriers
 * each. Scores: teams of 4 threads share a key, each thread dotting q with every 4th vec4 column of the
 * row, so that a warp's loads touch 8 rows rather than 32 (measured 1.4× faster over all than one thread
 * per key); the 4 partial sums go to workgroup memory. Then the threads work as (key group × vec4 column of
 * D) and each keeps its own online softmax (running max, sum and a vec4 of `p·v`) over the keys of its
 * group across all chunks: no per-chunk max or sum reduction, and any keyLen works. The adapter's ≤ 64
 * keys are scored by idle teams before the first chunk and accumulated the same way with their own
 * softmax. At the end the key groups' states are merged (rescaled to the common max) in workgroup memory by
 * one thread per vec4 column, which writes the output. Loads of a step (4 keys per team, 8 per thread in
 * the p·v phase) are issued together: one workgroup per head is latency-bound, not bandwidth-bound.
 *
 * Measured on an H200 (bench/attention_bench.ts, B=1, L=10, per-head-tanh gate): 5.9 / 7.7 / 9.4 µs at
 * 128 / 384 / 640 cached keys against 43-48 / 85-90 / 126-131 µs for attention T=1 + adapter + add (an empty
 * dispatch costs 1.6 µs there). On a CPU device (lavapipe) it is slower than the three
 * dispatches at tiny shapes: 256-thread workgroups with barriers cost more there.
 *
 * Semantics are those of `attentionForward` (kernels/attention.ts) with one query row: a row whose keys
 * are all hidden gets 0, never NaN; and of `adapterAttentionForward` (kernels/adapter_attention.ts): the
 * adapter output `g_h · softmax(q·ka * adapterScale) · va` is added to the main attention in `out`
 * (llama: before o_proj) or, with `into`, added into another tensor (gpt2: the residual stream) while
 * `out` holds only the main attention.
 *
 * Layouts: q and out `(B, 1, H, D)`; k and v `(B, kvStride, Hkv, D)`; mask i32 `(B, kvStride)`; ka and va
 * `(L, Hkv, D)`; gate `(1)` or `(H)`; into `(B, H*D)`. Query head h uses key/value head `floor(h / (H/Hkv))`.
 * q, k, v, out and into may each be f32 or f16 (an f16 KV cache, f16 activations; for D % 4 == 0 read and
 * written as vec4<f16>), computed in f32 and rounded once at the store; ka, va and the gate are f32.
 *
 * @module
 */

import {
  type ActivationType,
  activationType,
  type BindingKind,
  defineKernel,
  enableF16,
  type Kernel,
} from "../src/gpu/kernel.ts";
import { f32, type Recorder } from "../src/gpu/recorder.ts";
import type { Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";
import { type AttentionOptions, spareF32 } from "./attention.ts";
import { adapterAttentionForward, type GateKind } from "./adapter_attention.ts";

/** The adaption prompt of one layer, for {@link decodeAttentionForward}. */
export interface DecodeAttentionAdapter {
  /** Adapter keys `(L, Hkv, D)` f32. */
  ka: Tensor;
  /** Adapter values `(L, Hkv, D)` f32. */
  va: Tensor;
  /** Gate f32: `(1)` for `"scalar"`, `(H)` for `"per-head"` and `"per-head-tanh"`. */
  gate: Tensor;
  /** L: adapter tokens, 1..64. */
  adapterLen: number;
  /** Adapter score scale (PEFT: `1/sqrt(D)`). */
  scale: number;
  /** Gate form. */
  gateKind: GateKind;
  /**
   * Where the gated adapter output goes: null = added into `out` (llama: attn + adapter before o_proj);
   * a tensor `(B, H*D)` f32 or f16 = added into that tensor (gpt2: into the residual stream; f16 is read,
   * added to in f32 and rounded once), and `out` then holds only the main attention.
   */
  into: Tensor | null;
}

const WG = 256; // threads per workgroup (the portable maximum)
const TEAM = 4; // threads per key in the score phase
const TEAMS = WG / TEAM;
const CHUNK = 1024; // keys whose partial scores sit in workgroup memory at once (16 KiB)
const MAX_L = 64;
const MAX_D = 4 * WG; // every vec4 column needs a thread in the p·v phase
const SCORE_UNROLL = 4; // keys per step of a team in the score phase (their loads are issued together)
const UNROLL = 8; // keys per step of a thread in the p·v phase (a power of 2)
const NEG = "-1.0e30";
const GATE_MODE: Record<GateKind, number> = { "scalar": 0, "per-head": 1, "per-head-tanh": 2 };

function each(n: number, f: (c: number) => string, sep = "\n"): string {
  return Array.from({ length: n }, (_, c) => f(c)).join(sep);
}

/**
 * WGSL that reads and writes vec4 columns of rows of D values, whichever way the arrays are declared and
 * whatever their element type (f32, or f16 for the activations named in `types`: loaded into f32 and
 * rounded once at the store).
 */
class Rows {
  readonly D: number;
  readonly DV: number;
  /** Whether the arrays are declared `array<vec4<T>>` (D % 4 == 0). */
  readonly vec: boolean;
  /** Elements of the declared array per row of D values. */
  readonly stride: number;
  /** Element type of each array; arrays not named are f32. */
  readonly types: Readonly<Record<string, ActivationType>>;
  constructor(D: number, types: Readonly<Record<string, ActivationType>>) {
    this.D = D;
    this.DV = Math.ceil(D / 4);
    this.vec = D % 4 === 0;
    this.stride = this.vec ? this.DV : D;
    this.types = types;
  }
  /** The element type of `arr`'s values. */
  type(arr: string): ActivationType {
    return this.types[arr] ?? "f32";
  }
  /** The declared element type of `arr`. */
  elem(arr: string): string {
    const t = this.type(arr);
    return this.vec ? `vec4<${t}>` : t;
  }
  /** The array element `idx` of `arr` as f32 (the text itself for f32). */
  #widen(arr: string, idx: string): string {
    if (this.type(arr) === "f32") return idx;
    return this.vec ? `vec4<f32>(${idx})` : `f32(${idx})`;
  }
  /** The f32 value `val` converted for a store into `arr` (the text itself for f32). */
  #narrow(arr: string, val: string): string {
    return this.type(arr) === "f32" ? val : `${this.elem(arr)}(${val})`;
  }
  /** vec4 column `c` (a u32 expression below DV) of the row at `base`; lanes past D repeat an element of the row. */
  load(arr: string, base: string, c: string): string {
    if (this.vec) return this.#widen(arr, `${arr}[${base} + ${c}]`);
    // clamped inside the row: no out-of-bounds read; q's lanes past D are zeroed, so these add nothing
    const comps = [0, 1, 2, 3].map((e) =>
      this.#widen(arr, `${arr}[${base} + min(4u * ${c} + ${e}u, D - 1u)]`)
    );
    return `vec4<f32>(${comps.join(", ")})`;
  }
  /** Statements writing (or adding, when `add`) the vec4 `value` at column `c` of the row at `base`. */
  store(arr: string, base: string, c: string, value: string, add: boolean): string {
    // an add reads the old value into f32 and rounds the sum once
    const set = (idx: string, val: string) =>
      `${idx} = ${this.#narrow(arr, add ? `${this.#widen(arr, idx)} + ${val}` : val)};`;
    if (this.vec) return set(`${arr}[${base} + ${c}]`, value);
    return [0, 1, 2, 3].map((e) => {
      const st = set(`${arr}[${base} + 4u * ${c} + ${e}u]`, `${value}.${"xyzw"[e]}`);
      return e === 0 ? st : `if (4u * ${c} + ${e}u < D) { ${st} }`;
    }).join(" ");
  }
}

/** Element types of the activation bindings: q, the cached k and v, out and `into` (named dst). */
interface DecodeTypes {
  qt: ActivationType;
  kt: ActivationType;
  vt: ActivationType;
  ot: ActivationType;
  dt: ActivationType;
}

/**
 * One step of a thread's online softmax over `n` keys (scores `s{u}`, value columns `w{u}`, loaded first so
 * that their loads are in flight together): the state (m, l, acc) is rescaled once per step. Hidden keys
 * (score NEG) add nothing, even when their value holds NaN.
 */
function softmaxStep(
  n: number,
  score: (u: number) => string,
  value: (u: number) => string,
  st: { m: string; l: string; acc: string },
  hidden: boolean,
): string {
  const ok = (u: number) => `s${u} > ${NEG} * 0.5`;
  return `{
${each(n, (u) => `      let s${u} = ${score(u)};\n      let w${u} = ${value(u)};`)}
      let mNew = ${nestedMax([st.m, ...Array.from({ length: n }, (_, u) => `s${u}`)])};
      let corr = exp(${st.m} - mNew);
${
    each(n, (u) =>
      `      let e${u} = ${hidden ? `select(0.0, exp(s${u} - mNew), ${ok(u)})` : `exp(s${u} - mNew)`};`)
  }
      ${st.l} = ${st.l} * corr + ${each(n, (u) => `e${u}`, " + ")};
      ${st.acc} = ${st.acc} * corr + ${
    each(n, (u) => (hidden ? `select(vec4<f32>(0.0), e${u} * w${u}, ${ok(u)})` : `e${u} * w${u}`), " + ")
  };
      ${st.m} = mNew;
    }`;
}

function nestedMax(xs: string[]): string {
  if (xs.length === 1) return xs[0]!;
  const h = xs.length >> 1;
  return `max(${nestedMax(xs.slice(0, h))}, ${nestedMax(xs.slice(h))})`;
}

/**
 * The p·v loop of the thread (g, c) over the keys `g, g + NG, ... < end`: steps of UNROLL keys, then one
 * of UNROLL / 2 (short rows), then single keys.
 */
function pvLoop(
  end: string,
  score: (x: string) => string,
  value: (x: string) => string,
  st: { m: string; l: string; acc: string },
  hidden: boolean,
): string {
  const at = (u: number) => (u === 0 ? "x" : `x + ${u}u * NG`);
  const step = (n: number) => softmaxStep(n, (u) => score(at(u)), (u) => value(at(u)), st, hidden);
  const half = UNROLL / 2;
  return `{
      var x = g;
      for (; x + ${UNROLL - 1}u * NG < ${end}; x += ${UNROLL}u * NG) ${step(UNROLL)}
      if (x + ${half - 1}u * NG < ${end}) {
        ${step(half)}
        x += ${half}u * NG;
      }
      for (; x < ${end}; x += NG) ${step(1)}
    }`;
}

function decodeKernel(D: number, into: boolean, ty: DecodeTypes): Kernel {
  const { qt, kt, vt, ot, dt } = ty;
  const r = new Rows(D, { q: qt, k: kt, v: vt, out: ot, dst: dt });
  const DV = r.DV;
  const NG = Math.floor(WG / DV);
  const QE = Math.ceil(DV / TEAM); // vec4 columns per thread in the score phase
  /** The team thread's part of the dot product of q with the row at `base` of `arr`. */
  const partDot = (arr: string, base: string) =>
    each(QE, (e) => `dot(qt${e}, ${r.load(arr, base, `min(tl + ${4 * e}u, DV - 1u)`)})`, " + ");
  const bindings: BindingKind[] = ["read", "read", "read", "read", "read", "read", "read", "write"];
  if (into) bindings.push("write");
  bindings.push("uniform");
  return defineKernel(
    "decode_attention",
    { D, into, ...ty },
    bindings,
    () => `
${enableF16(qt, kt, vt, ot, dt)}struct P {
  H: u32, Hkv: u32, kvStride: u32, kStart: u32,
  kEnd: u32, useMask: u32, L: u32, gmode: u32,
  scale: f32, ascale: f32, _a: u32, _b: u32,
}
@group(0) @binding(0) var<storage, read> q: array<${r.elem("q")}>;
@group(0) @binding(1) var<storage, read> k: array<${r.elem("k")}>;
@group(0) @binding(2) var<storage, read> v: array<${r.elem("v")}>;
@group(0) @binding(3) var<storage, read> mask: array<i32>;
@group(0) @binding(4) var<storage, read> ka: array<${r.elem("ka")}>;
@group(0) @binding(5) var<storage, read> va: array<${r.elem("va")}>;
@group(0) @binding(6) var<storage, read> gate: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<${r.elem("out")}>;
${
      into
        ? `@group(0) @binding(8) var<storage, read_write> dst: array<${r.elem("dst")}>; // adapter.into
@group(0) @binding(9) var<uniform> p: P;`
        : `@group(0) @binding(8) var<uniform> p: P;`
    }
const D: u32 = ${D}u;
const DV: u32 = ${DV}u;
const RS: u32 = ${r.stride}u; // array elements per row of D floats
const CH: u32 = ${CHUNK}u;
const TEAMS: u32 = ${TEAMS}u;
const NG: u32 = ${NG}u; // key groups of the p·v phase
const NEG: f32 = ${NEG};
// the 4 partial dot products of each key of a chunk (a hidden key's add up to exactly NEG); at the end
// the key groups' p·v sums and softmax states
var<workgroup> Part: array<vec4<f32>, ${CHUNK}>;
var<workgroup> APart: array<vec4<f32>, ${MAX_L}>; // the same for the adapter keys

fn gateOf(h: u32) -> f32 {
  if (p.gmode == 0u) { return gate[0]; }
  if (p.gmode == 1u) { return gate[h]; }
  return tanh(gate[h]);
}

fn score(pp: vec4<f32>, scale: f32) -> f32 {
  let sum = pp.x + pp.y + pp.z + pp.w;
  return select(NEG, sum * scale, sum > NEG * 0.5);
}

@compute @workgroup_size(${WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) tid: u32) {
  let h = wid.x;
  let b = wid.y;
  let kvh = h / (p.H / p.Hkv);
  let qb = (b * p.H + h) * RS;
  let kvRow = b * p.kvStride;
  var gv = 0.0;
  if (p.L > 0u) { gv = gateOf(h); }
  // score phase: team tm of 4 threads per key; thread tl holds the q columns tl, tl + 4, ... (zero past D)
  let tm = tid / ${TEAM}u;
  let tl = tid % ${TEAM}u;
${
      each(QE, (e) => {
        const c = `min(tl + ${4 * e}u, DV - 1u)`;
        const lanes = [0, 1, 2, 3].map((x) => `select(0.0, 1.0, 4u * (tl + ${4 * e}u) + ${x}u < D)`);
        return `  let qt${e} = ${r.load("q", "qb", c)} * vec4<f32>(${lanes.join(", ")});`;
      })
    }
  let hid = select(0.0, NEG, tl == 0u); // what a thread stores for a hidden key
  // adapter keys: one team each
  for (var x = tm; x < p.L; x += TEAMS) {
    let ab = (x * p.Hkv + kvh) * RS;
    APart[x][tl] = ${partDot("ka", "ab")};
  }
  // p·v phase: thread (g, c), key group g, vec4 column c of D
  let g = tid / DV;
  let c = tid % DV;
  let busy = g < NG; // DV does not divide 256: the last threads idle
  var m = NEG;
  var l = 0.0;
  var acc = vec4<f32>(0.0);
  for (var c0 = p.kStart; c0 < p.kEnd; c0 += CH) {
    let n = min(CH, p.kEnd - c0);
    workgroupBarrier(); // the previous chunk's scores have been read
    for (var x0 = tm; x0 < n; x0 += ${SCORE_UNROLL}u * TEAMS) {
      // keys clamped into the chunk so that every load is unconditional (the loads are issued together)
${
      each(SCORE_UNROLL, (u) =>
        `      let j${u} = kvRow + c0 + min(x0 + ${u * TEAMS}u, n - 1u);
      let kb${u} = (j${u} * p.Hkv + kvh) * RS;
      let d${u} = ${partDot("k", `kb${u}`)};
      let vis${u} = p.useMask == 0u || mask[j${u}] != 0;`)
    }
${
      each(
        SCORE_UNROLL,
        (u) =>
          `      if (x0 + ${u * TEAMS}u < n) { Part[x0 + ${u * TEAMS}u][tl] = select(hid, d${u}, vis${u}); }`,
      )
    }
    }
    workgroupBarrier();
    if (busy) ${
      pvLoop(
        "n",
        (x) => `score(Part[${x}], p.scale)`,
        (x) => r.load("v", `((kvRow + c0 + ${x}) * p.Hkv + kvh) * RS`, "c"),
        { m: "m", l: "l", acc: "acc" },
        true,
      )
    }
  }
  workgroupBarrier(); // Part is free, APart complete (also when no key was visible)
  var ma = NEG;
  var la = 0.0;
  var acca = vec4<f32>(0.0);
  // merge the key groups: Part[tid] = p·v sums, Part[RA + tid] = adapter's, Part[SO + g] = (m, l, ma, la)
  let RA = NG * DV;
  let SO = 2u * NG * DV;
  if (busy) {
    ${
      pvLoop(
        "p.L",
        (x) => `score(APart[${x}], p.ascale)`,
        (x) => r.load("va", `(${x} * p.Hkv + kvh) * RS`, "c"),
        { m: "ma", l: "la", acc: "acca" },
        false,
      )
    }
    Part[tid] = acc;
    Part[RA + tid] = acca;
    if (c == 0u) { Part[SO + g] = vec4<f32>(m, l, ma, la); }
  }
  workgroupBarrier();
  if (tid < DV) {
    var mt = NEG;
    var mta = NEG;
    for (var z = 0u; z < NG; z++) {
      mt = max(mt, Part[SO + z].x);
      mta = max(mta, Part[SO + z].z);
    }
    var lt = 0.0;
    var o = vec4<f32>(0.0);
    var lta = 0.0;
    var oa = vec4<f32>(0.0);
    for (var z = 0u; z < NG; z++) {
      let st = Part[SO + z];
      let f = exp(st.x - mt);
      let fa = exp(st.z - mta);
      lt = lt + st.y * f;
      lta = lta + st.w * fa;
      o = o + Part[z * DV + tid] * f;
      oa = oa + Part[RA + z * DV + tid] * fa;
    }
    var res = select(vec4<f32>(0.0), o / lt, lt > 0.0); // every key hidden: 0, not NaN
    if (p.L > 0u) {
      let ad = oa * (gv / lta);
      ${into ? r.store("dst", "qb", "tid", "ad", true) : "res = res + ad;"}
    }
    ${r.store("out", "qb", "tid", "res", false)}
  }
}`,
  );
}

/**
 * Records one decode step of attention for every (batch row, query head) in one dispatch: the causal /
 * padded / sliding-window attention of the single query against the KV cache (exactly `attentionForward`
 * with `queryLen = 1`: a row whose keys are all hidden gets 0) plus, when `adapter` is given, the gated
 * adapter attention of the same query (exactly `adapterAttentionForward`), added into `out` or, with
 * `adapter.into`, into that tensor. q, k, v, out and `adapter.into` may each be f32 or f16 (loaded into f32,
 * computed in f32, rounded once at the store; `into` is read, added to in f32 and rounded once); the adapter
 * keys, values and gate are f32.
 *
 * @param rec The recorder.
 * @param out Output `(B, 1, H, D)` f32 or f16, overwritten: the main attention, plus the adapter's unless
 *   `adapter.into` is set.
 * @param q Queries `(B, 1, H, D)` f32 or f16 (after RoPE).
 * @param k Keys `(B, kvStride, Hkv, D)` f32 or f16 (the KV cache; the first `keyLen` positions are valid).
 * @param v Values `(B, kvStride, Hkv, D)` f32 or f16.
 * @param mask HF attention mask, i32 `(B, kvStride)` (0 = padded key), or null.
 * @param opts Sizes and masking as for `attentionForward`; `queryLen` must be 1.
 * @param adapter The layer's adaption prompt, or null. With `into` the kernel binds 9 storage buffers; on a
 *   device that allows fewer, the adapter is recorded as a second dispatch (`adapterAttentionForward`).
 * @throws {GpuError} when `queryLen` is not 1, or a size, dtype or the adapter length is out of range.
 * @example One llama decode step with an adapter (TinyLlama shapes, 256 cached keys)
 * ```ts ignore
 * const rec = new Recorder(gpu);
 * decodeAttentionForward(rec, attn, q, kCache, vCache, mask, {
 *   numHeads: 32, numKvHeads: 4, headDim: 64, batch: 1, queryLen: 1, keyLen: 256, kvStride: 2048,
 *   queryOffset: 255, scale: 1 / 8, causal: true,
 * }, { ka, va, gate, adapterLen: 10, scale: 1 / 8, gateKind: "scalar", into: null });
 * rec.submit();
 * ```
 */
export function decodeAttentionForward(
  rec: Recorder,
  out: Tensor, // (B, 1, H, D)
  q: Tensor, // (B, 1, H, D)
  k: Tensor, // (B, kvStride, Hkv, D)
  v: Tensor, // (B, kvStride, Hkv, D)
  mask: Tensor | null, // (B, kvStride) i32
  opts: AttentionOptions,
  adapter: DecodeAttentionAdapter | null,
): void {
  const { numHeads: H, numKvHeads: Hkv, headDim: D, batch: B, keyLen: S } = opts;
  const what = "decode attention";
  if (opts.queryLen !== 1) {
    throw new GpuError(`${what}: queryLen is ${opts.queryLen}, must be 1 (use attentionForward for prefill)`);
  }
  const kvStride = opts.kvStride ?? S;
  const qOff = opts.queryOffset ?? S - 1;
  const window = opts.slidingWindow ?? 0;
  if (!(H >= 1 && Hkv >= 1 && H % Hkv === 0)) {
    throw new GpuError(`${what}: numHeads ${H} is not a positive multiple of numKvHeads ${Hkv}`);
  }
  if (!(D >= 1 && D <= MAX_D)) throw new GpuError(`${what}: headDim ${D} outside 1..${MAX_D}`);
  if (!(B >= 1)) throw new GpuError(`${what}: batch ${B} < 1`);
  if (kvStride < S) throw new GpuError(`${what}: kvStride ${kvStride} < keyLen ${S}`);
  if (qOff < 0) throw new GpuError(`${what}: queryOffset ${qOff} < 0 (keyLen ${S} < 1?)`);
  if (window < 0) throw new GpuError(`${what}: slidingWindow ${window} < 0`);
  const ty: DecodeTypes = {
    qt: activationType(rec.gpu, q, "decodeAttentionForward q"),
    kt: activationType(rec.gpu, k, "decodeAttentionForward k"),
    vt: activationType(rec.gpu, v, "decodeAttentionForward v"),
    ot: activationType(rec.gpu, out, "decodeAttentionForward out"),
    dt: "f32",
  };
  const rowSize = B * H * D;
  if (q.size < rowSize) throw new GpuError(`${what}: q [${q.shape}] smaller than (B, 1, H, D) = ${rowSize}`);
  if (out.size < rowSize) {
    throw new GpuError(`${what}: out [${out.shape}] smaller than (B, 1, H, D) = ${rowSize}`);
  }
  const kvSize = B * kvStride * Hkv * D;
  if (k.size < kvSize || v.size < kvSize) {
    throw new GpuError(
      `${what}: k [${k.shape}] / v [${v.shape}] smaller than (B, kvStride, Hkv, D) = ${kvSize}`,
    );
  }
  if (mask && mask.size < B * kvStride) throw new GpuError(`${what}: mask [${mask.shape}] < (B, kvStride)`);
  if (mask && mask.dtype !== "i32" && mask.dtype !== "u32") throw new GpuError(`${what}: mask must be i32`);
  const L = adapter?.adapterLen ?? 0;
  if (adapter) {
    if (!(L >= 1 && L <= MAX_L)) throw new GpuError(`${what}: adapterLen ${L} outside 1..${MAX_L}`);
    const { ka, va, gate, into } = adapter;
    const aSize = L * Hkv * D;
    if (ka.size < aSize || va.size < aSize) {
      throw new GpuError(`${what}: ka [${ka.shape}] / va [${va.shape}] smaller than (L, Hkv, D) = ${aSize}`);
    }
    const gSize = adapter.gateKind === "scalar" ? 1 : H;
    if (gate.size < gSize) {
      throw new GpuError(
        `${what}: a "${adapter.gateKind}" gate needs ${gSize} values, [${gate.shape}] given`,
      );
    }
    if (into && into.size < rowSize) {
      throw new GpuError(`${what}: into [${into.shape}] smaller than (B, H*D) = ${rowSize}`);
    }
    for (const [name, t] of [["ka", ka], ["va", va], ["gate", gate]] as const) {
      if (t.dtype !== "f32") throw new GpuError(`${what}: adapter ${name} must be f32, is ${t.dtype}`);
    }
    if (into) ty.dt = activationType(rec.gpu, into, "decodeAttentionForward adapter.into");
    if (into && into.buffer === out.buffer) {
      const a0 = into.offset, a1 = a0 + into.byteLength, b0 = out.offset, b1 = b0 + out.byteLength;
      if (a0 < b1 && b0 < a1) {
        throw new GpuError(`${what}: adapter.into overlaps out; give it its own tensor`);
      }
    }
  }
  // the visible keys of the one query (position qOff): causal end and sliding-window start
  const kEnd = opts.causal ? Math.min(S, qOff + 1) : S;
  const kStart = window > 0 && qOff + 1 > window ? qOff + 1 - window : 0;
  let into = adapter?.into ?? null;
  let fusedL = L;
  // with `into`, the kernel binds 9 storage buffers; a device allowing only WebGPU's default 8 gets the
  // adapter from its own kernel instead
  if (into && rec.gpu.limits.maxStorageBuffersPerShaderStage < 9) {
    into = null;
    fusedL = 0;
  }
  const params = [
    H,
    Hkv,
    kvStride,
    kStart,
    Math.max(kStart, kEnd),
    mask ? 1 : 0,
    fusedL,
    adapter ? GATE_MODE[adapter.gateKind] : 0,
    f32(opts.scale),
    f32(adapter?.scale ?? 0),
    0,
    0,
  ];
  const a = fusedL > 0 ? adapter! : null;
  // unread bindings: q itself where it is f32 (an f16 q may be smaller than one vec4<f32>)
  const unused = q.dtype === "f32" ? q : spareF32(rec);
  const buffers = [
    q,
    k,
    v,
    mask ?? unused,
    a?.ka ?? unused,
    a?.va ?? unused,
    a?.gate ?? unused,
    out,
    ...(into ? [into] : []),
  ];
  if (!into) ty.dt = "f32";
  rec.dispatch(decodeKernel(D, into !== null, ty), buffers, params, [H, B]);
  if (adapter && fusedL === 0) {
    adapterAttentionForward(rec, adapter.into!, q, adapter.ka, adapter.va, adapter.gate, {
      numHeads: H,
      numKvHeads: Hkv,
      headDim: D,
      adapterLen: L,
      rows: B,
      scale: adapter.scale,
      gateKind: adapter.gateKind,
      accumulate: true,
    });
  }
}
