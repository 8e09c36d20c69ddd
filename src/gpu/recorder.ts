/**
 * The recorder: collects many dispatches and encodes them into one command encoder and one compute
 * pass, then submits once. Bind groups and uniform buffers are created once and cached by what they
 * bind (buffer, offset, size; uniform bytes), so replaying the same step — same tensors, same sizes —
 * creates no GPU objects. Values that change every step (an AdamW step counter, a decode position) do
 * not belong in uniforms: put them in a small storage buffer and update it with `queue.writeBuffer`.
 *
 * @module
 */

import { describeGpuError, type Gpu } from "./device.ts";
import { getPipeline, type Kernel } from "./kernel.ts";
import type { Tensor } from "./tensor.ts";
import { GpuError } from "../errors.ts";

/** A value in a kernel's uniform: integers are written as u32 (i32 two's complement), `{ f32 }` as f32. */
export type Param = number | { f32: number };

/**
 * Marks a uniform value as f32.
 *
 * @param x The number.
 * @returns A param written as f32.
 */
export function f32(x: number): Param {
  return { f32: x };
}

/** One recorded GPU operation. */
export type Op =
  | {
    kind: "dispatch";
    label: string;
    pipeline: GPUComputePipeline;
    bindGroup: GPUBindGroup;
    groups: [number, number, number];
  }
  | { kind: "copy"; label: string; src: Tensor; dst: Tensor; bytes: number };

interface Caches {
  bindGroups: Map<string, GPUBindGroup>;
  uniforms: Map<string, GPUBuffer>;
  bufferIds: WeakMap<GPUBuffer, number>;
  nextId: number;
}

const caches = new WeakMap<GPUDevice, Caches>();
const CACHE_LIMIT = 20000;

function cachesOf(gpu: Gpu): Caches {
  let c = caches.get(gpu.device);
  if (!c) {
    c = { bindGroups: new Map(), uniforms: new Map(), bufferIds: new WeakMap(), nextId: 1 };
    caches.set(gpu.device, c);
  }
  return c;
}

function bufferId(c: Caches, b: GPUBuffer): number {
  let id = c.bufferIds.get(b);
  if (id === undefined) {
    id = c.nextId++;
    c.bufferIds.set(b, id);
  }
  return id;
}

/** How many bind groups were created in this process (a reuse test checks it stays flat). */
export let bindGroupsCreated = 0;

/** Records dispatches and submits them as one command buffer with one compute pass. */
export class Recorder {
  /** The GPU. */
  readonly gpu: Gpu;
  /** Operations recorded since the last submit. */
  ops: Op[] = [];

  /**
   * Creates an empty recorder.
   *
   * @param gpu The GPU.
   */
  constructor(gpu: Gpu) {
    this.gpu = gpu;
  }

  /**
   * Records one dispatch.
   *
   * @param kernel The kernel.
   * @param buffers Tensors for the kernel's storage bindings, in order.
   * @param params The uniform's values (when the kernel has a uniform binding).
   * @param groups Workgroup counts `[x, y?, z?]`.
   */
  dispatch(
    kernel: Kernel,
    buffers: readonly Tensor[],
    params: readonly Param[] | null,
    groups: readonly number[],
  ): void {
    const gpu = this.gpu;
    if (gpu.lostMessage !== null) throw new GpuError(gpu.lostMessage);
    const c = cachesOf(gpu);
    const hasUniform = kernel.bindings[kernel.bindings.length - 1] === "uniform";
    const storageCount = kernel.bindings.length - (hasUniform ? 1 : 0);
    if (buffers.length !== storageCount) {
      throw new GpuError(`kernel ${kernel.key}: expected ${storageCount} buffers, got ${buffers.length}`);
    }
    const [x = 1, y = 1, z = 1] = groups;
    const maxGroups = gpu.limits.maxComputeWorkgroupsPerDimension;
    if (x > maxGroups || y > maxGroups || z > maxGroups) {
      throw new GpuError(
        `kernel ${kernel.key}: dispatch [${x}, ${y}, ${z}] exceeds ${maxGroups} workgroups per dimension`,
      );
    }
    if (x === 0 || y === 0 || z === 0) return;
    const maxBinding = gpu.limits.maxStorageBufferBindingSize;
    let key = kernel.key;
    for (const t of buffers) {
      if (t.byteLength > maxBinding) {
        throw new GpuError(
          `kernel ${kernel.key}: ${t.label} [${t.shape}] is ${t.byteLength} bytes, over this GPU's binding limit ` +
            `of ${maxBinding}; split it with splitRows`,
        );
      }
      key += `;${bufferId(c, t.buffer)}:${t.offset}:${t.byteLength}`;
    }
    let uniform: GPUBuffer | null = null;
    if (hasUniform) {
      const data = packParams(params ?? []);
      const ukey = Array.from(data).join(",");
      uniform = c.uniforms.get(ukey) ?? null;
      if (!uniform) {
        uniform = gpu.device.createBuffer({
          size: data.byteLength,
          usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
          label: `params ${kernel.name}`,
        });
        gpu.device.queue.writeBuffer(uniform, 0, data);
        if (c.uniforms.size > CACHE_LIMIT) c.uniforms.clear();
        c.uniforms.set(ukey, uniform);
      }
      key += `;u${bufferId(c, uniform)}`;
    }
    let bindGroup = c.bindGroups.get(key);
    if (!bindGroup) {
      const { layout } = getPipeline(gpu, kernel);
      const entries: GPUBindGroupEntry[] = buffers.map((t, binding) => ({
        binding,
        resource: { buffer: t.buffer, offset: t.offset, size: t.byteLength },
      }));
      if (uniform) entries.push({ binding: entries.length, resource: { buffer: uniform } });
      bindGroup = gpu.device.createBindGroup({ layout, entries, label: kernel.key });
      bindGroupsCreated++;
      if (c.bindGroups.size > CACHE_LIMIT) c.bindGroups.clear();
      c.bindGroups.set(key, bindGroup);
    }
    this.ops.push({
      kind: "dispatch",
      label: kernel.key,
      pipeline: getPipeline(gpu, kernel).pipeline,
      bindGroup,
      groups: [x, y, z],
    });
  }

  /**
   * Records a buffer copy (ends the current compute pass; prefer a copy kernel inside hot loops).
   *
   * @param src Source tensor.
   * @param dst Destination tensor (same byte length or larger).
   */
  copy(src: Tensor, dst: Tensor): void {
    this.ops.push({
      kind: "copy",
      label: `copy ${src.label}->${dst.label}`,
      src,
      dst,
      bytes: src.byteLength,
    });
  }

  /**
   * Takes the recorded operations out of the recorder (to replay them later with {@link runOps}).
   *
   * @returns The operations.
   */
  take(): Op[] {
    const ops = this.ops;
    this.ops = [];
    return ops;
  }

  /** Encodes every recorded operation into one command buffer and submits it. Does not wait. */
  submit(): void {
    runOps(this.gpu, this.take());
  }
}

/**
 * Encodes operations into one command encoder (one compute pass between copies) and submits them.
 * Validation and out-of-memory errors are caught in error scopes and thrown at the next sync point,
 * naming the first kernel of the submission.
 *
 * @param gpu The GPU.
 * @param ops Operations from a {@link Recorder}.
 * @param timestamps Optional query set: writes the begin and end time of the whole submission into
 *   entries 0 and 1 (one pass only).
 */
export function runOps(gpu: Gpu, ops: readonly Op[], timestamps?: GPUQuerySet): void {
  if (gpu.lostMessage !== null) throw new GpuError(gpu.lostMessage);
  if (ops.length === 0) return;
  const device = gpu.device;
  device.pushErrorScope("validation");
  device.pushErrorScope("out-of-memory");
  const enc = device.createCommandEncoder({ label: ops[0]!.label });
  let pass: GPUComputePassEncoder | null = null;
  let passIndex = 0;
  for (const op of ops) {
    if (op.kind === "dispatch") {
      if (!pass) {
        const desc: GPUComputePassDescriptor = { label: op.label };
        if (timestamps && passIndex === 0) {
          desc.timestampWrites = {
            querySet: timestamps,
            beginningOfPassWriteIndex: 0,
            endOfPassWriteIndex: 1,
          };
        }
        pass = enc.beginComputePass(desc);
        passIndex++;
      }
      pass.setPipeline(op.pipeline);
      pass.setBindGroup(0, op.bindGroup);
      pass.dispatchWorkgroups(op.groups[0], op.groups[1], op.groups[2]);
    } else {
      if (pass) {
        pass.end();
        pass = null;
      }
      enc.copyBufferToBuffer(op.src.buffer, op.src.offset, op.dst.buffer, op.dst.offset, op.bytes);
    }
  }
  if (pass) pass.end();
  device.queue.submit([enc.finish()]);
  const first = ops[0]!.label;
  const last = ops[ops.length - 1]!.label;
  Promise.all([device.popErrorScope(), device.popErrorScope()]).then(([oom, validation]) => {
    const error = validation ?? oom;
    if (error) {
      const where = ops.length === 1 ? first : `a submission of ${ops.length} ops (${first} ... ${last})`;
      gpu.pendingErrors.push(new GpuError(describeGpuError(error, where)));
    }
  }, () => {});
}

/**
 * Packs uniform values into a 16-byte-aligned buffer.
 *
 * @param params Values in struct order (each 4 bytes).
 * @returns The packed words.
 */
export function packParams(params: readonly Param[]): Uint32Array<ArrayBuffer> {
  const words = new Uint32Array(Math.max(4, Math.ceil(params.length / 4) * 4));
  const f = new Float32Array(words.buffer);
  params.forEach((p, i) => {
    if (typeof p === "number") words[i] = p >>> 0;
    else f[i] = p.f32;
  });
  return words;
}
