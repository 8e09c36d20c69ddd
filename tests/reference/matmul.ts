/**
 * Float64 CPU references for kernels/matmul.ts: plain loops, written for clarity, not speed.
 *
 * @module
 */

/**
 * HF Linear forward: `out[m, n] = sum_k x[m, k] w[n, k] + bias[n]`.
 *
 * @param x Input, (M, K).
 * @param w Weight, (N, K).
 * @param bias Bias, (N), or null.
 * @param M Rows.
 * @param N Output columns.
 * @param K Input columns.
 * @returns out, (M, N).
 */
export function linearForwardRef(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  bias: ArrayLike<number> | null,
  M: number,
  N: number,
  K: number,
): Float64Array {
  const out = new Float64Array(M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let s = bias ? bias[n]! : 0;
      for (let k = 0; k < K; k++) s += x[m * K + k]! * w[n * K + k]!;
      out[m * N + n] = s;
    }
  }
  return out;
}

/**
 * HF Linear input gradient: `dx[m, k] = sum_n dy[m, n] w[n, k]`.
 *
 * @param dy Output gradient, (M, N).
 * @param w Weight, (N, K).
 * @param M Rows.
 * @param N Output columns.
 * @param K Input columns.
 * @returns dx, (M, K).
 */
export function linearBackwardInputRef(
  dy: ArrayLike<number>,
  w: ArrayLike<number>,
  M: number,
  N: number,
  K: number,
): Float64Array {
  const dx = new Float64Array(M * K);
  for (let m = 0; m < M; m++) {
    for (let k = 0; k < K; k++) {
      let s = 0;
      for (let n = 0; n < N; n++) s += dy[m * N + n]! * w[n * K + k]!;
      dx[m * K + k] = s;
    }
  }
  return dx;
}

/**
 * Transposes a row-major (R, C) matrix.
 *
 * @param a The matrix.
 * @param R Rows.
 * @param C Columns.
 * @returns The (C, R) transpose.
 */
export function transpose(a: ArrayLike<number>, R: number, C: number): Float64Array {
  const t = new Float64Array(R * C);
  for (let r = 0; r < R; r++) for (let c = 0; c < C; c++) t[c * R + r] = a[r * C + c]!;
  return t;
}

/**
 * gpt2 Conv1D forward: `out = x w + bias` with w (K, N).
 *
 * @param x Input, (M, K).
 * @param w Weight, (K, N).
 * @param bias Bias, (N), or null.
 * @param M Rows.
 * @param N Output columns.
 * @param K Input columns.
 * @returns out, (M, N).
 */
export function conv1dForwardRef(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  bias: ArrayLike<number> | null,
  M: number,
  N: number,
  K: number,
): Float64Array {
  return linearForwardRef(x, transpose(w, K, N), bias, M, N, K);
}

/**
 * gpt2 Conv1D input gradient: `dx = dy wᵀ` with w (K, N).
 *
 * @param dy Output gradient, (M, N).
 * @param w Weight, (K, N).
 * @param M Rows.
 * @param N Output columns.
 * @param K Input columns.
 * @returns dx, (M, K).
 */
export function conv1dBackwardInputRef(
  dy: ArrayLike<number>,
  w: ArrayLike<number>,
  M: number,
  N: number,
  K: number,
): Float64Array {
  return linearBackwardInputRef(dy, transpose(w, K, N), M, N, K);
}
