/**
 * What every kernel benchmark shares: whether to run the real model shapes (`PROMPTGATE_BENCH_FULL=1`,
 * the default on a real GPU; a fallback adapter such as lavapipe gets small stand-ins) and how long to
 * warm up and time (longer on a real GPU, whose clock ramps up from idle).
 *
 * @module
 */

import { adapterReport, type Gpu } from "../src/gpu/device.ts";
import type { WarmTimingOptions } from "../src/gpu/timing.ts";

/**
 * Whether to run the full model shapes.
 *
 * @param gpu The GPU.
 * @returns `PROMPTGATE_BENCH_FULL` when set (`1` = yes), else whether the adapter is a real GPU.
 */
export function benchFull(gpu: Gpu): boolean {
  const env = Deno.env.get("PROMPTGATE_BENCH_FULL");
  return env === undefined ? !adapterReport(gpu).isFallbackAdapter : env === "1";
}

/**
 * Warm-up and window lengths for `timeOpsWarm`: 60 ms / 15 ms on a real GPU, 5 ms / 2 ms on a CPU device.
 *
 * @param full Whether the full shapes run (a real GPU).
 * @returns The timing options.
 */
export function warmTiming(full: boolean): WarmTimingOptions {
  return full ? { warmMs: 60, windowMs: 15 } : { warmMs: 5, windowMs: 2 };
}

/**
 * `n` floats uniform in [-1, 1) from a linear congruential generator seeded with `seed`: the same inputs on
 * every run and machine, so timings compare across commits.
 *
 * @param n How many.
 * @param seed The seed.
 * @returns The floats.
 */
export function seededUniform(n: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    a[i] = (s / 4294967296 - 0.5) * 2;
  }
  return a;
}
