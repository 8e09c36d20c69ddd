/**
 * `forward` and `lossAndGradients`: one submission each, one readback of exactly what the caller asked
 * for (logits and loss; loss and the adapter's gradients).
 *
 * @module
 */

import { Recorder } from "../gpu/recorder.ts";
import { createTensor, readF32, type Tensor } from "../gpu/tensor.ts";
import { AdapterError } from "../errors.ts";
import { splitFlat } from "../adapters/manage.ts";
import type { AdapterState } from "../adapters/state.ts";
import type { Activations } from "./activations.ts";
import { type Model, runningAdapter } from "./model.ts";
import {
  activationsFor,
  type Batch,
  prepareBatch,
  recordBackward,
  recordForward,
  uploadBatch,
} from "./transformer.ts";

/** What {@link forward} returns. */
export interface ForwardResult {
  /** Logits, row-major `[B, T, V]`. */
  logits: Float32Array;
  /** `[B, T, V]`. */
  shape: [number, number, number];
  /** HF causal-LM loss when labels were given. */
  loss?: number;
}

const logitBuffers = new WeakMap<Activations, Tensor>();

/**
 * Runs the model (with the active adapter unless disabled) on a batch.
 *
 * @param model The model.
 * @param batch Token ids, optional attention mask and labels.
 * @returns Logits `[B, T, V]` and, with labels, the loss.
 * @example Logits of one sequence
 * ```ts ignore
 * const { logits, shape } = await forward(model, { inputIds: [[1, 2, 3]] });
 * ```
 */
export async function forward(model: Model, batch: Batch): Promise<ForwardResult> {
  const p = prepareBatch(model, batch);
  const acts = activationsFor(model, p.B, p.T, false);
  let logits = logitBuffers.get(acts);
  if (!logits) {
    logits = createTensor(model.gpu, [p.B * p.T, model.config.vocabSize], "f32", "logits");
    logitBuffers.set(acts, logits);
  }
  uploadBatch(model, acts, p);
  const rec = new Recorder(model.gpu);
  const adapter = runningAdapter(model);
  recordForward(rec, model, acts, {
    adapter,
    // the adapter's keys and values once per adapter version, as decode does (training recomputes them)
    adapterKeyValues: adapter !== null && adapter.kvVersion !== adapter.version,
    masked: p.masked,
    head: { logits, loss: p.labels !== null },
  });
  rec.submit();
  if (adapter) adapter.kvVersion = adapter.version;
  const out = await readF32(model.gpu, logits);
  const result: ForwardResult = { logits: out, shape: [p.B, p.T, model.config.vocabSize] };
  if (p.labels) result.loss = (await readF32(model.gpu, acts.loss))[0]!;
  return result;
}

/**
 * The HF causal-LM loss of a batch, without materialising its `[B, T, V]` logits (the LM head and the
 * cross-entropy run in vocabulary chunks): what evaluation needs, at a fraction of `forward`'s memory.
 *
 * @param model The model (with the active adapter unless disabled).
 * @param batch Token ids, mask and labels.
 * @returns The mean loss over the counted (label ≠ -100) tokens.
 * @example Eval loss of one row
 * ```ts ignore
 * const l = await loss(model, { inputIds: [ids], labels: [ids] });
 * ```
 */
export async function loss(model: Model, batch: Batch): Promise<number> {
  const p = prepareBatch(model, batch);
  if (!p.labels) throw new AdapterError("loss needs labels (use the input ids, -100 where ignored)");
  const acts = activationsFor(model, p.B, p.T, false);
  uploadBatch(model, acts, p);
  const rec = new Recorder(model.gpu);
  recordForward(rec, model, acts, { adapter: runningAdapter(model), masked: p.masked, head: { loss: true } });
  rec.submit();
  return (await readF32(model.gpu, acts.loss))[0]!;
}

/**
 * Records forward + loss + backward of the running adapter for a batch (no submit). Shared by
 * {@link lossAndGradients} and the optimizer's step.
 *
 * @param rec The recorder.
 * @param model The model.
 * @param batch The batch (labels required).
 * @returns The activations (their `loss` holds the mean loss once submitted).
 */
export function recordLossAndGradients(rec: Recorder, model: Model, batch: Batch): Activations {
  const step = uploadTrainingBatch(model, batch);
  recordTrainingStep(rec, model, step);
  return step.acts;
}

/** A training batch uploaded into its activation buffers: what recording its step depends on. */
export interface TrainingBatch {
  /** The activation buffers of the batch shape (the ids, mask and labels now in them). */
  acts: Activations;
  /** The running adapter. */
  adapter: AdapterState;
  /** Whether some position is padding (the attention then reads the mask). */
  masked: boolean;
}

/**
 * Checks a training batch and writes its ids, mask and labels into the activation buffers of its shape
 * (cached on the model). The step {@link recordTrainingStep} records for it depends only on the returned
 * fields (and the model), not on the token values, so a recording may be replayed for another batch of
 * the same shape and mask pattern.
 *
 * @param model The model (with a running adapter).
 * @param batch The batch (labels required).
 * @returns The activation buffers, the running adapter and whether the batch has padding.
 */
export function uploadTrainingBatch(model: Model, batch: Batch): TrainingBatch {
  const adapter = runningAdapter(model);
  if (!adapter) {
    throw new AdapterError(
      model.disabled
        ? "adapters are disabled: call enableAdapters(model) before computing adapter gradients"
        : "no adapter is active: add one with addAdaptionPrompt or loadAdapter",
    );
  }
  const p = prepareBatch(model, batch);
  if (!p.labels) {
    throw new AdapterError("a training batch needs labels (use the input ids, -100 where ignored)");
  }
  const acts = activationsFor(model, p.B, p.T, true);
  uploadBatch(model, acts, p);
  return { acts, adapter, masked: p.masked };
}

/**
 * Records forward + loss + backward of an uploaded training batch (no submit).
 *
 * @param rec The recorder.
 * @param model The model.
 * @param step What {@link uploadTrainingBatch} returned.
 */
export function recordTrainingStep(rec: Recorder, model: Model, step: TrainingBatch): void {
  const { acts, adapter, masked } = step;
  recordForward(rec, model, acts, { adapter, masked, head: { lossGradient: true } });
  recordBackward(rec, model, acts, adapter, masked);
}

/**
 * The loss and the gradient of every adapter parameter, keyed by PEFT's parameter names.
 *
 * @param model The model (with an active adapter).
 * @param batch Token ids, mask and labels.
 * @returns `{ loss, gradients }`.
 */
export async function lossAndGradients(
  model: Model,
  batch: Batch,
): Promise<{ loss: number; gradients: Record<string, Float32Array> }> {
  const rec = new Recorder(model.gpu);
  const acts = recordLossAndGradients(rec, model, batch);
  rec.submit();
  const adapter = runningAdapter(model)!;
  const loss = (await readF32(model.gpu, acts.loss))[0]!;
  const gradients = splitFlat(model, adapter, await readF32(model.gpu, adapter.grads!));
  return { loss, gradients };
}
