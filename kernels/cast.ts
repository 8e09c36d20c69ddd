/**
 * f32 ↔ f16 element casts, used to keep activations in half precision between a training step's forward
 * and its backward (`stashF16` in src/models/activations.ts): f32 → f16 when a layer's forward is done, f16
 * → f32 just before its backward. One thread converts a pair of elements with WGSL's core
 * `pack2x16float` / `unpack2x16float`, so the casts run without the `shader-f16` feature; an f16 tensor's
 * buffer is padded to whole 32-bit words, which makes the pair at an odd end safe to write.
 *
 * @module
 */

import { defineKernel, type Kernel } from "../src/gpu/kernel.ts";
import type { Recorder } from "../src/gpu/recorder.ts";
import type { Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";
import { grid1d } from "./fill.ts";

const WG = 256;

function castKernel(toF16: boolean): Kernel {
  return defineKernel("cast", { toF16 }, ["read", "write", "uniform"], () =>
    toF16
      ? `
struct P { n: u32, stride: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@group(0) @binding(2) var<uniform> p: P;
@compute @workgroup_size(${WG}) fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.x + g.y * p.stride; // pair index
  if (2u * i >= p.n) { return; }
  let hi = select(0.0, src[min(2u * i + 1u, p.n - 1u)], 2u * i + 1u < p.n);
  dst[i] = pack2x16float(vec2<f32>(src[2u * i], hi));
}`
      : `
struct P { n: u32, stride: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<uniform> p: P;
@compute @workgroup_size(${WG}) fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.x + g.y * p.stride; // pair index
  if (2u * i >= p.n) { return; }
  let v = unpack2x16float(src[i]);
  dst[2u * i] = v.x;
  if (2u * i + 1u < p.n) { dst[2u * i + 1u] = v.y; }
}`);
}

/**
 * Records `dst = src` converted between f32 and f16 (the direction follows the dtypes), element by
 * element over all of `src`.
 *
 * @param rec The recorder.
 * @param dst Destination: f16 when `src` is f32, f32 when `src` is f16; at least as many elements.
 * @param src Source tensor.
 */
export function castElements(rec: Recorder, dst: Tensor, src: Tensor): void {
  const toF16 = src.dtype === "f32" && dst.dtype === "f16";
  if (!toF16 && !(src.dtype === "f16" && dst.dtype === "f32")) {
    throw new GpuError(`castElements: f32 → f16 or f16 → f32 only, got ${src.dtype} → ${dst.dtype}`);
  }
  if (dst.size < src.size) {
    throw new GpuError(
      `castElements: ${dst.label} [${dst.shape}] is smaller than ${src.label} [${src.shape}]`,
    );
  }
  const n = src.size;
  const { groups, stride } = grid1d(Math.ceil(n / 2), WG);
  rec.dispatch(castKernel(toF16), [src, dst], [n, stride, 0, 0], groups);
}
