/**
 * Float64 references for sampling: argmax with torch's tie rule, softmax with temperature, and HF's
 * top-p rule (a token is kept when the probability mass of the tokens ranked above it is below topP).
 *
 * @module
 */

/**
 * Index of the largest value, the lowest index among ties.
 *
 * @param x Values.
 * @returns The index.
 */
export function argmaxRef(x: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[best]!) best = i;
  return best;
}

/**
 * Sampling distribution after temperature and top-p: kept tokens renormalised, others 0.
 *
 * @param logits Logits (V).
 * @param temperature Temperature (> 0).
 * @param topP Nucleus mass in (0, 1].
 * @returns Probabilities (V).
 */
export function samplingDistributionRef(
  logits: ArrayLike<number>,
  temperature: number,
  topP: number,
): Float64Array {
  const V = logits.length;
  const s = Array.from(logits, (x) => x / temperature);
  const mx = Math.max(...s);
  const p = new Float64Array(V);
  let z = 0;
  for (let i = 0; i < V; i++) z += p[i] = Math.exp(s[i]! - mx);
  for (let i = 0; i < V; i++) p[i] = p[i]! / z;
  const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => p[b]! - p[a]! || a - b);
  const kept = new Float64Array(V);
  let above = 0;
  let mass = 0;
  for (const i of order) {
    if (above < topP) {
      kept[i] = p[i]!;
      mass += p[i]!;
    }
    above += p[i]!;
  }
  for (let i = 0; i < V; i++) kept[i] = kept[i]! / mass;
  return kept;
}
