/**
 * Test fixture: a fresh adaption prompt with random prompts and a non-zero gate, so the adapter changes
 * the output (a zero-initialised gate would hide every adapter path).
 *
 * @module
 */
import { addAdaptionPrompt, type Model } from "../../mod.ts";
import { Rng } from "../_util.ts";

/**
 * Adds adapter "default" (length 3 unless given, top 2 layers) with normal random prompts and gate 0.7 in
 * every layer.
 *
 * @param model The model.
 * @param adapterLen Prompt tokens.
 */
export function addGatedAdapter(model: Model, adapterLen = 3): void {
  addAdaptionPrompt(model, { adapterLen, adapterLayers: 2, seed: 5 });
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
