/**
 * Learning-rate schedules: a linear warmup from 0, then cosine decay to a floor or a constant rate.
 * A schedule is a pure function of the step, so a resumed run gets the same rates without saving any
 * schedule state.
 *
 * @module
 */

import { UnsupportedConfigError } from "../errors.ts";

/** Schedule kinds. */
export type ScheduleKind = "cosine" | "constant";

/** Options of {@link learningRate}. */
export interface ScheduleOptions {
  /** Peak learning rate. */
  lr: number;
  /** Steps of linear warmup (0 = none). */
  warmupSteps: number;
  /** Total optimizer steps (the cosine ends there). */
  totalSteps: number;
  /** `cosine` (default) or `constant` after warmup. */
  kind?: ScheduleKind;
  /** Floor of the cosine, as a fraction of `lr` (default 0.1). */
  minLrRatio?: number;
}

/**
 * Checks schedule options.
 *
 * @param o The options.
 * @throws {UnsupportedConfigError} On a negative or non-finite value.
 */
export function validateSchedule(o: ScheduleOptions): void {
  if (!(o.lr > 0 && Number.isFinite(o.lr))) {
    throw new UnsupportedConfigError(`--lr must be a positive number, got ${o.lr}`);
  }
  if (!Number.isInteger(o.warmupSteps) || o.warmupSteps < 0) {
    throw new UnsupportedConfigError(`--warmup-steps must be an integer ≥ 0, got ${o.warmupSteps}`);
  }
  if (!Number.isInteger(o.totalSteps) || o.totalSteps < 1) {
    throw new UnsupportedConfigError(`the total number of steps must be ≥ 1, got ${o.totalSteps}`);
  }
  const r = o.minLrRatio ?? 0.1;
  if (!(r >= 0 && r <= 1)) {
    throw new UnsupportedConfigError(`the minimum lr ratio must be in [0, 1], got ${r}`);
  }
  if (o.kind !== undefined && o.kind !== "cosine" && o.kind !== "constant") {
    throw new UnsupportedConfigError(`--schedule must be cosine or constant, got ${o.kind}`);
  }
}

/**
 * The learning rate of optimizer step `step` (1-based, as the optimizer counts): `lr·step/warmup` during
 * warmup, then `lr` (constant) or a half cosine from `lr` (first step after warmup) down to `lr·minLrRatio`
 * (step `totalSteps`).
 *
 * @param step The step about to be taken, 1-based.
 * @param o The schedule.
 * @returns The learning rate.
 * @example Warmup of 10 steps then cosine over 100
 * ```ts
 * import { learningRate } from "./schedule.ts";
 * const o = { lr: 1e-2, warmupSteps: 10, totalSteps: 100 };
 * console.log(learningRate(5, o), learningRate(11, o), learningRate(100, o)); // 0.005 0.01 0.001
 * ```
 */
export function learningRate(step: number, o: ScheduleOptions): number {
  if (o.warmupSteps > 0 && step <= o.warmupSteps) return (o.lr * step) / o.warmupSteps;
  if ((o.kind ?? "cosine") === "constant") return o.lr;
  const min = o.lr * (o.minLrRatio ?? 0.1);
  // The first step after warmup runs at the peak, the last one at the floor.
  const span = Math.max(1, o.totalSteps - o.warmupSteps - 1);
  const t = Math.min(1, Math.max(0, (step - o.warmupSteps - 1) / span));
  return min + 0.5 * (o.lr - min) * (1 + Math.cos(Math.PI * t));
}
