/**
 * GPU timing for benchmarks and profiles, from timestamp queries where the device has them. A single
 * dispatch followed by a readback measures the ~10 ms readback, not the kernel; these helpers instead
 * submit many repetitions in one pass and read the two timestamps around them once.
 *
 * @module
 */

import type { Gpu } from "./device.ts";
import { type Op, runOps } from "./recorder.ts";
import { readBytes } from "./tensor.ts";

/**
 * Measures the GPU time of `ops`, repeated `repeats` times inside one compute pass.
 * Uses timestamp queries when available, else wall time around `onSubmittedWorkDone`.
 *
 * @param gpu The GPU.
 * @param ops Operations (dispatches only, so they share one pass).
 * @param repeats How many times to repeat them in the submission.
 * @returns Milliseconds per repetition and whether timestamps were used.
 */
export async function timeOps(
  gpu: Gpu,
  ops: readonly Op[],
  repeats: number,
): Promise<{ ms: number; timestamps: boolean }> {
  const all: Op[] = [];
  for (let r = 0; r < repeats; r++) all.push(...ops);
  if (!gpu.hasTimestamps) {
    await gpu.device.queue.onSubmittedWorkDone();
    const t0 = performance.now();
    runOps(gpu, all);
    await gpu.device.queue.onSubmittedWorkDone();
    return { ms: (performance.now() - t0) / repeats, timestamps: false };
  }
  const querySet = gpu.device.createQuerySet({ type: "timestamp", count: 2 });
  const resolve = gpu.device.createBuffer({
    size: 16,
    usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
  });
  try {
    runOps(gpu, all, querySet);
    const enc = gpu.device.createCommandEncoder();
    enc.resolveQuerySet(querySet, 0, 2, resolve, 0);
    gpu.device.queue.submit([enc.finish()]);
    const bytes = await readBytes(gpu, resolve, 0, 16, "timestamps");
    const t = new BigUint64Array(bytes.buffer);
    const ns = Number(t[1]! - t[0]!);
    return { ms: ns / 1e6 / repeats, timestamps: true };
  } finally {
    querySet.destroy();
    resolve.destroy();
  }
}

/** GPU time of one kernel in a profile. */
export interface ProfileRow {
  /** Kernel key. */
  label: string;
  /** How many dispatches of it. */
  count: number;
  /** Total milliseconds. */
  ms: number;
}

/**
 * Per-kernel GPU-time profile: each dispatch gets its own pass with timestamps (slower than the real
 * run, but shows where the time goes). Rows are summed by kernel and sorted by time.
 *
 * @param gpu The GPU (needs `timestamp-query`).
 * @param ops The operations of one step.
 * @param groupBy The row a dispatch label counts in (default: the kernel name, before the first `|`).
 * @returns Rows by kernel, largest first.
 */
export async function profileOps(
  gpu: Gpu,
  ops: readonly Op[],
  groupBy: (label: string) => string = (label) => label.split("|")[0]!,
): Promise<ProfileRow[]> {
  const dispatches = ops.filter((o) => o.kind === "dispatch");
  if (!gpu.hasTimestamps || dispatches.length === 0) return [];
  const n = dispatches.length;
  const querySet = gpu.device.createQuerySet({ type: "timestamp", count: 2 * n });
  const resolve = gpu.device.createBuffer({
    size: 16 * n,
    usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
  });
  try {
    const enc = gpu.device.createCommandEncoder({ label: "profile" });
    dispatches.forEach((op, i) => {
      if (op.kind !== "dispatch") return;
      const pass = enc.beginComputePass({
        timestampWrites: { querySet, beginningOfPassWriteIndex: 2 * i, endOfPassWriteIndex: 2 * i + 1 },
      });
      pass.setPipeline(op.pipeline);
      pass.setBindGroup(0, op.bindGroup);
      pass.dispatchWorkgroups(...op.groups);
      pass.end();
    });
    enc.resolveQuerySet(querySet, 0, 2 * n, resolve, 0);
    gpu.device.queue.submit([enc.finish()]);
    const t = new BigUint64Array((await readBytes(gpu, resolve, 0, 16 * n, "profile")).buffer);
    const rows = new Map<string, ProfileRow>();
    dispatches.forEach((op, i) => {
      const label = groupBy(op.label);
      const row = rows.get(label) ?? { label, count: 0, ms: 0 };
      row.count++;
      row.ms += Number(t[2 * i + 1]! - t[2 * i]!) / 1e6;
      rows.set(label, row);
    });
    return [...rows.values()].sort((a, b) => b.ms - a.ms);
  } finally {
    querySet.destroy();
    resolve.destroy();
  }
}

/** Settings of {@link timeOpsWarm}. */
export interface WarmTimingOptions {
  /** GPU milliseconds of warm-up before timing (default 60: a GPU at idle clocks needs it). */
  warmMs?: number;
  /** GPU milliseconds each timed window covers at least (default 15). */
  windowMs?: number;
  /** Timed windows; the median is returned (default 3). */
  windows?: number;
  /** Upper bound of repetitions in one window (default 4000). */
  maxRepeats?: number;
}

/**
 * Median GPU time of `ops` after a warm-up: a GPU idles at a low clock (an H200 at 345 MHz, 1980 MHz
 * under load) and a few repetitions right after an idle gap measure the ramp, not the kernel. Runs `ops`
 * once (compiling pipelines), then for `warmMs`, then `windows` windows of at least `windowMs` each.
 *
 * @param gpu The GPU.
 * @param ops Operations (dispatches only).
 * @param options Warm-up and window lengths.
 * @returns Median milliseconds per repetition and whether timestamps were used.
 * @example Time one recorded matmul
 * ```ts ignore
 * const rec = new Recorder(gpu);
 * linearForward(rec, out, x, w, null);
 * const { ms } = await timeOpsWarm(gpu, rec.take());
 * ```
 */
export async function timeOpsWarm(
  gpu: Gpu,
  ops: readonly Op[],
  options: WarmTimingOptions = {},
): Promise<{ ms: number; timestamps: boolean }> {
  const { warmMs = 60, windowMs = 15, windows = 3, maxRepeats = 4000 } = options;
  const first = await timeOps(gpu, ops, 1);
  const warm = await timeOps(
    gpu,
    ops,
    Math.min(maxRepeats, Math.max(2, Math.ceil(warmMs / Math.max(first.ms, 1e-3)))),
  );
  const repeats = Math.min(maxRepeats, Math.max(3, Math.ceil(windowMs / Math.max(warm.ms, 1e-3))));
  const samples: number[] = [];
  let timestamps = warm.timestamps;
  for (let i = 0; i < windows; i++) {
    const r = await timeOps(gpu, ops, repeats);
    samples.push(r.ms);
    timestamps = r.timestamps;
  }
  samples.sort((a, b) => a - b);
  return { ms: samples[Math.floor(samples.length / 2)]!, timestamps };
}
