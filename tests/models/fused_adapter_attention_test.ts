/**
 * The adapter attention folded into the attention dispatch (the lane kernels, T ≥ 48) gives the same
 * logits, loss and adapter gradients as the separate kernels (`attentionTuning.lanes = false`: the tiled
 * attention, then the adapter attention and, for llama, the add before o_proj), on llama with GQA and
 * padding and on gpt2, with a non-zero gate. f32 weights and activations: logits and loss within 1e-5,
 * gradients within 1e-4 (two orders of summation).
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { loadModel } from "../../mod.ts";
import { attentionTuning } from "../../kernels/attention.ts";
import { Rng } from "../_util.ts";
import { addGatedAdapter, assertSameOutputs, outputsOf, paddedBatch } from "./_gated_adapter.ts";

const ROOT = new URL("../fixtures/golden/", import.meta.url).pathname;
const T = 56; // ≥ 48: the lane kernels

for (const name of ["llama_gqa_pad", "gpt2_basic"]) {
  Deno.test(`${name}: the adapter folded into the attention dispatch = separate kernels (T=${T})`, async () => {
    const model = await loadModel(join(ROOT, name, "model"), { maxSeqLen: 64 });
    assert.ok(model.gpu.limits.maxStorageBuffersPerShaderStage >= 10, "the fused forward needs 10 bindings");
    addGatedAdapter(model);
    const batch = paddedBatch(new Rng(31), model.config.vocabSize, T, 5);
    const run = async (lanes: boolean) => {
      const saved = attentionTuning.lanes;
      attentionTuning.lanes = lanes;
      try {
        return await outputsOf(model, batch);
      } finally {
        attentionTuning.lanes = saved;
      }
    };
    const fused = await run(true), separate = await run(false);
    assertSameOutputs(fused, separate, 1e-4);
  });
}
