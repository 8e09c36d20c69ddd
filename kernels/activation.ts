/**
 * Elementwise ops: SwiGLU (LLaMA's `silu(gate) * up`), gpt2's tanh GELU (`gelu_new`), and the small
 * accumulations a residual network and a trainer need (`acc += x`, `acc += scale * x`, a bias added to
 * every row). One thread per element, dispatches folded into y past 65535 workgroups. Arithmetic is f32;
 * activations (the forwards' inputs and outputs, the backwards' saved inputs, `addInto`'s and
 * `addBiasRows`' operands) may be stored in f16, each tensor independently, loaded into f32 and rounded
 * once at the store. Gradients, biases and `scaleInto`'s operands are f32.
 *
 * @module
 */

import {
  type ActivationType,
  activationType,
  defineKernel,
  enableF16,
  type Kernel,
} from "../src/gpu/kernel.ts";
import { f32, type Recorder } from "../src/gpu/recorder.ts";
import type { Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";
import { grid1d } from "./fill.ts";

const WG = 256;

/** gelu_new's tanh argument is clamped: some drivers compute tanh through exp and give NaN past ~44. */
const GELU = `
const K0: f32 = 0.7978845608028654;
const K1: f32 = 0.044715;
fn tanhClamped(u: f32) -> f32 { return tanh(clamp(u, -15.0, 15.0)); }`;

/**
 * WGSL `geluGrad(x)`: the derivative of gelu_new at x, `0.5 (1 + t) + 0.5 x (1 - t²) √(2/π) (1 + 3·0.044715
 * x²)` with `t = tanh(√(2/π) (x + 0.044715 x³))` (also the epilogue of a product, kernels/matmul.ts).
 */
export const GELU_GRAD_WGSL = `${GELU}
fn geluGrad(v: f32) -> f32 {
  let t = tanhClamped(K0 * (v + K1 * v * v * v));
  return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * K0 * (1.0 + 3.0 * K1 * v * v);
}`;

/**
 * WGSL `swigluGrads(d, g, u)`: the gradients `(d gate, d up)` of `silu(g) * u` given its gradient d (also
 * the epilogue of a product, kernels/matmul.ts).
 */
export const SWIGLU_GRADS_WGSL = `
fn swigluGrads(d: f32, x: f32, u: f32) -> vec2<f32> {
  let s = 1.0 / (1.0 + exp(-x));
  return vec2<f32>(d * u * s * (1.0 + x * (1.0 - s)), d * x * s);
}`;

/** `types`: the element type of each activation binding (the kernel's options, so also its cache key). */
function elementwise(
  name: string,
  types: Record<string, ActivationType>,
  bindings: readonly ("read" | "write")[],
  decl: string,
  body: string,
): Kernel {
  return defineKernel(name, types, [...bindings, "uniform"], () => `
${enableF16(...Object.values(types))}
struct P { n: u32, stride: u32, a: u32, b: f32 }
${decl}
@group(0) @binding(${bindings.length}) var<uniform> p: P;
@compute @workgroup_size(${WG}) fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.x + g.y * p.stride;
  if (i >= p.n) { return; }
  ${body}
}`);
}

function sameSize(what: string, ...ts: Tensor[]): number {
  const n = ts[0]!.size;
  for (const t of ts) {
    if (t.size !== n) {
      throw new GpuError(`${what}: ${t.label} [${t.shape}] differs in size from [${ts[0]!.shape}]`);
    }
  }
  return n;
}

function run(rec: Recorder, kernel: Kernel, tensors: Tensor[], n: number, a = 0, b = 0): void {
  const { groups, stride } = grid1d(n, WG);
  rec.dispatch(kernel, tensors, [n, stride, a, f32(b)], groups);
}

/**
 * Records SwiGLU forward: `out = silu(gate) * up`, `silu(g) = g / (1 + exp(-g))`.
 *
 * @param rec The recorder.
 * @param out Output (N, I) f32 or f16.
 * @param gate Gate projection (N, I) f32 or f16.
 * @param up Up projection (N, I) f32 or f16.
 */
export function swigluForward(rec: Recorder, out: Tensor, gate: Tensor, up: Tensor): void {
  // out, gate, up: (N, I)
  const n = sameSize("swigluForward", out, gate, up);
  const gt = activationType(rec.gpu, gate, "swigluForward gate");
  const ut = activationType(rec.gpu, up, "swigluForward up");
  const ot = activationType(rec.gpu, out, "swigluForward out");
  const k = elementwise(
    "swiglu_forward",
    { gt, ut, ot },
    ["read", "read", "write"],
    `@group(0) @binding(0) var<storage, read> gate: array<${gt}>;
@group(0) @binding(1) var<storage, read> up: array<${ut}>;
@group(0) @binding(2) var<storage, read_write> out: array<${ot}>;`,
    `let x = f32(gate[i]);
  out[i] = ${ot}(x / (1.0 + exp(-x)) * f32(up[i]));`,
  );
  run(rec, k, [gate, up, out], n);
}

/**
 * Records SwiGLU backward: `dgate = dout * up * σ(g) * (1 + g (1 - σ(g)))`, `dup = dout * silu(g)`.
 * Both gradients are overwritten.
 *
 * @param rec The recorder.
 * @param dgate Gradient of the gate (N, I) f32.
 * @param dup Gradient of the up projection (N, I) f32.
 * @param dout Gradient of the output (N, I) f32.
 * @param gate Gate projection (N, I) f32 or f16 (a saved activation).
 * @param up Up projection (N, I) f32 or f16 (a saved activation).
 */
export function swigluBackward(
  rec: Recorder,
  dgate: Tensor,
  dup: Tensor,
  dout: Tensor,
  gate: Tensor,
  up: Tensor,
): void {
  // dgate, dup, dout, gate, up: (N, I)
  const n = sameSize("swigluBackward", dgate, dup, dout, gate, up);
  const gt = activationType(rec.gpu, gate, "swigluBackward gate");
  const ut = activationType(rec.gpu, up, "swigluBackward up");
  const k = elementwise(
    "swiglu_backward",
    { gt, ut },
    ["read", "read", "read", "write", "write"],
    `@group(0) @binding(0) var<storage, read> dout: array<f32>;
@group(0) @binding(1) var<storage, read> gate: array<${gt}>;
@group(0) @binding(2) var<storage, read> up: array<${ut}>;
@group(0) @binding(3) var<storage, read_write> dgate: array<f32>;
@group(0) @binding(4) var<storage, read_write> dup: array<f32>;
${SWIGLU_GRADS_WGSL}`,
    `let r = swigluGrads(dout[i], f32(gate[i]), f32(up[i]));
  dgate[i] = r.x;
  dup[i] = r.y;`,
  );
  run(rec, k, [dout, gate, up, dgate, dup], n);
}

/**
 * Records gpt2's GELU (`gelu_new`): `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
 *
 * @param rec The recorder.
 * @param out Output (N, I) f32 or f16.
 * @param x Input (N, I) f32 or f16.
 */
export function geluForward(rec: Recorder, out: Tensor, x: Tensor): void {
  // out, x: (N, I)
  const n = sameSize("geluForward", out, x);
  const xt = activationType(rec.gpu, x, "geluForward x");
  const ot = activationType(rec.gpu, out, "geluForward out");
  const k = elementwise(
    "gelu_forward",
    { xt, ot },
    ["read", "write"],
    `@group(0) @binding(0) var<storage, read> x: array<${xt}>;
@group(0) @binding(1) var<storage, read_write> out: array<${ot}>;
${GELU}`,
    `let v = f32(x[i]);
  out[i] = ${ot}(0.5 * v * (1.0 + tanhClamped(K0 * (v + K1 * v * v * v))));`,
  );
  run(rec, k, [x, out], n);
}

/**
 * Records the GELU backward: `dx = dout * (0.5 (1 + t) + 0.5 x (1 - t²) √(2/π) (1 + 3·0.044715 x²))`.
 *
 * @param rec The recorder.
 * @param dx Gradient of the input (N, I) f32: overwritten, or added into with `accumulate`.
 * @param dout Gradient of the output (N, I) f32.
 * @param x The forward's input (N, I) f32 or f16 (a saved activation).
 * @param opts `accumulate`: add into `dx` instead of overwriting it.
 */
export function geluBackward(
  rec: Recorder,
  dx: Tensor,
  dout: Tensor,
  x: Tensor,
  opts: { accumulate?: boolean } = {},
): void {
  // dx, dout, x: (N, I)
  const n = sameSize("geluBackward", dx, dout, x);
  const xt = activationType(rec.gpu, x, "geluBackward x");
  const k = elementwise(
    "gelu_backward",
    { xt },
    ["read", "read", "write"],
    `@group(0) @binding(0) var<storage, read> dout: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<${xt}>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;
${GELU_GRAD_WGSL}`,
    `var r = dout[i] * geluGrad(f32(x[i]));
  if (p.a != 0u) { r += dx[i]; }
  dx[i] = r;`,
  );
  run(rec, k, [dout, x, dx], n, opts.accumulate ? 1 : 0);
}

/**
 * Records `acc += x` (residual connections, gradient sums). The sum is f32, rounded once into an f16 `acc`.
 *
 * @param rec The recorder.
 * @param acc Accumulator (any shape) f32 or f16 (f16: residual streams, attention outputs).
 * @param x Addend, same size, f32 or f16 (independently of `acc`).
 */
export function addInto(rec: Recorder, acc: Tensor, x: Tensor): void {
  const n = sameSize("addInto", acc, x);
  const at = activationType(rec.gpu, acc, "addInto acc");
  const xt = activationType(rec.gpu, x, "addInto x");
  const k = elementwise(
    "add_into",
    { at, xt },
    ["read", "write"],
    `@group(0) @binding(0) var<storage, read> x: array<${xt}>;
@group(0) @binding(1) var<storage, read_write> acc: array<${at}>;`,
    `acc[i] = ${at}(f32(acc[i]) + f32(x[i]));`,
  );
  run(rec, k, [x, acc], n);
}

/**
 * Records `out[n, c] += bias[c]` for every row n (C = bias size).
 *
 * @param rec The recorder.
 * @param out Rows (N, C) f32 or f16, updated in place (f16: rounded once after the f32 sum).
 * @param bias Bias (C) f32.
 */
export function addBiasRows(rec: Recorder, out: Tensor, bias: Tensor): void {
  // out: (N, C); bias: (C)
  const C = bias.size;
  if (C === 0 || out.size % C !== 0) {
    throw new GpuError(`addBiasRows: ${out.label} [${out.shape}] is not whole rows of ${C} channels`);
  }
  const ot = activationType(rec.gpu, out, "addBiasRows out");
  const k = elementwise(
    "add_bias_rows",
    { ot },
    ["read", "write"],
    `@group(0) @binding(0) var<storage, read> bias: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<${ot}>;`,
    `out[i] = ${ot}(f32(out[i]) + bias[i % p.a]);`,
  );
  run(rec, k, [bias, out], out.size, C);
}

/**
 * Records `acc += scale * x` (an axpy: e.g. summing micro-batch gradients with a 1/steps weight). Gradients
 * are f32, so both tensors must be.
 *
 * @param rec The recorder.
 * @param acc Accumulator (any shape) f32.
 * @param x Addend, same size, f32.
 * @param scale The factor applied to x (rounded to f32).
 */
export function scaleInto(rec: Recorder, acc: Tensor, x: Tensor, scale: number): void {
  const n = sameSize("scaleInto", acc, x);
  for (const t of [acc, x]) {
    if (t.dtype !== "f32") {
      throw new GpuError(`scaleInto: ${t.label} must be f32 (gradients), got ${t.dtype}`);
    }
  }
  const k = elementwise(
    "scale_into",
    {},
    ["read", "write"],
    `@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> acc: array<f32>;`,
    `acc[i] = acc[i] + p.b * x[i];`,
  );
  run(rec, k, [x, acc], n, 0, scale);
}
