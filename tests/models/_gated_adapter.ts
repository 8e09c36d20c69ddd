/**
 * Test fixture: a fresh adaption prompt with random prompts and a non-zero gate, so the adapter changes
 * the output (a zero-initialised gate would hide every adapter path).
 *
 * @module
 */
import { addAdaptionPrompt, type Model } from "../../mod.ts";
import { Rng } from "../_util.ts";

/**
 * Adds adapter "default" (length 3, top 2 layers) with normal random prompts and gate 0.7 in every layer.
 *
 * @param model The model.
 */
export function addGatedAdapter(model: Model): void {
  addAdaptionPrompt(model, { adapterLen: 3, adapterLayers: 2, seed: 5 });
  const state = model.adapters.get("default")!;
  const values = new Float32Array(state.size);
  const rng = new Rng(9);
  for (const s of state.slots) {
    for (let i = 0; i < 3 * model.config.hiddenSize; i++) values[s.promptOffset + i] = rng.normal();
    values[s.gateOffset] = 0.7;
  }
  model.gpu.device.queue.writeBuffer(state.params.buffer, 0, values);
  state.version++;
}
