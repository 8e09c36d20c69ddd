/**
 * AdamW on the active adapter, PyTorch semantics (bias correction, decoupled weight decay, eps outside
 * the square root), with optional global gradient-norm clipping. A step is one submission: forward,
 * loss, backward, gradient norm and the fused AdamW update over the adapter's flat buffer. The step
 * counter and learning rate live in a small GPU buffer written before each submission, so no pipeline,
 * bind group or uniform changes between steps: the optimizer records a step once and replays the
 * recording while batches keep their shape and mask pattern (only the token ids, mask and labels are
 * uploaded), which takes the host's recording work (24 ms a step for SmolLM2-135M on the H100 machine's
 * CPU) out of every step but the first.
 *
 * @module
 */

import { type Op, Recorder, runOps } from "../gpu/recorder.ts";
import { createTensor, readF32, type Tensor, writeTensor } from "../gpu/tensor.ts";
import { adamwStep, gradNormSquared } from "../../kernels/adamw.ts";
import { fill } from "../../kernels/fill.ts";
import { getAdapter } from "../adapters/manage.ts";
import type { AdapterState } from "../adapters/state.ts";
import { UnsupportedConfigError } from "../errors.ts";
import type { Model } from "../models/model.ts";
import type { Batch } from "../models/transformer.ts";
import { recordTrainingStep, type TrainingBatch, uploadTrainingBatch } from "../models/run.ts";

/** AdamW settings. */
export interface OptimizerOptions {
  /** Learning rate. */
  lr: number;
  /** (beta1, beta2), default (0.9, 0.999) as torch. */
  betas?: [number, number];
  /** Default 1e-8. */
  eps?: number;
  /** Decoupled weight decay, default 0.01 as torch's AdamW. */
  weightDecay?: number;
  /** Clip the global gradient norm to this (0 = off, the default). */
  maxGradNorm?: number;
  /**
   * Replay the recorded step while the batch shape and mask pattern stay the same (default true); false
   * records every step anew (same results, more host time). A recording keeps the kernel choices of the
   * moment it was made (`attentionTuning`, `matmulTuning`, ...): benchmarks that change them between steps
   * create a new optimizer or pass false.
   */
  replay?: boolean;
}

/** How many training steps optimizers have recorded in this process (tests check that steps replay). */
export let stepsRecorded = 0;

/** An optimizer bound to one adapter. */
export interface Optimizer {
  /** One training step on a batch; resolves to the loss before the update. */
  step(batch: Batch): Promise<number>;
  /**
   * Records and submits one step without waiting; returns the loss tensor to read later. The caller
   * must read or discard it before the next step overwrites it.
   */
  stepAsync(batch: Batch): Tensor;
  /** Steps taken so far. */
  readonly steps: number;
  /** Learning rate for the next steps (schedules set it). */
  lr: number;
  /** The adapter being trained. */
  readonly adapter: AdapterState;
  /** Reads the optimizer state (moments and step) for checkpoints. */
  saveState(): Promise<{ step: number; m: Float32Array; v: Float32Array }>;
  /** Restores a saved state. */
  loadState(s: { step: number; m: Float32Array; v: Float32Array }): void;
}

/**
 * Creates an AdamW optimizer over the active adapter's parameters.
 *
 * @param model The model with an active adapter.
 * @param options Learning rate, betas, eps, weight decay, gradient clipping.
 * @returns The optimizer.
 * @example Five steps on one batch
 * ```ts ignore
 * const opt = createOptimizer(model, { lr: 1e-2 });
 * for (let i = 0; i < 5; i++) console.log(await opt.step({ inputIds: ids, labels: ids }));
 * ```
 */
export function createOptimizer(model: Model, options: OptimizerOptions): Optimizer {
  const adapter = getAdapter(model);
  const [b1, b2] = options.betas ?? [0.9, 0.999];
  const eps = options.eps ?? 1e-8;
  const wd = options.weightDecay ?? 0.01;
  const clip = options.maxGradNorm ?? 0;
  for (const [k, v] of Object.entries({ lr: options.lr, beta1: b1, beta2: b2, eps, weightDecay: wd, clip })) {
    if (!Number.isFinite(v) || v < 0) {
      throw new UnsupportedConfigError(`optimizer ${k} must be a finite number ≥ 0`);
    }
  }
  if (b1 >= 1 || b2 >= 1) throw new UnsupportedConfigError("optimizer betas must be below 1");
  const gpu = model.gpu;
  adapter.m ??= createTensor(gpu, [adapter.size], "f32", `adapter ${adapter.name} adam m`);
  adapter.v ??= createTensor(gpu, [adapter.size], "f32", `adapter ${adapter.name} adam v`);
  const hyper = createTensor(gpu, [8], "f32", "adamw hyper");
  const normSq = createTensor(gpu, [1], "f32", "grad norm²");
  {
    const rec = new Recorder(gpu);
    fill(rec, adapter.m, 0);
    fill(rec, adapter.v, 0);
    rec.submit();
  }
  let steps = 0;
  // the recorded step and what it was recorded for: replayed while all of it is the same
  let recorded: { ops: Op[]; deps: unknown[] } | null = null;
  const depsOf = (
    t: TrainingBatch,
  ) => [t.acts, t.adapter, t.masked, adapter.params, adapter.grads, adapter.m, adapter.v];
  const opt: Optimizer = {
    lr: options.lr,
    get steps() {
      return steps;
    },
    adapter,
    stepAsync(batch: Batch): Tensor {
      if (model.adapters.get(adapter.name) !== adapter || model.active !== adapter.name) {
        throw new UnsupportedConfigError(
          `this optimizer trains adapter "${adapter.name}", which is no longer the active adapter`,
        );
      }
      const uploaded = uploadTrainingBatch(model, batch);
      steps++;
      writeTensor(gpu, hyper, new Float32Array([opt.lr, b1, b2, eps, wd, steps, clip, 0]));
      const deps = depsOf(uploaded);
      if (!recorded || options.replay === false || deps.some((d, i) => d !== recorded!.deps[i])) {
        const rec = new Recorder(gpu);
        recordTrainingStep(rec, model, uploaded);
        if (clip > 0) gradNormSquared(rec, normSq, adapter.grads!);
        adamwStep(rec, {
          param: adapter.params,
          grad: adapter.grads!,
          m: adapter.m!,
          v: adapter.v!,
          hyper,
          ...(clip > 0 ? { gradNormSq: normSq } : {}),
        });
        // adapter.grads exists once a step has been recorded
        recorded = { ops: rec.take(), deps: depsOf(uploaded) };
        stepsRecorded++;
      }
      runOps(gpu, recorded.ops);
      adapter.version++;
      return uploaded.acts.loss;
    },
    async step(batch: Batch): Promise<number> {
      const loss = opt.stepAsync(batch);
      return (await readF32(gpu, loss))[0]!;
    },
    async saveState() {
      return { step: steps, m: await readF32(gpu, adapter.m!), v: await readF32(gpu, adapter.v!) };
    },
    loadState(s) {
      steps = s.step;
      writeTensor(gpu, adapter.m!, s.m);
      writeTensor(gpu, adapter.v!, s.v);
    },
  };
  return opt;
}
