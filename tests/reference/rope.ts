/**
 * Float64 reference of rotary embeddings (HF `rotate_half`). The angle is formed as HF forms it — the f32
 * product of the f32 position and the f32 inverse frequency — and everything after it is float64.
 *
 * @module
 */

/**
 * HF's inverse frequencies `1 / base^(2i/D)`, rounded to f32 (HF computes them in float32).
 *
 * @param D Head size.
 * @param base RoPE theta.
 * @returns invFreq (D/2) as f32.
 */
export function invFreqRef(D: number, base: number): Float32Array {
  const f = new Float32Array(D / 2);
  for (let i = 0; i < D / 2; i++) f[i] = 1 / Math.pow(base, (2 * i) / D);
  return f;
}

/**
 * Rotates x (N, H*D) per head by θ = f32(pos * invFreq[i]); `sign` -1 gives the transpose (backward).
 *
 * @param x Input (N, H*D).
 * @param invFreq (D/2).
 * @param positions (N).
 * @param H Heads.
 * @param sign +1 forward, -1 backward.
 * @returns The rotated values.
 */
export function ropeRef(
  x: ArrayLike<number>,
  invFreq: ArrayLike<number>,
  positions: ArrayLike<number>,
  H: number,
  sign = 1,
): Float64Array {
  const half = invFreq.length;
  const D = 2 * half;
  const N = positions.length;
  const out = new Float64Array(N * H * D);
  for (let n = 0; n < N; n++) {
    for (let h = 0; h < H; h++) {
      const base = (n * H + h) * D;
      for (let i = 0; i < half; i++) {
        const angle = Math.fround(Math.fround(positions[n]!) * invFreq[i]!);
        const c = Math.cos(angle);
        const s = sign * Math.sin(angle);
        const x1 = x[base + i]!, x2 = x[base + i + half]!;
        out[base + i] = x1 * c - x2 * s;
        out[base + i + half] = x2 * c + x1 * s;
      }
    }
  }
  return out;
}
