/**
 * Normalisation layers: RMSNorm (LLaMA, Mistral, SmolLM) and LayerNorm (gpt2), forward and backward.
 * One workgroup of 256 threads normalises one row: the threads stride over the channels, reduce their
 * partial sums through workgroup memory (no subgroups on our devices), and write the row. Statistics
 * (`rstd`, `mean`) are saved by the forward for the backward. All arithmetic is f32, as in HF's
 * `LlamaRMSNorm` (which upcasts to f32) and torch's `LayerNorm` (biased variance). The activations `x` and
 * `out` may each be stored in f16 (loaded into f32, rounded once at the store); weights, statistics and
 * gradients are f32. Base weights are frozen, so the backward gives only the gradient with respect to the
 * input.
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

const WG = 256;

/** Workgroup tree reductions of f32 and vec2<f32> (callers keep control flow uniform). */
const REDUCE = `
var<workgroup> red: array<vec2<f32>, ${WG}>;
fn reduce2(lid: u32, v: vec2<f32>) -> vec2<f32> {
  red[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
    workgroupBarrier();
  }
  let r = red[0];
  workgroupBarrier();
  return r;
}`;

/** Rows are workgroups; more than 65535 rows fold into y. */
function rowGroups(n: number): { groups: [number, number]; gx: number } {
  const gx = Math.max(1, Math.min(n, 65535));
  return { groups: [gx, Math.ceil(n / gx)], gx };
}

function rowsOf(x: Tensor, c: number, what: string): number {
  if (c <= 0 || x.size % c !== 0) {
    throw new GpuError(`${what}: ${x.label} [${x.shape}] is not a whole number of rows of ${c} channels`);
  }
  return x.size / c;
}

function rmsnormForwardKernel(xt: ActivationType, ot: ActivationType): Kernel {
  return defineKernel("rmsnorm_forward", { xt, ot }, ["read", "read", "write", "write", "uniform"], () => `
${enableF16(xt, ot)}
struct P { N: u32, C: u32, gx: u32, eps: f32 }
@group(0) @binding(0) var<storage, read> x: array<${xt}>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<${ot}>;
@group(0) @binding(3) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(4) var<uniform> p: P;
${REDUCE}
@compute @workgroup_size(${WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) l: vec3u) {
  let row = wid.x + wid.y * p.gx;
  if (row >= p.N) { return; }
  let lid = l.x;
  let base = row * p.C;
  var acc = 0.0;
  for (var c = lid; c < p.C; c += ${WG}u) { let v = f32(x[base + c]); acc += v * v; }
  let ss = reduce2(lid, vec2<f32>(acc, 0.0)).x;
  let r = 1.0 / sqrt(ss / f32(p.C) + p.eps);
  if (lid == 0u) { rstd[row] = r; }
  for (var c = lid; c < p.C; c += ${WG}u) { out[base + c] = ${ot}(w[c] * (f32(x[base + c]) * r)); }
}`);
}

function rmsnormBackwardKernel(xt: ActivationType): Kernel {
  return defineKernel(
    "rmsnorm_backward",
    { xt },
    ["read", "read", "read", "read", "write", "uniform"],
    () => `
${enableF16(xt)}
struct P { N: u32, C: u32, gx: u32, accumulate: u32 }
@group(0) @binding(0) var<storage, read> dout: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<${xt}>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> rstd: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;
@group(0) @binding(5) var<uniform> p: P;
${REDUCE}
@compute @workgroup_size(${WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) l: vec3u) {
  let row = wid.x + wid.y * p.gx;
  if (row >= p.N) { return; }
  let lid = l.x;
  let base = row * p.C;
  var acc = 0.0;
  for (var c = lid; c < p.C; c += ${WG}u) { acc += dout[base + c] * w[c] * f32(x[base + c]); }
  let dot = reduce2(lid, vec2<f32>(acc, 0.0)).x;
  let r = rstd[row];
  // dx = r * g - x * r^3 * (g . x) / C, with g = dout * w
  let k = r * r * r * dot / f32(p.C);
  for (var c = lid; c < p.C; c += ${WG}u) {
    var v = r * (dout[base + c] * w[c]) - f32(x[base + c]) * k;
    if (p.accumulate != 0u) { v += dx[base + c]; }
    dx[base + c] = v;
  }
}`,
  );
}

function layernormForwardKernel(xt: ActivationType, ot: ActivationType): Kernel {
  return defineKernel(
    "layernorm_forward",
    { xt, ot },
    ["read", "read", "read", "write", "write", "write", "uniform"],
    () => `
${enableF16(xt, ot)}
struct P { N: u32, C: u32, gx: u32, eps: f32 }
@group(0) @binding(0) var<storage, read> x: array<${xt}>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<${ot}>;
@group(0) @binding(4) var<storage, read_write> mean: array<f32>;
@group(0) @binding(5) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(6) var<uniform> p: P;
${REDUCE}
@compute @workgroup_size(${WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) l: vec3u) {
  let row = wid.x + wid.y * p.gx;
  if (row >= p.N) { return; }
  let lid = l.x;
  let base = row * p.C;
  var acc = 0.0;
  for (var c = lid; c < p.C; c += ${WG}u) { acc += f32(x[base + c]); }
  let m = reduce2(lid, vec2<f32>(acc, 0.0)).x / f32(p.C);
  // two passes (mean, then squared deviations): no cancellation for rows with a large mean
  var acc2 = 0.0;
  for (var c = lid; c < p.C; c += ${WG}u) { let d = f32(x[base + c]) - m; acc2 += d * d; }
  let variance = reduce2(lid, vec2<f32>(acc2, 0.0)).x / f32(p.C);
  let r = 1.0 / sqrt(variance + p.eps);
  if (lid == 0u) { mean[row] = m; rstd[row] = r; }
  for (var c = lid; c < p.C; c += ${WG}u) { out[base + c] = ${ot}((f32(x[base + c]) - m) * r * w[c] + b[c]); }
}`,
  );
}

function layernormBackwardKernel(xt: ActivationType): Kernel {
  return defineKernel(
    "layernorm_backward",
    { xt },
    ["read", "read", "read", "read", "read", "write", "uniform"],
    () => `
${enableF16(xt)}
struct P { N: u32, C: u32, gx: u32, accumulate: u32 }
@group(0) @binding(0) var<storage, read> dout: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<${xt}>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> mean: array<f32>;
@group(0) @binding(4) var<storage, read> rstd: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;
@group(0) @binding(6) var<uniform> p: P;
${REDUCE}
@compute @workgroup_size(${WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) l: vec3u) {
  let row = wid.x + wid.y * p.gx;
  if (row >= p.N) { return; }
  let lid = l.x;
  let base = row * p.C;
  let m = mean[row];
  let r = rstd[row];
  var acc = vec2<f32>(0.0, 0.0);
  for (var c = lid; c < p.C; c += ${WG}u) {
    let g = dout[base + c] * w[c];
    acc += vec2<f32>(g, g * (f32(x[base + c]) - m) * r);
  }
  let s = reduce2(lid, acc) / f32(p.C);
  // dx = r * (g - mean(g) - xhat * mean(g * xhat))
  for (var c = lid; c < p.C; c += ${WG}u) {
    let xhat = (f32(x[base + c]) - m) * r;
    var v = r * (dout[base + c] * w[c] - s.x - xhat * s.y);
    if (p.accumulate != 0u) { v += dx[base + c]; }
    dx[base + c] = v;
  }
}`,
  );
}

/**
 * Records RMSNorm forward: `out = weight * (x * rstd)`, `rstd = 1 / sqrt(mean(x²) + eps)` per row.
 *
 * @param rec The recorder.
 * @param out Output (N, C) f32 or f16.
 * @param rstd Saved reciprocal RMS (N) f32, for the backward.
 * @param x Input (N, C) f32 or f16 (independently of `out`).
 * @param weight Scale (C) f32.
 * @param eps Added to the mean square (`rms_norm_eps`).
 */
export function rmsnormForward(
  rec: Recorder,
  out: Tensor,
  rstd: Tensor,
  x: Tensor,
  weight: Tensor,
  eps: number,
): void {
  // x, out: (N, C); weight: (C); rstd: (N)
  const C = weight.size;
  const N = rowsOf(x, C, "rmsnormForward");
  const { groups, gx } = rowGroups(N);
  const xt = activationType(rec.gpu, x, "rmsnormForward x");
  const ot = activationType(rec.gpu, out, "rmsnormForward out");
  rec.dispatch(rmsnormForwardKernel(xt, ot), [x, weight, out, rstd], [N, C, gx, f32(eps)], groups);
}

/**
 * Records RMSNorm backward with respect to the input (the weight is frozen):
 * `dx = rstd * (dout * w) - x * rstd³ * sum(dout * w * x) / C`.
 *
 * @param rec The recorder.
 * @param dx Gradient of the input (N, C) f32: overwritten, or added into with `accumulate`.
 * @param dout Gradient of the output (N, C) f32.
 * @param x The forward's input (N, C) f32 or f16 (a saved activation).
 * @param weight Scale (C) f32.
 * @param rstd The forward's saved reciprocal RMS (N) f32.
 * @param opts `accumulate`: add into `dx` instead of overwriting it.
 */
export function rmsnormBackward(
  rec: Recorder,
  dx: Tensor,
  dout: Tensor,
  x: Tensor,
  weight: Tensor,
  rstd: Tensor,
  opts: { accumulate?: boolean } = {},
): void {
  // dx, dout, x: (N, C); weight: (C); rstd: (N)
  const C = weight.size;
  const N = rowsOf(x, C, "rmsnormBackward");
  const { groups, gx } = rowGroups(N);
  rec.dispatch(
    rmsnormBackwardKernel(activationType(rec.gpu, x, "rmsnormBackward x")),
    [dout, x, weight, rstd, dx],
    [N, C, gx, opts.accumulate ? 1 : 0],
    groups,
  );
}

/**
 * Records LayerNorm forward (torch semantics, biased variance):
 * `out = (x - mean) * rstd * weight + bias`, `rstd = 1 / sqrt(var + eps)` per row.
 *
 * @param rec The recorder.
 * @param out Output (N, C) f32 or f16.
 * @param mean Saved row means (N) f32.
 * @param rstd Saved reciprocal standard deviations (N) f32.
 * @param x Input (N, C) f32 or f16 (independently of `out`).
 * @param weight Scale (C) f32.
 * @param bias Shift (C) f32.
 * @param eps Added to the variance (`layer_norm_epsilon`).
 */
export function layernormForward(
  rec: Recorder,
  out: Tensor,
  mean: Tensor,
  rstd: Tensor,
  x: Tensor,
  weight: Tensor,
  bias: Tensor,
  eps: number,
): void {
  // x, out: (N, C); weight, bias: (C); mean, rstd: (N)
  const C = weight.size;
  const N = rowsOf(x, C, "layernormForward");
  const { groups, gx } = rowGroups(N);
  const xt = activationType(rec.gpu, x, "layernormForward x");
  const ot = activationType(rec.gpu, out, "layernormForward out");
  const kernel = layernormForwardKernel(xt, ot);
  rec.dispatch(kernel, [x, weight, bias, out, mean, rstd], [N, C, gx, f32(eps)], groups);
}

/**
 * Records LayerNorm backward with respect to the input (weight and bias are frozen):
 * `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = dout * weight`, `xhat = (x - mean) * rstd`.
 *
 * @param rec The recorder.
 * @param dx Gradient of the input (N, C) f32: overwritten, or added into with `accumulate`.
 * @param dout Gradient of the output (N, C) f32.
 * @param x The forward's input (N, C) f32 or f16 (a saved activation).
 * @param weight Scale (C) f32.
 * @param mean The forward's saved means (N) f32.
 * @param rstd The forward's saved reciprocal standard deviations (N) f32.
 * @param opts `accumulate`: add into `dx` instead of overwriting it.
 */
export function layernormBackward(
  rec: Recorder,
  dx: Tensor,
  dout: Tensor,
  x: Tensor,
  weight: Tensor,
  mean: Tensor,
  rstd: Tensor,
  opts: { accumulate?: boolean } = {},
): void {
  // dx, dout, x: (N, C); weight: (C); mean, rstd: (N)
  const C = weight.size;
  const N = rowsOf(x, C, "layernormBackward");
  const { groups, gx } = rowGroups(N);
  rec.dispatch(
    layernormBackwardKernel(activationType(rec.gpu, x, "layernormBackward x")),
    [dout, x, weight, mean, rstd, dx],
    [N, C, gx, opts.accumulate ? 1 : 0],
    groups,
  );
}
