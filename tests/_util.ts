/**
 * Test helpers: a seeded random generator, poisoned (NaN) output tensors, and comparisons that report
 * the worst element. Every kernel test uses fresh random inputs (never zeros) and poisons its outputs so
 * an element the kernel forgot to write fails the comparison.
 *
 * @module
 */

import { getGpu, type Gpu } from "../src/gpu/device.ts";
import { createTensor, type DType, readTensor, type Tensor, tensorFrom } from "../src/gpu/tensor.ts";
import { Recorder } from "../src/gpu/recorder.ts";
import { fill } from "../kernels/fill.ts";
import { f16ArrayToF32, f32ArrayToF16 } from "../src/io/dtype.ts";

/** A seeded PRNG (mulberry32) with uniform and normal draws. */
export class Rng {
  #s: number;
  /** @param seed Any integer. */
  constructor(seed: number) {
    this.#s = seed >>> 0;
  }
  /** @returns A uniform draw in [0, 1). */
  next(): number {
    let t = (this.#s = (this.#s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** @returns A standard normal draw. */
  normal(): number {
    const u = Math.max(this.next(), 1e-12);
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.next());
  }
  /**
   * @param n Count.
   * @param scale Standard deviation.
   * @returns n normal draws as f32.
   */
  randn(n: number, scale = 1): Float32Array {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = this.normal() * scale;
    return a;
  }
  /**
   * @param n Count.
   * @param hi Exclusive upper bound.
   * @returns n integers in [0, hi).
   */
  ints(n: number, hi: number): Int32Array {
    const a = new Int32Array(n);
    for (let i = 0; i < n; i++) a[i] = Math.floor(this.next() * hi);
    return a;
  }
}

/** @returns The GPU; fails the test (never skips) when no adapter exists. */
export function gpu(): Promise<Gpu> {
  return getGpu();
}

/**
 * The same device (pipelines and buffers shared) seen with a lower `maxStorageBuffersPerShaderStage`, for
 * the fallbacks of fused kernels under WebGPU's default limit of 8. The limits are copied into a plain
 * object: WebIDL getters cannot be called on another object.
 *
 * @param g The GPU.
 * @param n The storage-buffer limit to report.
 * @returns A Gpu whose `limits` say `n`.
 */
export function withStorageBufferLimit(g: Gpu, n: number): Gpu {
  const limits: Record<string, number> = {};
  for (const key in g.limits) limits[key] = (g.limits as unknown as Record<string, number>)[key]!;
  limits.maxStorageBuffersPerShaderStage = n;
  return { ...g, limits: limits as unknown as GPUSupportedLimits };
}

/**
 * A tensor filled with NaN (or a poison bit pattern for integer tensors) on the GPU.
 *
 * @param g The GPU.
 * @param shape Shape.
 * @param dtype Element type.
 * @returns The poisoned tensor.
 */
export function poisoned(g: Gpu, shape: readonly number[], dtype: DType = "f32"): Tensor {
  const t = createTensor(g, shape, dtype, "poisoned");
  const rec = new Recorder(g);
  // f16: both halves of every 32-bit word are an f16 NaN
  fill(rec, t, dtype === "f32" ? NaN : dtype === "f16" ? 0x7e007e00 : 0x7fc00000);
  rec.submit();
  return t;
}

/**
 * Uploads an array as a tensor.
 *
 * @param g The GPU.
 * @param data Values.
 * @param shape Shape.
 * @returns The tensor.
 */
export function upload(g: Gpu, data: Float32Array | Int32Array, shape?: readonly number[]): Tensor {
  return tensorFrom(g, data, shape);
}

/**
 * Reads an f32 tensor.
 *
 * @param g The GPU.
 * @param t The tensor.
 * @returns Values as f32.
 */
export async function download(g: Gpu, t: Tensor): Promise<Float32Array> {
  return (await readTensor(g, t)) as Float32Array;
}

/**
 * Reads an f16 tensor as f32 values.
 *
 * @param g The GPU.
 * @param t An f16 tensor.
 * @returns Its values widened to f32 (exact).
 */
export async function downloadF16(g: Gpu, t: Tensor): Promise<Float32Array> {
  if (t.dtype !== "f16") throw new Error(`downloadF16(${t.label}): tensor is ${t.dtype}`);
  return f16ArrayToF32((await readTensor(g, t)) as Uint16Array);
}

/**
 * Rounds values to f16 and uploads them as an f16 tensor; the returned `values` are the rounded values
 * widened back to f32, the inputs a float64 reference should use.
 *
 * @param g The GPU.
 * @param data Values (any f32).
 * @param shape Shape.
 * @returns The f16 tensor and its exact values.
 */
export function uploadF16(
  g: Gpu,
  data: Float32Array,
  shape?: readonly number[],
): { tensor: Tensor; values: Float32Array } {
  const bits = f32ArrayToF16(data);
  return { tensor: tensorFrom(g, bits, shape), values: f16ArrayToF32(bits) };
}

/**
 * Uploads `data` as an f32 or f16 tensor; `values` are what a float64 reference should use (the f16-rounded
 * values for f16).
 *
 * @param g The GPU.
 * @param data Values.
 * @param shape Shape.
 * @param dtype "f32" or "f16".
 * @returns The tensor and its exact values.
 */
export function uploadAs(
  g: Gpu,
  data: Float32Array,
  shape: readonly number[],
  dtype: "f32" | "f16",
): { tensor: Tensor; values: Float32Array } {
  return dtype === "f16" ? uploadF16(g, data, shape) : { tensor: upload(g, data, shape), values: data };
}

/**
 * Reads an f32 or f16 tensor as f32 values.
 *
 * @param g The GPU.
 * @param t The tensor.
 * @returns Its values.
 */
export function downloadAny(g: Gpu, t: Tensor): Promise<Float32Array> {
  return t.dtype === "f16" ? downloadF16(g, t) : download(g, t);
}

/**
 * Normwise relative error `max|a - e| / max(max|e|, tiny)`; NaN anywhere gives Infinity.
 *
 * @param actual Computed values.
 * @param expected Reference values.
 * @returns The relative error.
 */
export function relError(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  if (actual.length !== expected.length) throw new Error(`length ${actual.length} != ${expected.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!;
    const e = expected[i]!;
    if (!Number.isFinite(a) && a !== e) return Infinity;
    num = Math.max(num, Math.abs(a - e));
    den = Math.max(den, Math.abs(e));
  }
  return num / Math.max(den, 1e-30);
}

/**
 * Asserts the normwise relative error is within `tol`, naming the worst element.
 *
 * @param actual Computed values.
 * @param expected Reference values.
 * @param tol Tolerance on {@link relError}.
 * @param what Name for the message.
 */
export function assertClose(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  tol: number,
  what = "values",
): void {
  const err = relError(actual, expected);
  if (!(err <= tol)) {
    let worst = 0;
    let wi = 0;
    for (let i = 0; i < actual.length; i++) {
      const d = Math.abs(actual[i]! - expected[i]!);
      if (!(d <= worst)) {
        worst = d;
        wi = i;
      }
    }
    throw new Error(
      `${what}: relative error ${err.toExponential(3)} > ${tol} (worst at ${wi}: got ${actual[wi]}, want ${
        expected[wi]
      })`,
    );
  }
}

/** HF configs of a tiny llama (GQA 4/2) and a tiny gpt2 for whole-model tests on any device. */
export const TINY_CONFIGS = {
  llama: {
    model_type: "llama",
    vocab_size: 96,
    hidden_size: 32,
    intermediate_size: 64,
    num_hidden_layers: 3,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    max_position_embeddings: 64,
  },
  gpt2: { model_type: "gpt2", vocab_size: 96, n_embd: 32, n_layer: 3, n_head: 4, n_positions: 64 },
};
