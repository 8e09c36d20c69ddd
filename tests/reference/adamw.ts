/**
 * Float64 reference of torch.optim.AdamW (single-tensor) and of clip_grad_norm_'s scaling.
 *
 * @module
 */

/** AdamW hyperparameters (use the f32-rounded values the GPU sees). */
export interface AdamwHyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  maxGradNorm: number;
}

/**
 * One AdamW step in place, in torch's order of operations, with optional gradient clipping.
 *
 * @param p Parameters (updated).
 * @param g Gradient.
 * @param m First moment (updated).
 * @param v Second moment (updated).
 * @param h Hyperparameters.
 * @param step Step number, from 1.
 */
export function adamwStepRef(
  p: Float64Array,
  g: ArrayLike<number>,
  m: Float64Array,
  v: Float64Array,
  h: AdamwHyper,
  step: number,
): void {
  let coef = 1;
  if (h.maxGradNorm > 0) {
    let ss = 0;
    for (let i = 0; i < g.length; i++) ss += g[i]! ** 2;
    coef = Math.min(1, h.maxGradNorm / (Math.sqrt(ss) + 1e-6));
  }
  const bc1 = 1 - h.beta1 ** step;
  const bc2 = 1 - h.beta2 ** step;
  const stepSize = h.lr / bc1;
  for (let i = 0; i < p.length; i++) {
    const gi = g[i]! * coef;
    p[i] = p[i]! * (1 - h.lr * h.weightDecay);
    m[i] = m[i]! + (1 - h.beta1) * (gi - m[i]!);
    v[i] = v[i]! * h.beta2 + (1 - h.beta2) * gi * gi;
    const denom = Math.sqrt(v[i]!) / Math.sqrt(bc2) + h.eps;
    p[i] = p[i]! - stepSize * m[i]! / denom;
  }
}
