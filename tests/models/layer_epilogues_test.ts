/**
 * A layer's residual adds and its MLP activation's backward in the epilogues of the products before them
 * (`epilogueTuning.fuse`, kernels/matmul.ts `MatmulEpilogue`) give the logits, loss and adapter gradients
 * of the separate kernels, on llama (SwiGLU, GQA, padding) and gpt2 (GELU, biases), with a non-zero gate
 * on the top 2 layers (so the backward runs through both MLPs). A training step records the epilogues, and
 * none of the elementwise kernels they replace.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { loadModel } from "../../mod.ts";
import { epilogueTuning } from "../../src/models/ops.ts";
import { recordLossAndGradients } from "../../src/models/run.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { Rng } from "../_util.ts";
import { addGatedAdapter, assertSameOutputs, outputsOf, paddedBatch } from "./_gated_adapter.ts";

const ROOT = new URL("../fixtures/golden/", import.meta.url).pathname;
for (const [name, activation] of [["llama_gqa_pad", "swiglu"], ["gpt2_basic", "gelu"]] as const) {
  Deno.test(`${name}: residual adds and the ${activation} backward in product epilogues = separate kernels`, async () => {
    const model = await loadModel(join(ROOT, name, "model"), { maxSeqLen: 32 });
    addGatedAdapter(model);
    const batch = paddedBatch(new Rng(43), model.config.vocabSize, 12, 3);
    const run = async (fuse: boolean) => {
      epilogueTuning.fuse = fuse;
      try {
        const rec = new Recorder(model.gpu);
        recordLossAndGradients(rec, model, batch);
        const labels = rec.take().map((op) => op.label);
        const epilogues = labels.filter((l) =>
          / epi=(residual|swiglu|gelu) /.test(` ${l} `.replaceAll("|", " "))
        );
        const separate = labels.filter((l) => /^(add_into|swiglu_backward|gelu_backward)\b/.test(l));
        return {
          epilogues: epilogues.length,
          separate: separate.length,
          outputs: await outputsOf(model, batch),
        };
      } finally {
        epilogueTuning.fuse = true;
      }
    };
    const fused = await run(true), apart = await run(false);
    const L = model.config.numLayers;
    // per layer: 2 residual adds; per adapted layer (2): the activation's backward
    assert.equal(fused.epilogues, 2 * L + 2, "epilogues recorded");
    assert.equal(apart.epilogues, 0);
    assert.ok(apart.separate >= 2 * L + 2, `separate kernels recorded: ${apart.separate}`);
    assert.equal(apart.separate - fused.separate, 2 * L + 2, "kernels the epilogues replace");
    assertSameOutputs(fused.outputs, apart.outputs, 1e-5);
  });
}
