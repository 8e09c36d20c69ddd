/**
 * What the activation buffers of a batch shape `(B, T)` will need, checked before anything is allocated:
 * {@link checkActivationsFit} mirrors the buffers `createActivations` makes (every one is `(N, width)` with
 * N = B·T rows, f32, i32 or — activations of an f16 model — f16, rounded up to 16 bytes), compares the
 * largest against the device's per-buffer limits (activations are bound whole, so
 * `maxStorageBufferBindingSize` counts as well as `maxBufferSize`), and when it does not fit throws a
 * {@link GpuError} that says which batch size or sequence length does.
 * WebGPU does not report how much memory a device has, so the total is estimated and reported, not
 * checked. Not counted here: the logits `(N, V)` that `forward` reads back, the cross-entropy scratch
 * (`(N, chunk)`, whose chunk shrinks to fit the binding limit) and the f32 `(N, I)` scratch of an MLP backward
 * that does not fuse (`mlpGradScratch`, made only when needed).
 *
 * @module
 */

import { GpuError } from "../errors.ts";
import { fmtBytes } from "../gpu/device.ts";

/** The limits and name of a device (a `Gpu` has them). */
export interface DeviceLimits {
  /** Device limits in force. */
  readonly limits: { readonly maxBufferSize: number; readonly maxStorageBufferBindingSize: number };
  /** Adapter information (for messages). */
  readonly info: { readonly description: string };
}

/** The model sizes the activations depend on (a `ModelConfig` has them). */
export interface ActivationShapeConfig {
  /** Implementation family (`gpt2` has no gate projection). */
  readonly family: string;
  /** Hidden size C. */
  readonly hiddenSize: number;
  /** MLP size I. */
  readonly intermediateSize: number;
  /** Layers. */
  readonly numLayers: number;
  /** Query heads H. */
  readonly numHeads: number;
  /** Key/value heads. */
  readonly numKvHeads: number;
  /** Head size D. */
  readonly headDim: number;
}

/** The estimate of one batch shape's activation buffers. */
export interface ActivationEstimate {
  /** Rows, B·T. */
  rows: number;
  /** Bytes of all buffers together. */
  totalBytes: number;
  /** The largest buffer: its label and bytes. */
  largest: { label: string; bytes: number };
  /** Most rows (B·T) whose largest buffer fits the per-buffer limits. */
  maxRows: number;
}

function bufferBytes(elements: number, elementBytes: number): number {
  return Math.max(16, Math.ceil((elements * elementBytes) / 16) * 16);
}

/** One buffer of `createActivations`: `rows·perRow + fixed` elements of `bytes` each. */
interface BufferShape {
  label: string;
  perRow: number;
  fixed: number;
  bytes: number;
}

/** Buffers of `createActivations` (activations in `act` bytes per element, the rest in 4). */
function activationBuffers(
  c: ActivationShapeConfig,
  training: boolean,
  saveFrom: number,
  act: number,
  checkpoint: boolean,
): BufferShape[] {
  const C = c.hiddenSize, H = c.numHeads, HD = c.numHeads * c.headDim, KV = c.numKvHeads * c.headDim;
  const I = c.intermediateSize;
  const L = c.numLayers;
  const from = training ? Math.max(0, Math.min(saveFrom, L)) : L;
  const out: BufferShape[] = [];
  // row/fixed: 4-byte buffers (statistics, ids, loss, gradients); arow/afixed: activations
  const row = (label: string, perRow: number, bytes = 4): void =>
    void out.push({ label, perRow, fixed: 0, bytes });
  const fixed = (label: string, n: number, bytes = 4): void =>
    void out.push({ label, perRow: 0, fixed: n, bytes });
  const arow = (label: string, perRow: number): void => row(label, perRow, act);
  const layerSet = (p: string): void => {
    for (const n of ["rstd1", "mean1", "rstd2", "mean2"]) row(`${p}.${n}`, 1);
    arow(`${p}.q`, HD);
    arow(`${p}.k`, KV);
    arow(`${p}.v`, KV);
    arow(`${p}.attn`, HD);
    row(`${p}.lse`, H); // (B, H, T)
    arow(`${p}.x2`, C);
    if (c.family === "gpt2") fixed(`${p}.g`, I, act);
    else arow(`${p}.g`, I);
    arow(`${p}.u`, I);
  };
  arow("resid.ping", C);
  arow("resid.pong", C);
  // gradient checkpointing: the saved layers keep their input only and share one set with the others
  const ckpt = training && checkpoint;
  if (from > 0 || (ckpt && from < L)) layerSet("shared");
  for (let l = from; l < L; l++) {
    arow(`layer${l}.x`, C);
    if (!ckpt) layerSet(`layer${l}`);
  }
  for (const n of ["ids", "positions", "mask", "labels", "rstdF", "meanF"]) row(n, 1);
  for (const n of ["xFinal", "hFinal", "h"]) arow(n, C);
  fixed("loss", 1);
  arow("adp", Math.max(HD, C));
  arow("a", I);
  const grads: [string, number][] = [
    ["d.res", C],
    ["d.h", C],
    ["d.attn", Math.max(HD, C)],
    ["d.q", HD],
    ["d.k", KV],
    ["d.v", KV],
    ["d.g", I],
    ["d.u", I],
  ];
  for (const [label, w] of grads) {
    if (!training) fixed(label, 1);
    else if (label === "d.g" && c.family === "gpt2") fixed(label, I); // gpt2 has no gate: one row
    else row(label, w);
  }
  return out;
}

/**
 * Estimates the activation buffers of a batch shape and checks that each one fits the device's limits,
 * before any is allocated.
 *
 * @param gpu The device (its `limits` and `info`).
 * @param config The model's sizes.
 * @param B Batch size (rows per step).
 * @param T Sequence length.
 * @param training Whether layers from `saveFrom` up keep activations and gradient buffers exist.
 * @param saveFrom Lowest layer whose activations are kept (the lowest adapted layer).
 * @param dtype Element type of the activations (statistics and gradients are f32 either way).
 * @param checkpoint Gradient checkpointing (training only): saved layers keep only their input.
 * @returns The estimate (total bytes, largest buffer, most rows that fit).
 * @throws {GpuError} When the largest buffer exceeds `maxBufferSize` or `maxStorageBufferBindingSize`; the
 *   message names the buffer and the batch size and sequence length that would fit.
 * @example A 7B-sized llama, batch 8 × 2048 tokens, on a device that binds 128 MiB
 * ```ts
 * import { checkActivationsFit } from "./memory.ts";
 * const gpu = {
 *   limits: { maxBufferSize: 2 ** 30, maxStorageBufferBindingSize: 2 ** 27 },
 *   info: { description: "example" },
 * };
 * const config = {
 *   family: "llama", hiddenSize: 4096, intermediateSize: 11008, numLayers: 32, numHeads: 32,
 *   numKvHeads: 32, headDim: 128,
 * };
 * try {
 *   checkActivationsFit(gpu, config, 8, 2048, true, 24);
 * } catch (e) {
 *   console.log((e as Error).message); // … use --batch-size 1 at --seq-len 2048, or --seq-len 381 at --batch-size 8 …
 * }
 * console.log(checkActivationsFit(gpu, config, 1, 2048, true, 24).maxRows); // 3048
 * ```
 */
export function checkActivationsFit(
  gpu: DeviceLimits,
  config: ActivationShapeConfig,
  B: number,
  T: number,
  training: boolean,
  saveFrom: number,
  dtype: "f32" | "f16" = "f32",
  checkpoint = false,
): ActivationEstimate {
  if (!(Number.isInteger(B) && B >= 1 && Number.isInteger(T) && T >= 1)) {
    throw new GpuError(`batch size and sequence length must be positive integers, got ${B} × ${T}`);
  }
  const N = B * T;
  const buffers = activationBuffers(config, training, saveFrom, dtype === "f16" ? 2 : 4, checkpoint);
  let totalBytes = 0;
  let largest = { label: "", bytes: 0 };
  let widest = { perRow: 1, bytes: 4 }; // the most bytes per row
  for (const b of buffers) {
    const bytes = bufferBytes(N * b.perRow + b.fixed, b.bytes);
    totalBytes += bytes;
    if (bytes > largest.bytes) largest = { label: b.label, bytes };
    if (b.perRow * b.bytes > widest.perRow * widest.bytes) widest = b;
  }
  const limit = Math.min(gpu.limits.maxBufferSize, gpu.limits.maxStorageBufferBindingSize);
  const maxRows = Math.floor(limit / (widest.perRow * widest.bytes));
  const estimate = { rows: N, totalBytes, largest, maxRows };
  if (largest.bytes <= limit) return estimate;
  const which = gpu.limits.maxStorageBufferBindingSize <= gpu.limits.maxBufferSize
    ? "maxStorageBufferBindingSize"
    : "maxBufferSize";
  const options: string[] = [];
  if (Math.floor(maxRows / T) >= 1) options.push(`--batch-size ${Math.floor(maxRows / T)} at --seq-len ${T}`);
  if (Math.floor(maxRows / B) >= 1) options.push(`--seq-len ${Math.floor(maxRows / B)} at --batch-size ${B}`);
  if (options.length === 0) options.push(`--batch-size 1 and --seq-len ${maxRows}`);
  throw new GpuError(
    `a batch of ${B} × ${T} tokens needs a ${fmtBytes(largest.bytes)} activation buffer (${largest.label}, ` +
      `${N} rows × ${widest.perRow} ${
        widest.bytes === 2 ? "f16" : "f32"
      }) but ${gpu.info.description} allows at most ${fmtBytes(limit)} per buffer ` +
      `(${which}); all activations would take ${fmtBytes(totalBytes)}. At most ${maxRows} tokens per step ` +
      `fit: use ${options.join(", or ")} (--grad-accum does not help: it runs as one larger batch)`,
  );
}
