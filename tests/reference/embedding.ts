/**
 * Float64 CPU references for kernels/embedding.ts.
 *
 * @module
 */

/**
 * Token embedding: `out[n, :] = table[ids[n], :]`, zeros for ids outside `[0, V)`.
 *
 * @param ids Token ids, (N).
 * @param table Embedding table, (V, C).
 * @param V Vocabulary size.
 * @param C Channels.
 * @returns out, (N, C).
 */
export function embeddingForwardRef(
  ids: ArrayLike<number>,
  table: ArrayLike<number>,
  V: number,
  C: number,
): Float64Array {
  const out = new Float64Array(ids.length * C);
  for (let n = 0; n < ids.length; n++) {
    const id = ids[n]!;
    if (id < 0 || id >= V) continue;
    for (let c = 0; c < C; c++) out[n * C + c] = table[id * C + c]!;
  }
  return out;
}

/**
 * Position embedding added into a hidden state: `out[n, :] = h[n, :] + wpe[positions[n], :]`
 * (nothing added for positions outside `[0, P)`).
 *
 * @param h Hidden state, (N, C).
 * @param positions Positions, (N).
 * @param wpe Position table, (P, C).
 * @param P Table rows.
 * @param C Channels.
 * @returns The sum, (N, C).
 */
export function positionEmbeddingForwardRef(
  h: ArrayLike<number>,
  positions: ArrayLike<number>,
  wpe: ArrayLike<number>,
  P: number,
  C: number,
): Float64Array {
  const out = Float64Array.from(h);
  for (let n = 0; n < positions.length; n++) {
    const pos = positions[n]!;
    if (pos < 0 || pos >= P) continue;
    for (let c = 0; c < C; c++) out[n * C + c] = out[n * C + c]! + wpe[pos * C + c]!;
  }
  return out;
}
