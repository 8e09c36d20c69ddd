/**
 * Float64 references of SwiGLU and gpt2's tanh GELU, forward and gradient.
 *
 * @module
 */

const K0 = Math.sqrt(2 / Math.PI);
const K1 = 0.044715;

/**
 * `silu(gate) * up`.
 *
 * @param gate Gate values.
 * @param up Up values.
 * @returns The products.
 */
export function swigluRef(gate: ArrayLike<number>, up: ArrayLike<number>): Float64Array {
  const out = new Float64Array(gate.length);
  for (let i = 0; i < gate.length; i++) out[i] = (gate[i]! / (1 + Math.exp(-gate[i]!))) * up[i]!;
  return out;
}

/**
 * Gradients of `sum(dout * silu(gate) * up)`.
 *
 * @param dout Output gradient.
 * @param gate Gate values.
 * @param up Up values.
 * @returns dgate and dup.
 */
export function swigluBackwardRef(
  dout: ArrayLike<number>,
  gate: ArrayLike<number>,
  up: ArrayLike<number>,
): { dgate: Float64Array; dup: Float64Array } {
  const dgate = new Float64Array(gate.length);
  const dup = new Float64Array(gate.length);
  for (let i = 0; i < gate.length; i++) {
    const g = gate[i]!;
    const s = 1 / (1 + Math.exp(-g));
    dgate[i] = dout[i]! * up[i]! * (s + g * s * (1 - s));
    dup[i] = dout[i]! * g * s;
  }
  return { dgate, dup };
}

/**
 * gpt2 `gelu_new`.
 *
 * @param x Inputs.
 * @returns Outputs.
 */
export function geluRef(x: ArrayLike<number>): Float64Array {
  const out = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const v = x[i]!;
    out[i] = 0.5 * v * (1 + Math.tanh(K0 * (v + K1 * v * v * v)));
  }
  return out;
}

/**
 * Gradient of `sum(dout * gelu_new(x))`.
 *
 * @param dout Output gradient.
 * @param x Inputs.
 * @returns dx.
 */
export function geluBackwardRef(dout: ArrayLike<number>, x: ArrayLike<number>): Float64Array {
  const dx = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const v = x[i]!;
    const t = Math.tanh(K0 * (v + K1 * v * v * v));
    dx[i] = dout[i]! * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * K0 * (1 + 3 * K1 * v * v));
  }
  return dx;
}
