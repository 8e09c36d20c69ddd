/**
 * The AdamW optimizer step and the squared gradient norm for clipping, over ONE flat f32 buffer each of
 * parameters, gradients and moments (all trainable tensors concatenated). The formulas follow
 * `torch.optim.AdamW` (single-tensor, non-foreach) in its order of operations:
 * `p *= 1 - lr*wd; m = lerp(m, g, 1 - β1); v = β2 v + (1 - β2) g²;
 * p += -(lr / (1 - β1^t)) * m / (sqrt(v) / sqrt(1 - β2^t) + eps)`, with the bias corrections computed in
 * f32 on the GPU from the step. Hyperparameters live in a small storage tensor the caller updates with
 * `queue.writeBuffer` each step, so the recorded step replays without new uniforms. Clipping follows
 * `torch.nn.utils.clip_grad_norm_`: `g *= min(1, maxNorm / (‖g‖ + 1e-6))`.
 *
 * @module
 */

import { defineKernel, type Kernel } from "../src/gpu/kernel.ts";
import type { Recorder } from "../src/gpu/recorder.ts";
import { createTensor, type Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";
import { grid1d } from "./fill.ts";

const WG = 256;
/** Most partial sums of the norm's first level (the second level is one workgroup). */
const MAX_PARTIALS = 1024;

/** Index of each value in the `hyper` tensor. */
export const HYPER = {
  lr: 0,
  beta1: 1,
  beta2: 2,
  eps: 3,
  weightDecay: 4,
  step: 5,
  maxGradNorm: 6,
} as const;

/**
 * Packs the 8 values of the `hyper` tensor: `[lr, beta1, beta2, eps, weightDecay, step, maxGradNorm, 0]`.
 *
 * @param h The hyperparameters; `step` counts from 1; `maxGradNorm` 0 disables clipping.
 * @returns The values to write into `hyper`.
 */
export function packHyper(
  h: {
    lr: number;
    beta1: number;
    beta2: number;
    eps: number;
    weightDecay: number;
    step: number;
    maxGradNorm: number;
  },
): Float32Array {
  return new Float32Array([h.lr, h.beta1, h.beta2, h.eps, h.weightDecay, h.step, h.maxGradNorm, 0]);
}

function adamwKernel(): Kernel {
  return defineKernel(
    "adamw_step",
    {},
    ["write", "read", "write", "write", "read", "read", "uniform"],
    () => `
struct P { n: u32, stride: u32, hasNorm: u32, _p: u32 }
@group(0) @binding(0) var<storage, read_write> param: array<f32>;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> m: array<f32>;
@group(0) @binding(3) var<storage, read_write> v: array<f32>;
@group(0) @binding(4) var<storage, read> hyper: array<f32, 8>;
@group(0) @binding(5) var<storage, read> normSq: array<f32>;
@group(0) @binding(6) var<uniform> p: P;

// b^t by squaring: about 2 log2(t) f32 roundings, far better than pow's exp2(t * log2(b)) near b = 1
fn powSteps(b: f32, t: u32) -> f32 {
  var r = 1.0;
  var base = b;
  var e = t;
  for (var k = 0u; k < 32u; k++) {
    if ((e & 1u) != 0u) { r *= base; }
    e = e >> 1u;
    if (e == 0u) { break; }
    base *= base;
  }
  return r;
}

@compute @workgroup_size(${WG}) fn main(@builtin(global_invocation_id) gid: vec3u) {
  let i = gid.x + gid.y * p.stride;
  if (i >= p.n) { return; }
  let lr = hyper[0];
  let beta1 = hyper[1];
  let beta2 = hyper[2];
  let eps = hyper[3];
  let wd = hyper[4];
  let step = u32(hyper[5]);
  let maxNorm = hyper[6];
  var g = grad[i];
  if (p.hasNorm != 0u && maxNorm > 0.0) {
    let coef = maxNorm / (sqrt(normSq[0]) + 1e-6);
    g = g * min(coef, 1.0);
  }
  var x = param[i] * (1.0 - lr * wd);
  // torch's lerp: a + w (b - a) for w < 0.5, else b - (b - a)(1 - w)
  let w = 1.0 - beta1;
  let m0 = m[i];
  var m1: f32;
  if (w < 0.5) { m1 = m0 + w * (g - m0); } else { m1 = g - (g - m0) * (1.0 - w); }
  let v1 = v[i] * beta2 + (1.0 - beta2) * (g * g);
  let bc1 = 1.0 - powSteps(beta1, step);
  let bc2 = 1.0 - powSteps(beta2, step);
  let stepSize = lr / bc1;
  let denom = sqrt(v1) / sqrt(bc2) + eps;
  x = x + (-stepSize) * (m1 / denom);
  m[i] = m1;
  v[i] = v1;
  param[i] = x;
}`,
  );
}

function normPartialKernel(): Kernel {
  return defineKernel("grad_norm_partial", {}, ["read", "write", "uniform"], () => `
struct P { n: u32, block: u32, groups: u32, _p: u32 }
@group(0) @binding(0) var<storage, read> grad: array<f32>;
@group(0) @binding(1) var<storage, read_write> partial: array<f32>;
@group(0) @binding(2) var<uniform> p: P;
var<workgroup> red: array<f32, ${WG}>;
@compute @workgroup_size(${WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) l: vec3u) {
  let lid = l.x;
  let start = wid.x * p.block;
  let end = min(start + p.block, p.n);
  var acc = 0.0;
  for (var i = start + lid; i < end; i += ${WG}u) { let x = grad[i]; acc += x * x; }
  red[lid] = acc;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { red[lid] += red[lid + s]; }
    workgroupBarrier();
  }
  if (lid == 0u) { partial[wid.x] = red[0]; }
}`);
}

function normFinalKernel(): Kernel {
  return defineKernel("grad_norm_final", {}, ["read", "write", "uniform"], () => `
struct P { count: u32, _a: u32, _b: u32, _c: u32 }
@group(0) @binding(0) var<storage, read> partial: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: P;
var<workgroup> red: array<f32, ${WG}>;
@compute @workgroup_size(${WG}) fn main(@builtin(local_invocation_id) l: vec3u) {
  let lid = l.x;
  var acc = 0.0;
  for (var i = lid; i < p.count; i += ${WG}u) { acc += partial[i]; }
  red[lid] = acc;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { red[lid] += red[lid + s]; }
    workgroupBarrier();
  }
  if (lid == 0u) { out[0] = red[0]; }
}`);
}

const partials = new WeakMap<GPUBuffer, Tensor>();

/**
 * Records the squared L2 norm of a flat gradient, `out[0] = Σ g²`, in two levels (per-block partial sums,
 * then one workgroup sums them) with a fixed order, so the result is deterministic. The partial-sum
 * scratch is cached per output buffer.
 *
 * @param rec The recorder.
 * @param out The squared norm (1) f32.
 * @param grad The flat gradient (P) f32.
 */
export function gradNormSquared(rec: Recorder, out: Tensor, grad: Tensor): void {
  // out: (1); grad: (P)
  const n = grad.size;
  const groups = Math.max(1, Math.min(MAX_PARTIALS, Math.ceil(n / (WG * 4))));
  const block = Math.ceil(n / groups);
  let scratch = partials.get(out.buffer);
  if (!scratch) {
    scratch = createTensor(rec.gpu, [MAX_PARTIALS], "f32", "grad norm partials");
    partials.set(out.buffer, scratch);
  }
  rec.dispatch(normPartialKernel(), [grad, scratch], [n, block, groups, 0], [groups]);
  rec.dispatch(normFinalKernel(), [scratch, out], [groups, 0, 0, 0], [1]);
}

/**
 * Records one AdamW step over the flat parameter buffer (torch.optim.AdamW's formulas and order).
 * When `gradNormSq` is given and `maxGradNorm > 0`, the gradient is first scaled by
 * `min(1, maxGradNorm / (sqrt(gradNormSq) + 1e-6))` (the gradient buffer itself is not modified).
 *
 * @param rec The recorder.
 * @param args `param` (P) f32 updated in place; `grad` (P) f32; `m`, `v` (P) f32 moments updated in place
 *   (zero before step 1); `hyper` (8) f32 `[lr, beta1, beta2, eps, weightDecay, step, maxGradNorm, 0]`
 *   (see {@link packHyper}; `step` counts from 1); `gradNormSq` (1) f32 from {@link gradNormSquared}.
 */
export function adamwStep(
  rec: Recorder,
  args: { param: Tensor; grad: Tensor; m: Tensor; v: Tensor; hyper: Tensor; gradNormSq?: Tensor },
): void {
  // param, grad, m, v: (P); hyper: (8); gradNormSq: (1)
  const { param, grad, m, v, hyper } = args;
  const n = param.size;
  for (const t of [grad, m, v]) {
    if (t.size !== n) {
      throw new GpuError(`adamwStep: ${t.label} [${t.shape}] differs in size from param [${n}]`);
    }
  }
  if (hyper.size !== 8 || hyper.dtype !== "f32") {
    throw new GpuError(`adamwStep: hyper must be 8 f32 values, got [${hyper.shape}] ${hyper.dtype}`);
  }
  const norm = args.gradNormSq ?? hyper; // bound but unread when absent
  const { groups, stride } = grid1d(n, WG);
  rec.dispatch(
    adamwKernel(),
    [param, grad, m, v, hyper, norm],
    [n, stride, args.gradNormSq ? 1 : 0, 0],
    groups,
  );
}
