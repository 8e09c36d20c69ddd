/**
 * Float64 CPU reference of masked multi-head attention with grouped-query heads (the specification the
 * GPU kernels in `kernels/attention.ts` are tested against): plain loops, no tiling, no online softmax.
 * Rows whose keys are all hidden give `out = 0`, `lse = 0` and zero gradients, as the kernels document.
 *
 * @module
 */

/** Sizes and masking, as in `AttentionOptions` of the kernels. */
export interface RefAttentionOptions {
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  batch: number;
  queryLen: number;
  keyLen: number;
  kvStride?: number;
  scale: number;
  causal: boolean;
  queryOffset?: number;
  slidingWindow?: number | null;
}

type Arr = ArrayLike<number>;

function sizes(o: RefAttentionOptions) {
  const kvStride = o.kvStride ?? o.keyLen;
  return {
    B: o.batch,
    T: o.queryLen,
    S: o.keyLen,
    H: o.numHeads,
    Hkv: o.numKvHeads,
    D: o.headDim,
    kvStride,
    qOff: o.queryOffset ?? o.keyLen - o.queryLen,
    window: o.slidingWindow ?? 0,
  };
}

/** Whether key j is visible to query position i in batch row b. */
function visible(o: RefAttentionOptions, mask: Arr | null, b: number, i: number, j: number): boolean {
  const z = sizes(o);
  if (o.causal && j > i) return false;
  if (z.window > 0 && i - j >= z.window) return false;
  if (mask && mask[b * z.kvStride + j] === 0) return false;
  return true;
}

/** Probabilities of one (b, h, t) row over the S keys (all zero when every key is hidden) and its lse. */
function rowProbs(
  q: Arr,
  k: Arr,
  mask: Arr | null,
  o: RefAttentionOptions,
  b: number,
  t: number,
  h: number,
): { p: Float64Array; lse: number } {
  const z = sizes(o);
  const kvh = Math.floor(h / (z.H / z.Hkv));
  const s = new Float64Array(z.S).fill(-Infinity);
  let mx = -Infinity;
  for (let j = 0; j < z.S; j++) {
    if (!visible(o, mask, b, z.qOff + t, j)) continue;
    let dot = 0;
    for (let d = 0; d < z.D; d++) {
      dot += q[((b * z.T + t) * z.H + h) * z.D + d]! * k[((b * z.kvStride + j) * z.Hkv + kvh) * z.D + d]!;
    }
    s[j] = dot * o.scale;
    mx = Math.max(mx, s[j]!);
  }
  const p = new Float64Array(z.S);
  if (mx === -Infinity) return { p, lse: 0 };
  let sum = 0;
  for (let j = 0; j < z.S; j++) sum += p[j] = s[j] === -Infinity ? 0 : Math.exp(s[j]! - mx);
  for (let j = 0; j < z.S; j++) p[j]! /= sum;
  return { p, lse: mx + Math.log(sum) };
}

/**
 * Attention forward in float64.
 *
 * @param q Queries (B, T, H, D).
 * @param k Keys (B, kvStride, Hkv, D).
 * @param v Values (B, kvStride, Hkv, D).
 * @param mask HF attention mask (B, kvStride) or null.
 * @param o Options.
 * @returns out (B, T, H, D) and lse (B, H, T).
 */
export function attentionForwardRef(
  q: Arr,
  k: Arr,
  v: Arr,
  mask: Arr | null,
  o: RefAttentionOptions,
): { out: Float64Array; lse: Float64Array } {
  const z = sizes(o);
  const out = new Float64Array(z.B * z.T * z.H * z.D);
  const lse = new Float64Array(z.B * z.H * z.T);
  for (let b = 0; b < z.B; b++) {
    for (let t = 0; t < z.T; t++) {
      for (let h = 0; h < z.H; h++) {
        const kvh = Math.floor(h / (z.H / z.Hkv));
        const r = rowProbs(q, k, mask, o, b, t, h);
        lse[(b * z.H + h) * z.T + t] = r.lse;
        for (let j = 0; j < z.S; j++) {
          if (r.p[j] === 0) continue;
          for (let d = 0; d < z.D; d++) {
            out[((b * z.T + t) * z.H + h) * z.D + d]! += r.p[j]! *
              v[((b * z.kvStride + j) * z.Hkv + kvh) * z.D + d]!;
          }
        }
      }
    }
  }
  return { out, lse };
}

/**
 * Attention backward in float64 (straight from the softmax Jacobian, not the FlashAttention recurrence).
 *
 * @param dout Gradient of out (B, T, H, D).
 * @param q Queries.
 * @param k Keys.
 * @param v Values.
 * @param mask Mask or null.
 * @param o Options.
 * @returns dq (B, T, H, D), dk and dv (B, kvStride, Hkv, D) (positions ≥ keyLen are zero).
 */
export function attentionBackwardRef(
  dout: Arr,
  q: Arr,
  k: Arr,
  v: Arr,
  mask: Arr | null,
  o: RefAttentionOptions,
): { dq: Float64Array; dk: Float64Array; dv: Float64Array } {
  const z = sizes(o);
  const dq = new Float64Array(z.B * z.T * z.H * z.D);
  const dk = new Float64Array(z.B * z.kvStride * z.Hkv * z.D);
  const dv = new Float64Array(dk.length);
  for (let b = 0; b < z.B; b++) {
    for (let t = 0; t < z.T; t++) {
      for (let h = 0; h < z.H; h++) {
        const kvh = Math.floor(h / (z.H / z.Hkv));
        const { p } = rowProbs(q, k, mask, o, b, t, h);
        const qi = ((b * z.T + t) * z.H + h) * z.D;
        const dp = new Float64Array(z.S);
        let pdp = 0;
        for (let j = 0; j < z.S; j++) {
          if (p[j] === 0) continue;
          const kj = ((b * z.kvStride + j) * z.Hkv + kvh) * z.D;
          for (let d = 0; d < z.D; d++) {
            dv[kj + d]! += p[j]! * dout[qi + d]!;
            dp[j]! += dout[qi + d]! * v[kj + d]!;
          }
          pdp += p[j]! * dp[j]!;
        }
        for (let j = 0; j < z.S; j++) {
          if (p[j] === 0) continue;
          const ds = p[j]! * (dp[j]! - pdp) * o.scale;
          const kj = ((b * z.kvStride + j) * z.Hkv + kvh) * z.D;
          for (let d = 0; d < z.D; d++) {
            dq[qi + d]! += ds * k[kj + d]!;
            dk[kj + d]! += ds * q[qi + d]!;
          }
        }
      }
    }
  }
  return { dq, dk, dv };
}
