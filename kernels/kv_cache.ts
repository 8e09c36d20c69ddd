/**
 * KV-cache append and the decode state, for decode steps whose dispatches are identical every step (so
 * they are recorded once and replayed): the position of the new token is not a uniform but lives in a
 * small GPU buffer, the decode state, u32 `[pos, n, 0, 0]` — `pos` the cache position of the token the
 * next step appends (its RoPE / learned position), `n` how many tokens were sampled so far.
 *
 * - {@link kvCacheAppend} copies this step's keys and values `(B, T, Hkv*D)` into rows
 *   `[pos, pos + T)` of each batch row of the caches `(B, Smax, Hkv*D)` and sets the cache mask
 *   `(B, Smax)` i32 to 1 there (the attention over the whole preallocated cache hides the positions not
 *   written yet through that mask). Rows at or past `Smax` are dropped, never written out of range.
 * - {@link kvCacheAppendRope} does the same for RoPE models in one dispatch with the rotations: it rotates
 *   the queries in place and the keys on their way into the cache (HF `rotate_half`, as
 *   kernels/rope.ts), so a decode step needs no separate RoPE dispatches. (A replayed llama step folds
 *   this into the q/k/v products instead, `decodeQkvForward`'s `rope` option in kernels/decode_matvec.ts,
 *   and falls back to this kernel where that dispatch cannot take it.)
 * - {@link decodeAdvance} ends a step: appends the sampled id (`ids[0]`) to the token history at `n`
 *   (dropped past the history's end), advances `pos` and `n`, and writes `positions[0] = pos` for the
 *   next step's RoPE / position embedding (the next step's embedding reads the id the sampler wrote
 *   into `ids[0]`). It touches only integers, no activations.
 *
 * Queries, keys, values and the caches are activations: each may be f32 or f16 on its own (an f16 model
 * keeps an f16 cache, half the memory); values are converted to f32 on load and rounded at the store.
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
import type { Recorder } from "../src/gpu/recorder.ts";
import type { Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";
import { grid1d } from "./fill.ts";

const WG = 256;

/** Element types of the step's keys/values and of the caches (each f32 or f16). */
interface KvTypes {
  kt: ActivationType;
  vt: ActivationType;
  kct: ActivationType;
  vct: ActivationType;
}

function appendKernel({ kt, vt, kct, vct }: KvTypes): Kernel {
  return defineKernel(
    "kv_cache_append",
    { kt, vt, kct, vct },
    ["read", "read", "read", "write", "write", "write", "uniform"],
    () =>
      `${enableF16(kt, vt, kct, vct)}
struct P { n: u32, width: u32, T: u32, maxLen: u32, stride: u32, _a: u32, _b: u32, _c: u32 }
@group(0) @binding(0) var<storage, read> k: array<${kt}>;
@group(0) @binding(1) var<storage, read> v: array<${vt}>;
@group(0) @binding(2) var<storage, read> state: array<u32, 4>;
@group(0) @binding(3) var<storage, read_write> kc: array<${kct}>;
@group(0) @binding(4) var<storage, read_write> vc: array<${vct}>;
@group(0) @binding(5) var<storage, read_write> mask: array<i32>;
@group(0) @binding(6) var<uniform> p: P;
@compute @workgroup_size(${WG}) fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.x + g.y * p.stride;
  if (i >= p.n) { return; }
  let r = i / p.width; // (b, t) row of this step's keys
  let e = i % p.width;
  let b = r / p.T;
  let t = r % p.T;
  let j = state[0] + t; // cache position
  if (j >= p.maxLen) { return; }
  let dst = (b * p.maxLen + j) * p.width + e;
  kc[dst] = ${kct}(f32(k[i]));
  vc[dst] = ${vct}(f32(v[i]));
  if (e == 0u) { mask[b * p.maxLen + j] = 1; }
}`,
  );
}

function appendRopeKernel(qt: ActivationType, { kt, vt, kct, vct }: KvTypes): Kernel {
  return defineKernel(
    "kv_cache_append_rope",
    { qt, kt, vt, kct, vct },
    ["write", "read", "read", "read", "read", "read", "write", "write", "write", "uniform"],
    () =>
      `${enableF16(qt, kt, vt, kct, vct)}
struct P {
  qPairs: u32, kPairs: u32, H: u32, Hkv: u32,
  half: u32, T: u32, maxLen: u32, stride: u32,
}
@group(0) @binding(0) var<storage, read_write> q: array<${qt}>;
@group(0) @binding(1) var<storage, read> k: array<${kt}>;
@group(0) @binding(2) var<storage, read> v: array<${vt}>;
@group(0) @binding(3) var<storage, read> invFreq: array<f32>;
@group(0) @binding(4) var<storage, read> positions: array<i32>;
@group(0) @binding(5) var<storage, read> state: array<u32, 4>;
@group(0) @binding(6) var<storage, read_write> kc: array<${kct}>;
@group(0) @binding(7) var<storage, read_write> vc: array<${vct}>;
@group(0) @binding(8) var<storage, read_write> mask: array<i32>;
@group(0) @binding(9) var<uniform> p: P;
@compute @workgroup_size(${WG}) fn main(@builtin(global_invocation_id) g: vec3u) {
  let t = g.x + g.y * p.stride;
  if (t < p.qPairs) {
    // a query pair (i, i + D/2) of head nh % H in row nh / H, rotated in place
    let i = t % p.half;
    let nh = t / p.half;
    let base = nh * 2u * p.half;
    let angle = f32(positions[nh / p.H]) * invFreq[i];
    let c = cos(angle);
    let s = sin(angle);
    let x1 = f32(q[base + i]);
    let x2 = f32(q[base + i + p.half]);
    q[base + i] = ${qt}(x1 * c - x2 * s);
    q[base + i + p.half] = ${qt}(x2 * c + x1 * s);
    return;
  }
  let u = t - p.qPairs;
  if (u >= p.kPairs) { return; }
  // a key pair, rotated into the cache, and the value elements at the same places
  let i = u % p.half;
  let nh = u / p.half;
  let n = nh / p.Hkv; // (b, t) row of this step
  let head = nh % p.Hkv;
  let b = n / p.T;
  let j = state[0] + n % p.T; // cache position
  if (j >= p.maxLen) { return; }
  let src = nh * 2u * p.half;
  let width = p.Hkv * 2u * p.half;
  let dst = (b * p.maxLen + j) * width + head * 2u * p.half;
  let angle = f32(positions[n]) * invFreq[i];
  let c = cos(angle);
  let s = sin(angle);
  let x1 = f32(k[src + i]);
  let x2 = f32(k[src + i + p.half]);
  kc[dst + i] = ${kct}(x1 * c - x2 * s);
  kc[dst + i + p.half] = ${kct}(x2 * c + x1 * s);
  vc[dst + i] = ${vct}(f32(v[src + i]));
  vc[dst + i + p.half] = ${vct}(f32(v[src + i + p.half]));
  if (i == 0u && head == 0u) { mask[b * p.maxLen + j] = 1; }
}`,
  );
}

function advanceKernel(): Kernel {
  return defineKernel("decode_advance", {}, ["read", "write", "write", "write"], () => `
@group(0) @binding(0) var<storage, read> ids: array<i32>;
@group(0) @binding(1) var<storage, read_write> state: array<u32, 4>;
@group(0) @binding(2) var<storage, read_write> history: array<i32>;
@group(0) @binding(3) var<storage, read_write> positions: array<i32>;
@compute @workgroup_size(1) fn main() {
  let n = state[1];
  if (n < arrayLength(&history)) { history[n] = ids[0]; }
  state[1] = n + 1u;
  let pos = state[0] + 1u;
  state[0] = pos;
  positions[0] = i32(pos);
}`);
}

/** The element types of the step's k/v and of the caches (activations: f32 or f16 each). */
function kvTypes(rec: Recorder, kCache: Tensor, vCache: Tensor, k: Tensor, v: Tensor, what: string): KvTypes {
  return {
    kt: activationType(rec.gpu, k, `${what} k`),
    vt: activationType(rec.gpu, v, `${what} v`),
    kct: activationType(rec.gpu, kCache, `${what} kCache`),
    vct: activationType(rec.gpu, vCache, `${what} vCache`),
  };
}

/**
 * Records the append of this step's keys and values into the cache at the position held by the decode
 * state (`state[0]`), and sets the cache mask to 1 at the appended positions. Keys, values and the caches
 * are activations, each f32 or f16: f16 → f16 copies exactly, f32 → f16 rounds once.
 *
 * @param rec The recorder.
 * @param kCache Key cache `(B, maxLen, width)` f32 or f16.
 * @param vCache Value cache `(B, maxLen, width)` f32 or f16.
 * @param mask Cache mask `(B, maxLen)` i32.
 * @param k This step's keys `(B, T, width)` f32 or f16.
 * @param v This step's values `(B, T, width)` f32 or f16.
 * @param state Decode state u32 (4) `[pos, n, 0, 0]`.
 * @param opts `batch` B, `tokens` T, `width` Hkv*D, `maxLen` positions per batch row of the cache.
 */
export function kvCacheAppend(
  rec: Recorder,
  kCache: Tensor,
  vCache: Tensor,
  mask: Tensor,
  k: Tensor,
  v: Tensor,
  state: Tensor,
  opts: { batch: number; tokens: number; width: number; maxLen: number },
): void {
  const { batch: B, tokens: T, width, maxLen } = opts;
  const n = B * T * width;
  if (k.size < n || v.size < n) throw new GpuError(`kvCacheAppend: k/v smaller than (B, T, width)`);
  if (kCache.size < B * maxLen * width || vCache.size < B * maxLen * width) {
    throw new GpuError(`kvCacheAppend: cache smaller than (B, maxLen, width)`);
  }
  if (mask.size < B * maxLen || (mask.dtype !== "i32" && mask.dtype !== "u32")) {
    throw new GpuError(`kvCacheAppend: mask must be i32 (B, maxLen)`);
  }
  if (state.size !== 4 || state.dtype !== "u32") throw new GpuError("kvCacheAppend: state must be u32 (4)");
  const types = kvTypes(rec, kCache, vCache, k, v, "kvCacheAppend");
  const { groups, stride } = grid1d(n, WG);
  rec.dispatch(
    appendKernel(types),
    [k, v, state, kCache, vCache, mask],
    [n, width, T, maxLen, stride, 0, 0, 0],
    groups,
  );
}

/**
 * Records, for a RoPE model, the rotation of this step's queries (in place) and keys and the append of
 * the rotated keys and the values into the cache at the decode state's position (`state[0]`), with the
 * cache mask set to 1 there: {@link kvCacheAppend} and two RoPE dispatches in one. Rotations use
 * `positions[n]` of each row `n = b*T + t`, exactly as `ropeInPlace` does. q, k, v and the caches are
 * activations, each f32 or f16 (rotations are computed in f32 and rounded once at the store).
 *
 * @param rec The recorder.
 * @param kCache Key cache `(B, maxLen, Hkv*D)` f32 or f16.
 * @param vCache Value cache `(B, maxLen, Hkv*D)` f32 or f16.
 * @param mask Cache mask `(B, maxLen)` i32.
 * @param q This step's queries `(B*T, H*D)` f32 or f16, rotated in place.
 * @param k This step's keys `(B*T, Hkv*D)` f32 or f16 (left as they are).
 * @param v This step's values `(B*T, Hkv*D)` f32 or f16.
 * @param invFreq RoPE inverse frequencies `(D/2)` f32.
 * @param positions Position of every row `(B*T)` i32.
 * @param state Decode state u32 (4) `[pos, n, 0, 0]`.
 * @param opts `batch` B, `tokens` T, `numHeads` H, `numKvHeads` Hkv, `maxLen` positions per batch row.
 */
export function kvCacheAppendRope(
  rec: Recorder,
  kCache: Tensor,
  vCache: Tensor,
  mask: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  invFreq: Tensor,
  positions: Tensor,
  state: Tensor,
  opts: { batch: number; tokens: number; numHeads: number; numKvHeads: number; maxLen: number },
): void {
  const { batch: B, tokens: T, numHeads: H, numKvHeads: Hkv, maxLen } = opts;
  const half = invFreq.size;
  const N = B * T;
  const width = Hkv * 2 * half;
  if (q.size < N * H * 2 * half) throw new GpuError(`kvCacheAppendRope: q smaller than (B*T, H*D)`);
  if (k.size < N * width || v.size < N * width) {
    throw new GpuError(`kvCacheAppendRope: k/v smaller than (B*T, Hkv*D)`);
  }
  if (kCache.size < B * maxLen * width || vCache.size < B * maxLen * width) {
    throw new GpuError(`kvCacheAppendRope: cache smaller than (B, maxLen, Hkv*D)`);
  }
  if (mask.size < B * maxLen || (mask.dtype !== "i32" && mask.dtype !== "u32")) {
    throw new GpuError(`kvCacheAppendRope: mask must be i32 (B, maxLen)`);
  }
  if (positions.size < N || positions.dtype !== "i32") {
    throw new GpuError(`kvCacheAppendRope: positions must be i32 (B*T)`);
  }
  if (state.size !== 4 || state.dtype !== "u32") {
    throw new GpuError("kvCacheAppendRope: state must be u32 (4)");
  }
  if (invFreq.dtype !== "f32") {
    throw new GpuError(`kvCacheAppendRope: invFreq must be f32, got ${invFreq.dtype}`);
  }
  const qt = activationType(rec.gpu, q, "kvCacheAppendRope q");
  const types = kvTypes(rec, kCache, vCache, k, v, "kvCacheAppendRope");
  const qPairs = N * H * half, kPairs = N * Hkv * half;
  const { groups, stride } = grid1d(qPairs + kPairs, WG);
  rec.dispatch(
    appendRopeKernel(qt, types),
    [q, k, v, invFreq, positions, state, kCache, vCache, mask],
    [qPairs, kPairs, H, Hkv, half, T, maxLen, stride],
    groups,
  );
}

/**
 * Records the end of a decode step: `history[n] = ids[0]; n += 1; pos += 1; positions[0] = pos`.
 *
 * @param rec The recorder.
 * @param state Decode state u32 (4) `[pos, n, 0, 0]`.
 * @param ids The ids the sampler wrote (element 0 is read) i32.
 * @param history Token history i32 (writes past its end are dropped).
 * @param positions The next step's positions i32 (element 0 is written).
 */
export function decodeAdvance(
  rec: Recorder,
  state: Tensor,
  ids: Tensor,
  history: Tensor,
  positions: Tensor,
): void {
  if (state.size !== 4 || state.dtype !== "u32") throw new GpuError("decodeAdvance: state must be u32 (4)");
  if (ids.dtype !== "i32" || history.dtype !== "i32" || positions.dtype !== "i32") {
    throw new GpuError("decodeAdvance: ids, history and positions must be i32");
  }
  rec.dispatch(advanceKernel(), [ids, state, history, positions], null, [1]);
}
