/**
 * Float64 references of RMSNorm and LayerNorm (forward and input gradient), written as plain loops.
 *
 * @module
 */

/**
 * RMSNorm forward: `out = w * x / sqrt(mean(x²) + eps)` per row.
 *
 * @param x Input (N, C).
 * @param w Scale (C).
 * @param N Rows.
 * @param C Channels.
 * @param eps Epsilon.
 * @returns Output (N, C) and rstd (N).
 */
export function rmsnormRef(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  N: number,
  C: number,
  eps: number,
): { out: Float64Array; rstd: Float64Array } {
  const out = new Float64Array(N * C);
  const rstd = new Float64Array(N);
  for (let n = 0; n < N; n++) {
    let ss = 0;
    for (let c = 0; c < C; c++) ss += x[n * C + c]! ** 2;
    const r = 1 / Math.sqrt(ss / C + eps);
    rstd[n] = r;
    for (let c = 0; c < C; c++) out[n * C + c] = w[c]! * x[n * C + c]! * r;
  }
  return { out, rstd };
}

/**
 * RMSNorm input gradient.
 *
 * @param dout Output gradient (N, C).
 * @param x Input (N, C).
 * @param w Scale (C).
 * @param N Rows.
 * @param C Channels.
 * @param eps Epsilon.
 * @returns dx (N, C).
 */
export function rmsnormBackwardRef(
  dout: ArrayLike<number>,
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  N: number,
  C: number,
  eps: number,
): Float64Array {
  const dx = new Float64Array(N * C);
  const { rstd } = rmsnormRef(x, w, N, C, eps);
  for (let n = 0; n < N; n++) {
    const r = rstd[n]!;
    let dot = 0;
    for (let c = 0; c < C; c++) dot += dout[n * C + c]! * w[c]! * x[n * C + c]!;
    for (let c = 0; c < C; c++) {
      dx[n * C + c] = r * dout[n * C + c]! * w[c]! - x[n * C + c]! * r * r * r * dot / C;
    }
  }
  return dx;
}

/**
 * LayerNorm forward with biased variance.
 *
 * @param x Input (N, C).
 * @param w Scale (C).
 * @param b Shift (C).
 * @param N Rows.
 * @param C Channels.
 * @param eps Epsilon.
 * @returns Output (N, C), mean (N), rstd (N).
 */
export function layernormRef(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  b: ArrayLike<number>,
  N: number,
  C: number,
  eps: number,
): { out: Float64Array; mean: Float64Array; rstd: Float64Array } {
  const out = new Float64Array(N * C);
  const mean = new Float64Array(N);
  const rstd = new Float64Array(N);
  for (let n = 0; n < N; n++) {
    let s = 0;
    for (let c = 0; c < C; c++) s += x[n * C + c]!;
    const m = s / C;
    let v = 0;
    for (let c = 0; c < C; c++) v += (x[n * C + c]! - m) ** 2;
    const r = 1 / Math.sqrt(v / C + eps);
    mean[n] = m;
    rstd[n] = r;
    for (let c = 0; c < C; c++) out[n * C + c] = (x[n * C + c]! - m) * r * w[c]! + b[c]!;
  }
  return { out, mean, rstd };
}

/**
 * LayerNorm input gradient.
 *
 * @param dout Output gradient (N, C).
 * @param x Input (N, C).
 * @param w Scale (C).
 * @param N Rows.
 * @param C Channels.
 * @param eps Epsilon.
 * @returns dx (N, C).
 */
export function layernormBackwardRef(
  dout: ArrayLike<number>,
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  N: number,
  C: number,
  eps: number,
): Float64Array {
  const dx = new Float64Array(N * C);
  const { mean, rstd } = layernormRef(x, w, new Float64Array(C), N, C, eps);
  for (let n = 0; n < N; n++) {
    const m = mean[n]!;
    const r = rstd[n]!;
    let sg = 0;
    let sgx = 0;
    for (let c = 0; c < C; c++) {
      const g = dout[n * C + c]! * w[c]!;
      sg += g;
      sgx += g * (x[n * C + c]! - m) * r;
    }
    for (let c = 0; c < C; c++) {
      const g = dout[n * C + c]! * w[c]!;
      const xhat = (x[n * C + c]! - m) * r;
      dx[n * C + c] = r * (g - sg / C - xhat * sgx / C);
    }
  }
  return dx;
}

/**
 * Central finite differences of `f(x) · dout` with respect to x, in float64.
 *
 * @param f A function of x returning an output array.
 * @param x The point.
 * @param dout Weights of the outputs (the upstream gradient).
 * @param h Step.
 * @returns The numerical gradient.
 */
export function finiteDifference(
  f: (x: Float64Array) => ArrayLike<number>,
  x: ArrayLike<number>,
  dout: ArrayLike<number>,
  h = 1e-6,
): Float64Array {
  const g = new Float64Array(x.length);
  const xp = Float64Array.from(x);
  for (let i = 0; i < x.length; i++) {
    const x0 = xp[i]!;
    xp[i] = x0 + h;
    const fp = f(xp);
    xp[i] = x0 - h;
    const fm = f(xp);
    xp[i] = x0;
    let d = 0;
    for (let j = 0; j < fp.length; j++) d += (fp[j]! - fm[j]!) * dout[j]!;
    g[i] = d / (2 * h);
  }
  return g;
}
