/**
 * Fill and copy: set every element of an f32/i32/u32 tensor to one bit pattern (zeroing gradients,
 * poisoning outputs with NaN in tests), and copy a range of elements inside one compute pass (a
 * `copyBufferToBuffer` would end the pass).
 *
 * @module
 */

import { defineKernel, type Kernel } from "../src/gpu/kernel.ts";
import type { Recorder } from "../src/gpu/recorder.ts";
import type { Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";

const WG = 256;

function fillKernel(): Kernel {
  return defineKernel("fill", {}, ["write", "uniform"], () => `
struct P { n: u32, bits: u32, stride: u32, _p: u32 }
@group(0) @binding(0) var<storage, read_write> out: array<u32>;
@group(0) @binding(1) var<uniform> p: P;
@compute @workgroup_size(${WG}) fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.x + g.y * p.stride;
  if (i < p.n) { out[i] = p.bits; }
}`);
}

function copyKernel(): Kernel {
  return defineKernel("copy", {}, ["read", "write", "uniform"], () => `
struct P { n: u32, stride: u32, srcOffset: u32, dstOffset: u32 }
@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@group(0) @binding(2) var<uniform> p: P;
@compute @workgroup_size(${WG}) fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.x + g.y * p.stride;
  if (i < p.n) { dst[p.dstOffset + i] = src[p.srcOffset + i]; }
}`);
}

/**
 * Workgroup counts for `n` threads of `wg` each, folded into y when x would pass 65535.
 *
 * @param n Thread count.
 * @param wg Workgroup size.
 * @returns `[x, y]` workgroups and the x stride in threads.
 */
export function grid1d(n: number, wg: number): { groups: [number, number]; stride: number } {
  const total = Math.max(1, Math.ceil(n / wg));
  const x = Math.min(total, 65535);
  const y = Math.ceil(total / x);
  return { groups: [x, y], stride: x * wg };
}

/**
 * Records `t[:] = value` for a 32-bit tensor (`value` is written as f32 for f32 tensors, else as an integer).
 *
 * @param rec The recorder.
 * @param t Destination (f32, i32 or u32).
 * @param value The value (NaN allowed).
 */
export function fill(rec: Recorder, t: Tensor, value: number): void {
  const bits = t.dtype === "f32" ? new Uint32Array(new Float32Array([value]).buffer)[0]! : value >>> 0;
  const n = t.dtype === "f16" ? Math.ceil(t.size / 2) : t.size;
  const { groups, stride } = grid1d(n, WG);
  rec.dispatch(fillKernel(), [t], [n, bits, stride, 0], groups);
}

/**
 * Records `dst[dstOffset .. dstOffset+n] = src[srcOffset .. srcOffset+n]`, inside the pass. The copy moves
 * 32-bit words: f16 tensors (both or neither) copy pairs, so their `n` and offsets must be even.
 *
 * @param rec The recorder.
 * @param src Source tensor.
 * @param dst Destination tensor (a different buffer, same element size).
 * @param n Elements to copy (default: all of src).
 * @param srcOffset First source element.
 * @param dstOffset First destination element.
 */
export function copyElements(
  rec: Recorder,
  src: Tensor,
  dst: Tensor,
  n: number = src.size,
  srcOffset = 0,
  dstOffset = 0,
): void {
  if ((src.dtype === "f16") !== (dst.dtype === "f16")) {
    throw new GpuError(`copyElements: ${src.label} is ${src.dtype} but ${dst.label} is ${dst.dtype}`);
  }
  if (src.dtype === "f16") {
    if (n % 2 || srcOffset % 2 || dstOffset % 2) {
      throw new GpuError(
        `copyElements: f16 copies move element pairs; got n ${n}, offsets ${srcOffset} and ${dstOffset}`,
      );
    }
    n /= 2, srcOffset /= 2, dstOffset /= 2;
  }
  const { groups, stride } = grid1d(n, WG);
  rec.dispatch(copyKernel(), [src, dst], [n, stride, srcOffset, dstOffset], groups);
}
