/**
 * Float64 CPU reference of the LLaMA-Adapter adaption-prompt attention (PEFT AdaptedAttention): each
 * query row attends to the L adapter tokens of its key/value head, softmax over those only, times a gate
 * (scalar, per head, or tanh of a per-head parameter). Plain loops; the specification of
 * `kernels/adapter_attention.ts`.
 *
 * @module
 */

/** Gate forms, as in the kernel. */
export type RefGateKind = "scalar" | "per-head" | "per-head-tanh";

/** Sizes, as in `AdapterAttentionOptions`. */
export interface RefAdapterOptions {
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  adapterLen: number;
  rows: number;
  scale: number;
  gateKind: RefGateKind;
}

type Arr = ArrayLike<number>;

function gateOf(gate: Arr, o: RefAdapterOptions, h: number): number {
  if (o.gateKind === "scalar") return gate[0]!;
  if (o.gateKind === "per-head") return gate[h]!;
  return Math.tanh(gate[h]!);
}

function probs(q: Arr, ka: Arr, o: RefAdapterOptions, n: number, h: number): Float64Array {
  const { numHeads: H, numKvHeads: Hkv, headDim: D, adapterLen: L } = o;
  const kvh = Math.floor(h / (H / Hkv));
  const s = new Float64Array(L);
  for (let j = 0; j < L; j++) {
    let dot = 0;
    for (let d = 0; d < D; d++) dot += q[(n * H + h) * D + d]! * ka[(j * Hkv + kvh) * D + d]!;
    s[j] = dot * o.scale;
  }
  const mx = Math.max(...s);
  let sum = 0;
  for (let j = 0; j < L; j++) sum += s[j] = Math.exp(s[j]! - mx);
  return s.map((x) => x / sum);
}

/**
 * Adapter attention output (what the kernel adds into `out`).
 *
 * @param q Queries (N, H, D).
 * @param ka Adapter keys (L, Hkv, D).
 * @param va Adapter values (L, Hkv, D).
 * @param gate Gate (1) or (H).
 * @param o Options.
 * @returns (N, H, D).
 */
export function adapterAttentionForwardRef(
  q: Arr,
  ka: Arr,
  va: Arr,
  gate: Arr,
  o: RefAdapterOptions,
): Float64Array {
  const { numHeads: H, numKvHeads: Hkv, headDim: D, adapterLen: L, rows: N } = o;
  const out = new Float64Array(N * H * D);
  for (let n = 0; n < N; n++) {
    for (let h = 0; h < H; h++) {
      const kvh = Math.floor(h / (H / Hkv));
      const p = probs(q, ka, o, n, h);
      const g = gateOf(gate, o, h);
      for (let j = 0; j < L; j++) {
        for (let d = 0; d < D; d++) out[(n * H + h) * D + d]! += g * p[j]! * va[(j * Hkv + kvh) * D + d]!;
      }
    }
  }
  return out;
}

/**
 * Gradients of `sum(out * dout)`.
 *
 * @param dout Gradient of out (N, H, D).
 * @param q Queries.
 * @param ka Adapter keys.
 * @param va Adapter values.
 * @param gate Gate.
 * @param o Options.
 * @returns dq (N, H, D), dka and dva (L, Hkv, D), dgate (1) or (H) (w.r.t. the gate parameter).
 */
export function adapterAttentionBackwardRef(
  dout: Arr,
  q: Arr,
  ka: Arr,
  va: Arr,
  gate: Arr,
  o: RefAdapterOptions,
): { dq: Float64Array; dka: Float64Array; dva: Float64Array; dgate: Float64Array } {
  const { numHeads: H, numKvHeads: Hkv, headDim: D, adapterLen: L, rows: N } = o;
  const dq = new Float64Array(N * H * D);
  const dka = new Float64Array(Hkv * L * D);
  const dva = new Float64Array(Hkv * L * D);
  const dgate = new Float64Array(o.gateKind === "scalar" ? 1 : H);
  for (let n = 0; n < N; n++) {
    for (let h = 0; h < H; h++) {
      const kvh = Math.floor(h / (H / Hkv));
      const p = probs(q, ka, o, n, h);
      const g = gateOf(gate, o, h);
      const row = (n * H + h) * D;
      // a_j = dout · va_j; d out / d g = Σ_j p_j va_j
      const a = new Float64Array(L);
      let pa = 0;
      for (let j = 0; j < L; j++) {
        for (let d = 0; d < D; d++) a[j]! += dout[row + d]! * va[(j * Hkv + kvh) * D + d]!;
        pa += p[j]! * a[j]!;
      }
      const dgdw = o.gateKind === "per-head-tanh" ? 1 - g * g : 1;
      dgate[o.gateKind === "scalar" ? 0 : h]! += pa * dgdw;
      for (let j = 0; j < L; j++) {
        const ds = g * p[j]! * (a[j]! - pa) * o.scale;
        for (let d = 0; d < D; d++) {
          const kj = (j * Hkv + kvh) * D + d;
          dva[kj]! += g * p[j]! * dout[row + d]!;
          dq[row + d]! += ds * ka[kj]!;
          dka[kj]! += ds * q[row + d]!;
        }
      }
    }
  }
  return { dq, dka, dva, dgate };
}
