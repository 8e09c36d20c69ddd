/**
 * Float64 reference of the causal-LM loss with an LM head: logits = hidden · Wᵀ, mean over counted tokens
 * (label != -100) of logsumexp - logit[label], and its gradient with respect to hidden.
 *
 * @module
 */

/**
 * Loss and d(loss)/d(hidden).
 *
 * @param hidden (N, C).
 * @param w (V, C).
 * @param labels (N), -100 ignored.
 * @param N Rows.
 * @param C Channels.
 * @param V Vocabulary.
 * @returns The mean loss (0 when nothing counts) and dHidden (N, C).
 */
export function crossEntropyRef(
  hidden: ArrayLike<number>,
  w: ArrayLike<number>,
  labels: ArrayLike<number>,
  N: number,
  C: number,
  V: number,
): { loss: number; dHidden: Float64Array } {
  const dHidden = new Float64Array(N * C);
  let count = 0;
  for (let n = 0; n < N; n++) if (labels[n] !== -100) count++;
  let total = 0;
  const logits = new Float64Array(V);
  for (let n = 0; n < N; n++) {
    const y = labels[n]!;
    if (y === -100) continue;
    let mx = -Infinity;
    for (let v = 0; v < V; v++) {
      let s = 0;
      for (let c = 0; c < C; c++) s += hidden[n * C + c]! * w[v * C + c]!;
      logits[v] = s;
      mx = Math.max(mx, s);
    }
    let z = 0;
    for (let v = 0; v < V; v++) z += Math.exp(logits[v]! - mx);
    const lse = mx + Math.log(z);
    total += lse - logits[y]!;
    for (let v = 0; v < V; v++) {
      const d = (Math.exp(logits[v]! - lse) - (v === y ? 1 : 0)) / count;
      for (let c = 0; c < C; c++) dHidden[n * C + c] = dHidden[n * C + c]! + d * w[v * C + c]!;
    }
  }
  return { loss: count > 0 ? total / count : 0, dHidden };
}
