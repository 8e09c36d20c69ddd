/**
 * The one WebGPU device of the process. `getGpu()` requests the adapter once, enables the optional
 * features we use (`shader-f16`, `timestamp-query`), raises every limit we rely on to the adapter's
 * maximum, and watches for device loss and uncaptured errors so that they surface as a {@link GpuError}
 * with a message that says what to do, never as a hang or a silent wrong answer.
 *
 * @module
 */

import { GpuError } from "../errors.ts";

/** What the adapter is and what it allows, as reported by {@link adapterReport}. */
export interface AdapterReport {
  /** Vendor id or name as the driver reports it. */
  vendor: string;
  /** Architecture string (often empty on Vulkan). */
  architecture: string;
  /** Human-readable description, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)` or `NVIDIA H100 80GB HBM3`. */
  description: string;
  /** Whether this is a software (fallback) adapter such as Mesa lavapipe. */
  isFallbackAdapter: boolean;
  /** Optional features enabled on the device. */
  features: string[];
  /** The limits the device was created with (the adapter's maxima for those we raise). */
  limits: Record<string, number>;
}

/** The process-wide GPU: the device plus what we learned about it. */
export interface Gpu {
  /** The WebGPU device. */
  readonly device: GPUDevice;
  /** Adapter information. */
  readonly info: GPUAdapterInfo;
  /** Whether `shader-f16` is enabled (the f16-storage path may be used). */
  readonly hasF16: boolean;
  /** Whether `timestamp-query` is enabled (GPU timing for benchmarks). */
  readonly hasTimestamps: boolean;
  /** Device limits in force. */
  readonly limits: GPUSupportedLimits;
  /** Set once the device is lost; every later use throws. */
  lostMessage: string | null;
  /** Errors reported asynchronously (uncaptured or from error scopes), thrown at the next sync point. */
  pendingErrors: GpuError[];
}

/** Limits we raise to the adapter's maximum when creating the device. */
const RAISED_LIMITS = [
  "maxStorageBufferBindingSize",
  "maxBufferSize",
  "maxComputeWorkgroupStorageSize",
  "maxComputeInvocationsPerWorkgroup",
  "maxComputeWorkgroupSizeX",
  "maxComputeWorkgroupSizeY",
  "maxComputeWorkgroupSizeZ",
  "maxComputeWorkgroupsPerDimension",
  "maxStorageBuffersPerShaderStage",
  "maxUniformBufferBindingSize",
  "maxBindGroups",
] as const;

let gpuPromise: Promise<Gpu> | null = null;

/** Message given when no adapter is found: what to install, per platform. */
export const NO_ADAPTER_MESSAGE =
  "no WebGPU adapter: on a machine without a GPU install a software Vulkan driver " +
  "(Debian/Ubuntu: `apt-get install mesa-vulkan-drivers libvulkan1`) and set XDG_RUNTIME_DIR; with a GPU, " +
  "install its Vulkan (Linux), Metal (macOS) or D3D12 (Windows) driver. Check with `deno eval " +
  '"console.log(await navigator.gpu.requestAdapter())"`.';

/**
 * Returns the process-wide GPU, creating it on first use.
 *
 * @returns The shared {@link Gpu}.
 * @throws {GpuError} when WebGPU or an adapter is unavailable, or the device cannot be created.
 * @example Get the device and print what it is
 * ```ts ignore
 * import { adapterReport, getGpu } from "./device.ts";
 * const gpu = await getGpu();
 * console.log(adapterReport(gpu).description);
 * ```
 */
export function getGpu(): Promise<Gpu> {
  if (gpuPromise === null) {
    gpuPromise = createGpu();
    gpuPromise.catch(() => gpuPromise = null);
  }
  return gpuPromise;
}

async function createGpu(): Promise<Gpu> {
  if (typeof navigator === "undefined" || !("gpu" in navigator) || !navigator.gpu) {
    throw new GpuError("WebGPU is not available in this runtime: run promptgate with Deno 2 or newer.");
  }
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) throw new GpuError(NO_ADAPTER_MESSAGE);
  const wanted: GPUFeatureName[] = ["shader-f16", "timestamp-query"];
  const requiredFeatures = wanted.filter((f) => adapter.features.has(f));
  const requiredLimits: Record<string, number> = {};
  for (const name of RAISED_LIMITS) {
    const value = (adapter.limits as unknown as Record<string, number>)[name];
    if (typeof value === "number") requiredLimits[name] = value;
  }
  let device: GPUDevice;
  try {
    device = await adapter.requestDevice({ requiredFeatures, requiredLimits });
  } catch (e) {
    throw new GpuError(`could not create a WebGPU device on ${adapter.info.description}: ${e}`, { cause: e });
  }
  const gpu: Gpu = {
    device,
    info: adapter.info,
    hasF16: device.features.has("shader-f16"),
    hasTimestamps: device.features.has("timestamp-query"),
    limits: device.limits,
    lostMessage: null,
    pendingErrors: [],
  };
  device.lost.then((info) => {
    gpu.lostMessage =
      `the GPU device was lost (${info.reason || "unknown reason"}: ${info.message || "no message"}). ` +
      "Restart the process; if it happens again, lower --batch-size or --seq-len, pass --gradient-checkpointing" +
      ", or use --dtype f16.";
    if (gpuPromise !== null) gpuPromise = null;
  });
  device.addEventListener("uncapturederror", (event) => {
    const error = (event as GPUUncapturedErrorEvent).error;
    gpu.pendingErrors.push(new GpuError(describeGpuError(error, "an unlabelled GPU operation")));
  });
  return gpu;
}

/**
 * Turns a WebGPU error into a sentence that names the kernel (or operation) that caused it.
 *
 * @param error The WebGPU error object.
 * @param label The kernel or operation it belongs to.
 * @returns A human-readable message with advice.
 */
export function describeGpuError(error: GPUError, label: string): string {
  if (error instanceof GPUOutOfMemoryError) {
    return `out of GPU memory in ${label}: ${error.message}. Lower the batch size or sequence length, turn on gradient checkpointing, or use f16.`;
  }
  return `WebGPU error in ${label}: ${error.message}`;
}

/**
 * Throws the first pending asynchronous GPU error, or a {@link GpuError} if the device was lost.
 * Called at every sync point (readback), so errors surface where the caller waits.
 *
 * @param gpu The GPU.
 */
export function throwIfFailed(gpu: Gpu): void {
  if (gpu.lostMessage !== null) throw new GpuError(gpu.lostMessage);
  const first = gpu.pendingErrors.shift();
  if (first) {
    gpu.pendingErrors.length = 0;
    throw first;
  }
}

/**
 * Describes the adapter and device limits in one object (for logs, `run.json` and bug reports).
 *
 * @param gpu The GPU.
 * @returns Vendor, architecture, description, enabled features and limits.
 * @example Print the adapter
 * ```ts ignore
 * const gpu = await getGpu();
 * console.log(JSON.stringify(adapterReport(gpu), null, 2));
 * ```
 */
export function adapterReport(gpu: Gpu): AdapterReport {
  const limits: Record<string, number> = {};
  for (const name of RAISED_LIMITS) {
    limits[name] = (gpu.limits as unknown as Record<string, number>)[name] ?? 0;
  }
  limits.minStorageBufferOffsetAlignment = gpu.limits.minStorageBufferOffsetAlignment;
  return {
    vendor: gpu.info.vendor,
    architecture: gpu.info.architecture,
    description: gpu.info.description,
    isFallbackAdapter: (gpu.info as unknown as { isFallbackAdapter?: boolean }).isFallbackAdapter ?? false,
    features: [...gpu.device.features].sort(),
    limits,
  };
}

/**
 * Checks that a buffer of `bytes` can be created and bound, with a clear error naming what needs it.
 *
 * @param gpu The GPU.
 * @param bytes Size of the buffer.
 * @param what What the buffer holds (for the message), e.g. `the embedding (32000x2048 f32)`.
 * @param bound Whether the whole buffer must be bound at once (else it may be split into ranges).
 */
export function checkBufferFits(gpu: Gpu, bytes: number, what: string, bound = false): void {
  const maxBuffer = gpu.limits.maxBufferSize;
  const maxBinding = gpu.limits.maxStorageBufferBindingSize;
  if (bytes > maxBuffer) {
    throw new GpuError(
      `${what} needs a ${fmtBytes(bytes)} buffer but this GPU allows at most ${
        fmtBytes(maxBuffer)
      } per buffer ` +
        `(${gpu.info.description}). Use --dtype f16, a smaller batch or sequence length, or a GPU with larger limits.`,
    );
  }
  if (bound && bytes > maxBinding) {
    throw new GpuError(
      `${what} needs ${fmtBytes(bytes)} bound at once but this GPU binds at most ${fmtBytes(maxBinding)}` +
        ` (${gpu.info.description}). Use a smaller batch or sequence length, or --dtype f16.`,
    );
  }
}

/**
 * Formats a byte count for messages (`1.5 GiB`).
 *
 * @param bytes A byte count.
 * @returns The count with a binary unit.
 */
export function fmtBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(u === 0 ? 0 : 1)} ${units[u]}`;
}
