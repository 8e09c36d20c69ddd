/**
 * An adaption prompt's keys and values in one product against the layer's stacked k|v weights (and the
 * prompt's gradient in one product from both) give the logits, loss and adapter gradients of the two
 * products per layer (`adapterStateTuning.stackKeyValues = false`), on llama with GQA and padding and on
 * gpt2 (k/v biases), with a non-zero gate. 16 prompt tokens: the matrix-vector kernels at their largest M; 20:
 * the tiled kernel with column groups. Keys/values whose values start on a 256-byte boundary (bindable on
 * every device). f32 throughout: within 1e-5 (another order of summation).
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { deleteAdapter, loadModel } from "../../mod.ts";
import { adapterStateTuning } from "../../src/adapters/state.ts";
import { Rng } from "../_util.ts";
import { addGatedAdapter, assertSameOutputs, outputsOf, paddedBatch } from "./_gated_adapter.ts";

const ROOT = new URL("../fixtures/golden/", import.meta.url).pathname;
for (const [name, L] of [["llama_gqa_pad", 16], ["gpt2_basic", 16], ["llama_gqa_pad", 20]] as const) {
  Deno.test(`${name}: the adapter's keys and values in one product = two products per layer (L=${L})`, async () => {
    const model = await loadModel(join(ROOT, name, "model"), { maxSeqLen: 32 });
    const batch = paddedBatch(new Rng(41), model.config.vocabSize, 12, 3);
    const run = async (stack: boolean) => {
      adapterStateTuning.stackKeyValues = stack;
      try {
        if (model.adapters.has("default")) deleteAdapter(model, "default");
        addGatedAdapter(model, L);
        const state = model.adapters.get("default")!;
        assert.equal(state.kva.every((t) => t !== null), stack, "keys and values stacked as asked");
        for (const s of state.slots) assert.ok(model.weights.layers[s.layer]!.qkv, "stacked q/k/v weights");
        return await outputsOf(model, batch);
      } finally {
        adapterStateTuning.stackKeyValues = true;
      }
    };
    const stacked = await run(true), apart = await run(false);
    assertSameOutputs(stacked, apart, 1e-5);
  });
}
