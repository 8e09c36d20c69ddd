/**
 * A pool of storage buffers reused by size class, so that repeated forwards, steps and decodes allocate
 * nothing after the first: `acquire` hands out a free buffer of the request's size class (the next of
 * the classes 256 B · 2^(k/2)), `release` returns it. Bind groups keyed by buffer stay valid because the
 * buffers themselves are kept.
 *
 * @module
 */

import { checkBufferFits, type Gpu } from "./device.ts";
import { type DType, DTYPE_BYTES, numel, STORAGE_USAGE, Tensor } from "./tensor.ts";

/**
 * Rounds a byte count up to its size class: 256 B, then powers of √2 (at most ~41% waste).
 *
 * @param bytes Requested bytes.
 * @returns The class size in bytes (a multiple of 256).
 */
export function sizeClass(bytes: number): number {
  if (bytes <= 256) return 256;
  const k = Math.ceil(2 * Math.log2(bytes / 256));
  const size = 256 * Math.pow(2, k / 2);
  return Math.ceil(size / 256) * 256;
}

/** Reuses GPU buffers by size class. */
export class BufferPool {
  readonly #gpu: Gpu;
  readonly #free = new Map<number, GPUBuffer[]>();
  #allocated = 0;
  #created = 0;

  /** @param gpu The GPU buffers are created on. */
  constructor(gpu: Gpu) {
    this.#gpu = gpu;
  }

  /** Bytes held by buffers this pool created (in use or free). */
  get allocatedBytes(): number {
    return this.#allocated;
  }

  /** Number of buffers this pool created (a reuse test checks it stays flat). */
  get createdBuffers(): number {
    return this.#created;
  }

  /**
   * Returns a buffer of at least `bytes` bytes, reusing a free one of the same size class.
   *
   * @param bytes Minimum size.
   * @param label A name for errors.
   * @returns A storage buffer.
   */
  acquire(bytes: number, label = "pooled"): GPUBuffer {
    const size = sizeClass(bytes);
    const list = this.#free.get(size);
    const reused = list?.pop();
    if (reused) return reused;
    checkBufferFits(this.#gpu, size, label);
    this.#allocated += size;
    this.#created++;
    return this.#gpu.device.createBuffer({ size, usage: STORAGE_USAGE, label: `pool ${label}` });
  }

  /**
   * Gives a buffer back for reuse.
   *
   * @param buffer A buffer from {@link BufferPool.acquire}.
   */
  release(buffer: GPUBuffer): void {
    const list = this.#free.get(buffer.size) ?? [];
    list.push(buffer);
    this.#free.set(buffer.size, list);
  }

  /**
   * A tensor in a pooled buffer.
   *
   * @param shape Shape.
   * @param dtype Element type.
   * @param label Name.
   * @returns The tensor; give it back with {@link BufferPool.releaseTensor}.
   */
  tensor(shape: readonly number[], dtype: DType = "f32", label = "pooled"): Tensor {
    const bytes = Math.max(16, numel(shape) * DTYPE_BYTES[dtype]);
    return new Tensor(this.acquire(bytes, label), shape, dtype, 0, label);
  }

  /**
   * Gives a tensor's buffer back.
   *
   * @param t A tensor from {@link BufferPool.tensor}.
   */
  releaseTensor(t: Tensor): void {
    this.release(t.buffer);
  }

  /** Destroys every free buffer. */
  trim(): void {
    for (const list of this.#free.values()) {
      for (const b of list) {
        this.#allocated -= b.size;
        b.destroy();
      }
    }
    this.#free.clear();
  }
}
