/**
 * Next-token sampling on the GPU, one workgroup per row of logits, with no sort and no readback.
 * Temperature 0 is greedy: the argmax, ties going to the lowest index as in `torch.argmax`. Otherwise the
 * logits are divided by the temperature and softmaxed, top-p (nucleus) filtering keeps
 * the tokens whose probability is at least τ, where τ is the largest probability for which the tokens at
 * or above it hold at least `topP` of the mass — found exactly by bisection over the f32 bit patterns of the
 * scaled logits (32 rounds, each a workgroup reduction). This is HF's `TopPLogitsWarper` rule (a token is
 * kept when the mass of the tokens ranked above it is below `topP`), except that tokens tied with the
 * threshold are all kept. A token is then drawn by inverse CDF in index order with a counter-based
 * random number (a PCG hash of seed, counter and row); a second tiny dispatch increments the counter in
 * `state`, so successive calls draw differently without host updates and the same seed replays exactly.
 *
 * @module
 */

import { defineKernel, type Kernel } from "../src/gpu/kernel.ts";
import { f32, type Recorder } from "../src/gpu/recorder.ts";
import type { Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";

const WG = 256;

function sampleKernel(): Kernel {
  return defineKernel("sample_tokens", {}, ["read", "read", "write", "uniform"], () => `
struct P {
  B: u32, V: u32, outIndex: u32, outStride: u32,
  gx: u32, greedy: u32, useTopP: u32, _a: u32,
  temperature: f32, topP: f32, _b: f32, _c: f32,
}
@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> state: array<u32, 4>;
@group(0) @binding(2) var<storage, read_write> out: array<i32>;
@group(0) @binding(3) var<uniform> p: P;
var<workgroup> redV: array<f32, ${WG}>;
var<workgroup> redI: array<u32, ${WG}>;

fn pcg(v: u32) -> u32 {
  let s = v * 747796405u + 2891336453u;
  let w = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
  return (w >> 22u) ^ w;
}
// a monotone map of f32 to u32: a < b as floats <=> key(a) < key(b) as integers
fn key(x: f32) -> u32 {
  let b = bitcast<u32>(x);
  return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}
fn reduceMax(lid: u32, v: f32) -> f32 {
  redV[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { redV[lid] = max(redV[lid], redV[lid + s]); }
    workgroupBarrier();
  }
  let r = redV[0];
  workgroupBarrier();
  return r;
}
fn reduceSum(lid: u32, v: f32) -> f32 {
  redV[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { redV[lid] = redV[lid] + redV[lid + s]; }
    workgroupBarrier();
  }
  let r = redV[0];
  workgroupBarrier();
  return r;
}

@compute @workgroup_size(${WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) l: vec3u) {
  let row = wid.x + wid.y * p.gx;
  if (row >= p.B) { return; }
  let lid = l.x;
  let base = row * p.V;
  // each thread owns one contiguous block of the vocabulary, so index order is block order
  let blk = (p.V + ${WG - 1}u) / ${WG}u;
  let start = min(lid * blk, p.V);
  let end = min(start + blk, p.V);
  let dst = p.outIndex + row * p.outStride;

  if (p.greedy != 0u) {
    var bv = -3.402823e38;
    var bi = 0xffffffffu;
    for (var i = start; i < end; i++) {
      let v = logits[base + i];
      if (v > bv || bi == 0xffffffffu) { bv = v; bi = i; }
    }
    redV[lid] = bv;
    redI[lid] = bi;
    workgroupBarrier();
    for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
      if (lid < s) {
        let ov = redV[lid + s];
        let oi = redI[lid + s];
        let mine = redI[lid];
        if (oi != 0xffffffffu && (mine == 0xffffffffu || ov > redV[lid] || (ov == redV[lid] && oi < mine))) {
          redV[lid] = ov;
          redI[lid] = oi;
        }
      }
      workgroupBarrier();
    }
    if (lid == 0u) { out[dst] = i32(redI[0]); }
    return;
  }

  var m = -3.402823e38;
  for (var i = start; i < end; i++) { m = max(m, logits[base + i] / p.temperature); }
  let smax = reduceMax(lid, m);
  var z = 0.0;
  for (var i = start; i < end; i++) { z += exp(logits[base + i] / p.temperature - smax); }
  let total = reduceSum(lid, z);

  // bisection for the largest key K with mass(key >= K) >= topP * total; K = 0 keeps everything
  var lo = 0u;
  if (p.useTopP != 0u) {
    var hi = key(smax);
    let need = p.topP * total;
    for (var it = 0u; it < 33u; it++) {
      let mid = lo + (hi - lo) / 2u + ((hi - lo) & 1u);
      var s = 0.0;
      for (var i = start; i < end; i++) {
        let x = logits[base + i] / p.temperature;
        if (key(x) >= mid) { s += exp(x - smax); }
      }
      let mass = reduceSum(lid, s);
      if (mass >= need || mid == lo) { lo = mid; } else { hi = mid - 1u; }
    }
  }

  var kept = 0.0;
  for (var i = start; i < end; i++) {
    let x = logits[base + i] / p.temperature;
    if (key(x) >= lo) { kept += exp(x - smax); }
  }
  redV[lid] = kept;
  workgroupBarrier();
  if (lid == 0u) {
    let h = pcg(state[0] + pcg(state[1] + pcg(row)));
    let u = f32(h >> 8u) * (1.0 / 16777216.0);
    var sum = 0.0;
    for (var t = 0u; t < ${WG}u; t++) { sum += redV[t]; }
    let goal = u * sum;
    // the block holding the goal, then the token inside it; rounding falls back to the last kept token
    var acc = 0.0;
    var tb = 0u;
    var last = 0u;
    for (var t = 0u; t < ${WG}u; t++) {
      if (redV[t] > 0.0) {
        last = t;
        if (acc + redV[t] > goal) { break; }
        acc += redV[t];
      }
      tb = t + 1u;
    }
    if (tb >= ${WG}u) { tb = last; acc = acc - redV[last]; }
    let s0 = min(tb * blk, p.V);
    let e0 = min(s0 + blk, p.V);
    var token = s0;
    for (var i = s0; i < e0; i++) {
      let x = logits[base + i] / p.temperature;
      if (key(x) >= lo) {
        token = i;
        acc += exp(x - smax);
        if (acc > goal) { break; }
      }
    }
    out[dst] = i32(token);
  }
}`);
}

function advanceKernel(): Kernel {
  return defineKernel("sample_advance", {}, ["write"], () => `
@group(0) @binding(0) var<storage, read_write> state: array<u32, 4>;
@compute @workgroup_size(1) fn main() { state[1] = state[1] + 1u; }`);
}

/**
 * Records the sampling of one token per row of logits, written to `out[outIndex + b * outStride]`, and
 * the increment of the random counter in `state[1]`.
 *
 * @param rec The recorder.
 * @param args `out` i32 tensor receiving the tokens; `outIndex` element written for row 0; `outStride`
 *   elements between rows; `logits` (B, V) f32; `state` u32 (4) `[seed, counter, 0, 0]`, the counter
 *   incremented by the GPU after each call; `temperature` (≤ 0: greedy argmax); `topP` in (0, 1]
 *   (1 keeps every token).
 */
export function sampleTokens(
  rec: Recorder,
  args: {
    out: Tensor;
    outIndex: number;
    outStride: number;
    logits: Tensor;
    state: Tensor;
    temperature: number;
    topP: number;
  },
): void {
  // logits: (B, V); out: (≥ outIndex + (B-1) * outStride + 1); state: (4)
  const { out, logits, state } = args;
  if (logits.shape.length !== 2) {
    throw new GpuError(`sampleTokens: logits must be (B, V), got [${logits.shape}]`);
  }
  const [B, V] = logits.shape as [number, number];
  if (out.dtype !== "i32" || out.size < args.outIndex + (B - 1) * args.outStride + 1) {
    throw new GpuError(`sampleTokens: out must be i32 with room for ${B} rows at stride ${args.outStride}`);
  }
  if (state.size !== 4 || state.dtype !== "u32") throw new GpuError("sampleTokens: state must be u32 (4)");
  const greedy = !(args.temperature > 0);
  const useTopP = !greedy && args.topP < 1;
  if (useTopP && !(args.topP > 0)) {
    throw new GpuError(`sampleTokens: topP must be in (0, 1], got ${args.topP}`);
  }
  const gx = Math.max(1, Math.min(B, 65535));
  rec.dispatch(sampleKernel(), [logits, state, out], [
    B,
    V,
    args.outIndex,
    args.outStride,
    gx,
    greedy ? 1 : 0,
    useTopP ? 1 : 0,
    0,
    f32(greedy ? 1 : args.temperature),
    f32(args.topP),
    f32(0),
    f32(0),
  ], [gx, Math.ceil(B / gx)]);
  rec.dispatch(advanceKernel(), [state], null, [1]);
}
