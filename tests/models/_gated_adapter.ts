/**
 * Test fixture: a fresh adaption prompt with random prompts and a non-zero gate, so the adapter changes
 * the output (a zero-initialised gate would hide every adapter path).
 *
 * @module
 */
import assert from "node:assert/strict";
import { addAdaptionPrompt, type Batch, forward, type Model } from "../../mod.ts";
import { lossAndGradients } from "../../src/models/run.ts";
import { assertClose, Rng } from "../_util.ts";

/**
 * Adds adapter "default" (length 3 and top 2 layers unless given) with normal random prompts and gate 0.7
 * in every layer.
 *
 * @param model The model.
 * @param adapterLen Prompt tokens.
 * @param adapterLayers Adapted top layers.
 */
export function addGatedAdapter(model: Model, adapterLen = 3, adapterLayers = 2): void {
  addAdaptionPrompt(model, { adapterLen, adapterLayers, seed: 5 });
  const state = model.adapters.get("default")!;
  const values = new Float32Array(state.size);
  const rng = new Rng(9);
  for (const s of state.slots) {
    for (let i = 0; i < adapterLen * model.config.hiddenSize; i++) values[s.promptOffset + i] = rng.normal();
    values[s.gateOffset] = 0.7;
  }
  model.gpu.device.queue.writeBuffer(state.params.buffer, 0, values);
  state.version++;
}

/**
 * Two rows of `T` random token ids below `vocab`, the second left-padded over its first `pad` positions
 * (mask 0, labels -100): a batch whose attention reads the padding mask.
 *
 * @param rng The random source.
 * @param vocab Vocabulary size.
 * @param T Tokens per row.
 * @param pad Padded positions at the start of the second row.
 * @returns The batch.
 */
export function paddedBatch(rng: Rng, vocab: number, T: number, pad: number): Batch {
  const ids = Array.from({ length: 2 }, () => Array.from(rng.ints(T, vocab)));
  const padded = (b: number, t: number) => b === 1 && t < pad;
  return {
    inputIds: ids,
    attentionMask: ids.map((r, b) => r.map((_, t) => (padded(b, t) ? 0 : 1))),
    labels: ids.map((r, b) => r.map((x, t) => (padded(b, t) ? -100 : x))),
  };
}

/** Logits, loss and adapter gradients of one way of running a model (see {@link assertSameOutputs}). */
export interface RunOutputs {
  logits: Float32Array;
  loss: number;
  gradients: Record<string, Float32Array>;
}

/**
 * The logits of `batch` (a forward) and the loss and adapter gradients (a backward) under the model's
 * current settings.
 *
 * @param model The model.
 * @param batch The batch.
 * @returns Logits, loss and gradients.
 */
export async function outputsOf(model: Model, batch: Batch): Promise<RunOutputs> {
  const logits = (await forward(model, batch)).logits;
  return { ...(await lossAndGradients(model, batch)), logits };
}

/**
 * Asserts that two ways of running the same model agree: logits and loss within 1e-5 (relative), every
 * adapter gradient within `gradTol`, and no gradient all zero (which could not show a difference).
 *
 * @param got The way under test.
 * @param want The reference way.
 * @param gradTol Normwise tolerance of the gradients.
 */
export function assertSameOutputs(got: RunOutputs, want: RunOutputs, gradTol: number): void {
  assertClose(got.logits, want.logits, 1e-5, "logits");
  assert.ok(Math.abs(got.loss - want.loss) <= 1e-5 * Math.abs(want.loss), `loss ${got.loss} vs ${want.loss}`);
  for (const [k, g] of Object.entries(want.gradients)) {
    assert.ok(g.some((x) => x !== 0), `${k}: a zero gradient cannot show a difference`);
    assertClose(got.gradients[k]!, g, gradTol, k);
  }
}
