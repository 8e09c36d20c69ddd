/**
 * Kernels and the pipeline cache. A kernel is a small typed description — a name, the options that
 * change its WGSL text, its bindings in order, and a function that returns the WGSL — in the manner of
 * tfjs-backend-webgpu's programs. Sizes go in a uniform (always the last binding), so one pipeline serves
 * every shape. Pipelines are compiled once per process, keyed by `name|option=value|...`, with explicit
 * bind group layouts (never `layout: "auto"`) and labelled with the key so that errors name the kernel.
 *
 * @module
 */

import { describeGpuError, type Gpu } from "./device.ts";
import { GpuError } from "../errors.ts";

/** How a kernel binds one buffer: read-only storage, read-write storage, or the uniform of sizes. */
export type BindingKind = "read" | "write" | "uniform";

/** A compute kernel description. Build one with {@link defineKernel}. */
export interface Kernel {
  /** Operation name, e.g. `matmul_linear`. */
  readonly name: string;
  /** Cache key: the name plus every option that changes the WGSL text. */
  readonly key: string;
  /** Bindings of group 0, in binding order; a `"uniform"` binding must be last. */
  readonly bindings: readonly BindingKind[];
  /** The WGSL source. */
  readonly code: string;
  /** Entry point (default `main`). */
  readonly entryPoint: string;
}

/**
 * Defines a kernel. The key is derived from the name and options, so two calls with the same options
 * share one compiled pipeline.
 *
 * @param name Operation name.
 * @param options Options that change the WGSL (tile sizes, dtype, flags).
 * @param bindings Binding kinds in order (uniform last).
 * @param code Returns the WGSL for these options.
 * @returns The kernel description.
 * @example A kernel that doubles a vector
 * ```ts ignore
 * const double = defineKernel("double", {}, ["read", "write", "uniform"], () => `
 *   @group(0) @binding(0) var<storage, read> x: array<f32>;
 *   @group(0) @binding(1) var<storage, read_write> y: array<f32>;
 *   struct P { n: u32 }
 *   @group(0) @binding(2) var<uniform> p: P;
 *   @compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3u) {
 *     if (g.x < p.n) { y[g.x] = 2.0 * x[g.x]; }
 *   }`);
 * ```
 */
export function defineKernel(
  name: string,
  options: Record<string, string | number | boolean>,
  bindings: readonly BindingKind[],
  code: () => string,
  entryPoint = "main",
): Kernel {
  const opts = Object.keys(options).sort().map((k) => `${k}=${options[k]}`);
  const key = [name, ...opts].join("|");
  const cached = kernelCache.get(key);
  if (cached) return cached;
  const uniformAt = bindings.indexOf("uniform");
  if (uniformAt !== -1 && uniformAt !== bindings.length - 1) {
    throw new GpuError(`kernel ${key}: the uniform binding must be the last one`);
  }
  const kernel: Kernel = { name, key, bindings, code: code(), entryPoint };
  kernelCache.set(key, kernel);
  return kernel;
}

const kernelCache = new Map<string, Kernel>();

/** A compiled kernel: its pipeline and bind group layout. */
export interface CompiledKernel {
  /** The compute pipeline. */
  readonly pipeline: GPUComputePipeline;
  /** Layout of bind group 0. */
  readonly layout: GPUBindGroupLayout;
}

const pipelineCaches = new WeakMap<GPUDevice, Map<string, CompiledKernel>>();

/** How many pipelines have been compiled in this process (a cache test checks it). */
export let pipelinesCompiled = 0;

/**
 * Returns the compiled pipeline of a kernel, compiling it on first use. Compilation errors are reported
 * asynchronously and thrown at the next sync point with the kernel's key in the message; call
 * {@link compileKernel} to wait for them.
 *
 * @param gpu The GPU.
 * @param kernel The kernel.
 * @returns Pipeline and layout.
 */
export function getPipeline(gpu: Gpu, kernel: Kernel): CompiledKernel {
  let cache = pipelineCaches.get(gpu.device);
  if (!cache) {
    cache = new Map();
    pipelineCaches.set(gpu.device, cache);
  }
  const hit = cache.get(kernel.key);
  if (hit) return hit;
  const device = gpu.device;
  device.pushErrorScope("validation");
  device.pushErrorScope("out-of-memory");
  const module = device.createShaderModule({ code: kernel.code, label: kernel.key });
  const layout = device.createBindGroupLayout({
    label: kernel.key,
    entries: kernel.bindings.map((kind, binding) => ({
      binding,
      visibility: GPUShaderStage.COMPUTE,
      buffer: { type: kind === "read" ? "read-only-storage" : kind === "write" ? "storage" : "uniform" },
    })),
  });
  const pipeline = device.createComputePipeline({
    label: kernel.key,
    layout: device.createPipelineLayout({ bindGroupLayouts: [layout], label: kernel.key }),
    compute: { module, entryPoint: kernel.entryPoint },
  });
  const compiled = { pipeline, layout };
  const done = Promise.all([device.popErrorScope(), device.popErrorScope()]).then(
    async ([oom, validation]) => {
      const error = validation ?? oom;
      if (!error) return;
      let detail = "";
      try {
        const info = await module.getCompilationInfo();
        detail = info.messages.map((m) => `\n  line ${m.lineNum}:${m.linePos} ${m.type}: ${m.message}`).join(
          "",
        );
      } catch { /* compilation info is optional */ }
      const e = new GpuError(`${describeGpuError(error, `kernel ${kernel.key}`)}${detail}`);
      gpu.pendingErrors.push(e);
      throw e;
    },
  );
  compileChecks.set(compiled, done);
  done.catch(() => {}); // reported through pendingErrors
  cache.set(kernel.key, compiled);
  pipelinesCompiled++;
  return compiled;
}

const compileChecks = new WeakMap<CompiledKernel, Promise<void>>();

/**
 * Compiles a kernel and waits until the driver has accepted it.
 *
 * @param gpu The GPU.
 * @param kernel The kernel.
 * @throws {GpuError} naming the kernel when its WGSL does not compile or validate.
 */
export async function compileKernel(gpu: Gpu, kernel: Kernel): Promise<void> {
  const compiled = getPipeline(gpu, kernel);
  await compileChecks.get(compiled);
}

/** The WGSL element type of an activation tensor: f32 (the exact path) or f16 (storage only). */
export type ActivationType = "f32" | "f16";

/**
 * The WGSL element type an activation tensor is read or written as. Activations may be f32 or f16;
 * kernels load f16 into f32 at once, compute in f32 and round at the store, so f16 changes storage only.
 *
 * @param gpu The GPU (f16 needs its `shader-f16` feature).
 * @param t The activation tensor.
 * @param what The kernel and argument, for the message.
 * @returns `"f32"` or `"f16"`.
 * @throws {GpuError} when the tensor is neither, or is f16 on a GPU without `shader-f16`.
 * @example
 * ```ts ignore
 * const xt = activationType(rec.gpu, x, "rmsnormForward x");
 * const kernel = defineKernel("rmsnorm_forward", { xt }, bindings, () => `
 * ${enableF16(xt)}
 * @group(0) @binding(0) var<storage, read> x: array<${xt}>;
 * ...let v = f32(x[i]);...`);
 * ```
 */
export function activationType(gpu: Gpu, t: { dtype: string; label: string }, what: string): ActivationType {
  if (t.dtype === "f32") return "f32";
  if (t.dtype !== "f16") throw new GpuError(`${what}: ${t.label} must be f32 or f16, got ${t.dtype}`);
  if (!gpu.hasF16) {
    throw new GpuError(
      `${what}: ${t.label} is f16 but this GPU lacks shader-f16; use f32 activations (load the model as f32)`,
    );
  }
  return "f16";
}

/**
 * The WGSL `enable f16;` directive when any of the given element types is f16, else nothing.
 *
 * @param types WGSL element types used by a kernel.
 * @returns The directive line (with its newline) or `""`, so f32 WGSL stays unchanged.
 */
export function enableF16(...types: string[]): string {
  return types.includes("f16") ? "enable f16;\n" : "";
}

/**
 * `[0, 1, ..., n - 1]`: the indices a WGSL generator unrolls over.
 *
 * @param n How many.
 * @returns The indices.
 */
export function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
}
