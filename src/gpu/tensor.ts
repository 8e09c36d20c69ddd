/**
 * GPU tensors: a view (shape, dtype, byte offset) into a `GPUBuffer`. Views let one large buffer be
 * bound in ranges, which is how tensors larger than `maxStorageBufferBindingSize` are used (see
 * {@link splitRows}). Uploads go through `queue.writeBuffer`; readback ({@link readTensor}) is the only
 * place that waits on the GPU, so nothing on a hot path should call it.
 *
 * @module
 */

import { checkBufferFits, type Gpu, throwIfFailed } from "./device.ts";
import { GpuError } from "../errors.ts";

/** Element types a tensor can hold on the GPU. */
export type DType = "f32" | "f16" | "i32" | "u32";

/** Bytes per element of each {@link DType}. */
export const DTYPE_BYTES: Record<DType, number> = { f32: 4, f16: 2, i32: 4, u32: 4 };

/** Usage flags of every storage buffer we create. */
export const STORAGE_USAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/** A typed, shaped view into a GPU buffer. */
export class Tensor {
  /** The buffer holding the data. */
  readonly buffer: GPUBuffer;
  /** Shape, outermost first, e.g. `[B, T, C]`. */
  readonly shape: readonly number[];
  /** Element type. */
  readonly dtype: DType;
  /** Byte offset of element 0 inside `buffer` (a multiple of 256 when bound on its own). */
  readonly offset: number;
  /** A name for error messages and profiles. */
  readonly label: string;

  /**
   * Wraps a buffer range as a tensor.
   *
   * @param buffer The buffer.
   * @param shape The shape.
   * @param dtype The element type.
   * @param offset Byte offset into the buffer.
   * @param label A name for messages.
   */
  constructor(buffer: GPUBuffer, shape: readonly number[], dtype: DType, offset = 0, label = "tensor") {
    this.buffer = buffer;
    this.shape = shape;
    this.dtype = dtype;
    this.offset = offset;
    this.label = label;
  }

  /** Number of elements. */
  get size(): number {
    return numel(this.shape);
  }

  /** Bytes spanned by the elements (rounded up to 4 for f16 so it can be bound). */
  get byteLength(): number {
    return Math.ceil((this.size * DTYPE_BYTES[this.dtype]) / 4) * 4;
  }

  /**
   * A view of the same data with another shape (same element count).
   *
   * @param shape The new shape.
   * @returns A tensor sharing this buffer.
   */
  reshape(shape: readonly number[]): Tensor {
    if (numel(shape) !== this.size) {
      throw new GpuError(`cannot reshape ${this.label} from [${this.shape}] to [${shape}]: sizes differ`);
    }
    return new Tensor(this.buffer, shape, this.dtype, this.offset, this.label);
  }
}

/**
 * Product of a shape's dimensions.
 *
 * @param shape A shape.
 * @returns The element count.
 */
export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/**
 * Bytes of every buffer {@link createTensor} has created in this process (buffers are rarely freed, so
 * this is the tensors' GPU memory; benchmarks report it as peak memory). Uniforms, staging and pool
 * buffers are not counted.
 */
export let gpuBytesAllocated = 0;

/** The largest {@link gpuBytesAllocated} since the last {@link resetGpuBytesPeak}. */
export let gpuBytesPeak = 0;

/**
 * Starts a new peak-memory window: {@link gpuBytesPeak} becomes the bytes allocated now.
 *
 * @returns The bytes allocated now (the window's baseline).
 * @example Bytes a phase adds
 * ```ts ignore
 * const before = resetGpuBytesPeak();
 * // ... allocate ...
 * console.log(gpuBytesPeak - before);
 * ```
 */
export function resetGpuBytesPeak(): number {
  gpuBytesPeak = gpuBytesAllocated;
  return gpuBytesAllocated;
}

/**
 * An f32 scratch tensor of at least `n` elements kept in `cache` under an owner tensor's buffer: created on
 * first use, replaced by a larger one when `n` grows (recorded ops keep the one they bound), gone with the
 * owner. Kernels key their scratch by a buffer of the activation set they serve, so replays allocate nothing.
 *
 * @param cache The caller's cache.
 * @param gpu The GPU.
 * @param owner The tensor whose buffer keys the scratch.
 * @param n Elements needed.
 * @param label A name for messages.
 * @returns The scratch.
 */
export function cachedScratch(
  cache: WeakMap<GPUBuffer, Tensor>,
  gpu: Gpu,
  owner: Tensor,
  n: number,
  label: string,
): Tensor {
  const hit = cache.get(owner.buffer);
  if (hit && hit.size >= n) return hit;
  const t = createTensor(gpu, [n], "f32", label);
  cache.set(owner.buffer, t);
  return t;
}

/**
 * Creates a tensor in a fresh buffer (contents zero).
 *
 * @param gpu The GPU.
 * @param shape The shape.
 * @param dtype The element type.
 * @param label A name for messages.
 * @returns The tensor.
 * @example A 2x3 f32 tensor
 * ```ts ignore
 * const t = createTensor(await getGpu(), [2, 3], "f32", "x");
 * ```
 */
export function createTensor(
  gpu: Gpu,
  shape: readonly number[],
  dtype: DType = "f32",
  label = "tensor",
): Tensor {
  const bytes = Math.max(16, Math.ceil((numel(shape) * DTYPE_BYTES[dtype]) / 16) * 16);
  checkBufferFits(gpu, bytes, `${label} [${shape}] ${dtype}`);
  const buffer = gpu.device.createBuffer({ size: bytes, usage: STORAGE_USAGE, label });
  gpuBytesAllocated += bytes;
  if (gpuBytesAllocated > gpuBytesPeak) gpuBytesPeak = gpuBytesAllocated;
  return new Tensor(buffer, shape, dtype, 0, label);
}

/** Typed arrays that can be uploaded. */
export type HostArray = Float32Array | Int32Array | Uint32Array | Uint16Array;

/**
 * Creates a tensor and uploads `data` into it.
 *
 * @param gpu The GPU.
 * @param data The values (Uint16Array holds f16 bits).
 * @param shape The shape (defaults to `[data.length]`).
 * @param label A name for messages.
 * @returns The tensor.
 */
export function tensorFrom(gpu: Gpu, data: HostArray, shape?: readonly number[], label = "tensor"): Tensor {
  const dtype: DType = data instanceof Float32Array
    ? "f32"
    : data instanceof Int32Array
    ? "i32"
    : data instanceof Uint16Array
    ? "f16"
    : "u32";
  const t = createTensor(gpu, shape ?? [data.length], dtype, label);
  writeTensor(gpu, t, data);
  return t;
}

/**
 * Tensors of the given shapes at consecutive offsets of one new buffer, e.g. a layer's q, k and v, so
 * that one product writes or reads all three (see `ColumnGroups` in kernels/matmul.ts) while every other
 * kernel binds each on its own. Null when an offset would not be a multiple of the device's
 * `minStorageBufferOffsetAlignment` (the parts could not be bound alone) or the whole exceeds
 * `maxStorageBufferBindingSize` (it could not be bound at all): the caller then creates them separately.
 *
 * @param gpu The GPU.
 * @param shapes The parts' shapes, in order.
 * @param dtype Their element type.
 * @param label A name for messages.
 * @param names The parts' names (default `label.0`, `label.1`, ...).
 * @returns The whole (one dimension) and the parts, or null.
 * @example q, k and v of 2048 rows
 * ```ts ignore
 * const qkv = createStacked(gpu, [[2048, 576], [2048, 192], [2048, 192]], "f32", "layer0.qkv");
 * ```
 */
export function createStacked(
  gpu: Gpu,
  shapes: readonly (readonly number[])[],
  dtype: DType,
  label: string,
  names: readonly string[] = shapes.map((_, i) => `${label}.${i}`),
): { whole: Tensor; parts: Tensor[] } | null {
  const align = gpu.limits.minStorageBufferOffsetAlignment;
  const bytes = shapes.map((s) => numel(s) * DTYPE_BYTES[dtype]);
  if (bytes.slice(0, -1).some((b) => b % align !== 0)) return null;
  const total = bytes.reduce((a, b) => a + b, 0);
  if (total > gpu.limits.maxStorageBufferBindingSize) return null;
  const whole = createTensor(gpu, [total / DTYPE_BYTES[dtype]], dtype, label);
  let offset = 0;
  const parts = shapes.map((shape, i) => {
    const t = new Tensor(whole.buffer, shape, dtype, offset, names[i] ?? `${label}.${i}`);
    offset += bytes[i]!;
    return t;
  });
  return { whole, parts };
}

/**
 * Uploads host data into a tensor (queued; no wait).
 *
 * @param gpu The GPU.
 * @param t The destination.
 * @param data Values, exactly `t.size` of them.
 */
export function writeTensor(gpu: Gpu, t: Tensor, data: HostArray): void {
  if (data.length !== t.size) {
    throw new GpuError(`writeTensor(${t.label}): got ${data.length} values for shape [${t.shape}]`);
  }
  if (data.byteLength % 4 === 0) {
    gpu.device.queue.writeBuffer(
      t.buffer,
      t.offset,
      data.buffer as ArrayBuffer,
      data.byteOffset,
      data.byteLength,
    );
  } else {
    const padded = new Uint8Array(Math.ceil(data.byteLength / 4) * 4);
    padded.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    gpu.device.queue.writeBuffer(t.buffer, t.offset, padded);
  }
}

/**
 * Reads a tensor back to the host. This waits for the GPU (about 10 ms in Deno): call it only where the
 * caller asked for a result, never inside a training or decode step.
 *
 * @param gpu The GPU.
 * @param t The tensor.
 * @returns The values (f16 tensors come back as f16 bits in a Uint16Array).
 */
export async function readTensor(gpu: Gpu, t: Tensor): Promise<HostArray> {
  const bytes = await readBytes(gpu, t.buffer, t.offset, t.byteLength, t.label);
  switch (t.dtype) {
    case "f32":
      return new Float32Array(bytes.buffer, 0, t.size);
    case "i32":
      return new Int32Array(bytes.buffer, 0, t.size);
    case "u32":
      return new Uint32Array(bytes.buffer, 0, t.size);
    case "f16":
      return new Uint16Array(bytes.buffer, 0, t.size);
  }
}

/**
 * Reads an f32 tensor back to the host (see {@link readTensor}).
 *
 * @param gpu The GPU.
 * @param t An f32 tensor.
 * @returns Its values.
 */
export async function readF32(gpu: Gpu, t: Tensor): Promise<Float32Array> {
  if (t.dtype !== "f32") throw new GpuError(`readF32(${t.label}): tensor is ${t.dtype}`);
  return (await readTensor(gpu, t)) as Float32Array;
}

/**
 * Copies a byte range of a buffer to the host through a staging buffer and waits for it.
 *
 * @param gpu The GPU.
 * @param buffer Source buffer.
 * @param offset Byte offset (multiple of 4).
 * @param size Byte count (multiple of 4).
 * @param label What is being read (for errors).
 * @returns A copy of the bytes.
 */
export async function readBytes(
  gpu: Gpu,
  buffer: GPUBuffer,
  offset: number,
  size: number,
  label = "buffer",
): Promise<Uint8Array> {
  throwIfFailed(gpu);
  const staging = gpu.device.createBuffer({
    size: Math.max(4, size),
    usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    label: `readback ${label}`,
  });
  try {
    const enc = gpu.device.createCommandEncoder({ label: `readback ${label}` });
    enc.copyBufferToBuffer(buffer, offset, staging, 0, size);
    gpu.device.queue.submit([enc.finish()]);
    try {
      await staging.mapAsync(GPUMapMode.READ);
    } catch (e) {
      throwIfFailed(gpu);
      throw new GpuError(`reading back ${label} failed: ${e}`, { cause: e });
    }
    throwIfFailed(gpu);
    return new Uint8Array(staging.getMappedRange().slice(0));
  } finally {
    staging.destroy();
  }
}

/**
 * Splits a 2-D tensor `[R, C]` into row-range views, each small enough to be bound
 * (≤ `maxStorageBufferBindingSize` bytes) and starting at an offset aligned as binding requires.
 * This is how weights larger than one binding (e.g. a 32000x2048 f32 embedding on a device that binds
 * 128 MiB) are used: kernels run once per range.
 *
 * @param gpu The GPU (for its limits).
 * @param t A tensor of shape `[R, C]`.
 * @param maxBytes Upper bound of each range in bytes (defaults to the binding limit).
 * @returns Views `{ rowStart, tensor }` in order, covering all rows.
 */
export function splitRows(
  gpu: Gpu,
  t: Tensor,
  maxBytes: number = gpu.limits.maxStorageBufferBindingSize,
): { rowStart: number; tensor: Tensor }[] {
  if (t.shape.length !== 2) throw new GpuError(`splitRows(${t.label}): expected 2-D, got [${t.shape}]`);
  const [rows, cols] = t.shape as [number, number];
  const rowBytes = cols * DTYPE_BYTES[t.dtype];
  const align = gpu.limits.minStorageBufferOffsetAlignment;
  // rows per chunk: a multiple of the rows that keep every chunk's offset aligned
  let step = 1;
  while ((step * rowBytes) % align !== 0) step++;
  let rowsPer = Math.floor(maxBytes / rowBytes / step) * step;
  if (rowsPer < 1) {
    throw new GpuError(
      `splitRows(${t.label}): one row of ${rowBytes} bytes exceeds the binding limit ${maxBytes}`,
    );
  }
  if (rowsPer >= rows) return [{ rowStart: 0, tensor: t }];
  if ((t.offset % align) !== 0) throw new GpuError(`splitRows(${t.label}): base offset not aligned`);
  rowsPer = Math.max(step, rowsPer);
  const out: { rowStart: number; tensor: Tensor }[] = [];
  for (let r = 0; r < rows; r += rowsPer) {
    const n = Math.min(rowsPer, rows - r);
    out.push({
      rowStart: r,
      tensor: new Tensor(t.buffer, [n, cols], t.dtype, t.offset + r * rowBytes, `${t.label}[${r}:${r + n}]`),
    });
  }
  return out;
}
