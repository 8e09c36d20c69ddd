/**
 * Training an f16 model keeps the saved activations in f16 between forward and backward (the stash of
 * src/models/activations.ts): the loss is bit-identical to keeping them in f32 (the forward computes in
 * the same f32 working set), every adapter gradient is within 1e-2 relative of the f32-stash gradient
 * (half-precision rounding of q, k, v, attention output, MLP inputs; f16 carries ~3 decimal digits), and
 * the training activations take fewer bytes. llama with GQA and padding, and gpt2.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { loadAdapter, loadModel } from "../../mod.ts";
import { lossAndGradients } from "../../src/models/run.ts";
import { activationsFor, trainingTuning } from "../../src/models/transformer.ts";
import { gpuBytesAllocated } from "../../src/gpu/tensor.ts";
import { assertClose, Rng } from "../_util.ts";

const ROOT = new URL("../fixtures/golden/", import.meta.url).pathname;

for (const name of ["llama_gqa_pad", "gpt2_basic"]) {
  Deno.test(`${name} f16: the f16 activation stash gives the same loss and gradients within 1e-2`, async () => {
    const model = await loadModel(join(ROOT, name, "model"), { dtype: "f16", maxSeqLen: 32 });
    if (!model.gpu.hasF16) throw new Error("this GPU lacks shader-f16; the CI device (lavapipe) has it");
    await loadAdapter(model, join(ROOT, name, "adapter"));
    const rng = new Rng(21);
    const V = model.config.vocabSize;
    const ids = Array.from({ length: 2 }, () => Array.from(rng.ints(12, V)));
    const batch = {
      inputIds: ids,
      attentionMask: ids.map((r, b) => r.map((_, t) => (b === 1 && t < 3 ? 0 : 1))),
      labels: ids.map((r, b) => r.map((x, t) => (b === 1 && t < 3 ? -100 : x))),
    };
    const run = async (stash: boolean) => {
      trainingTuning.stashF16 = stash;
      try {
        const before = gpuBytesAllocated;
        activationsFor(model, 2, 12, true);
        const bytes = gpuBytesAllocated - before;
        return { ...(await lossAndGradients(model, batch)), bytes };
      } finally {
        trainingTuning.stashF16 = true;
      }
    };
    const f32 = await run(false), f16 = await run(true);
    assert.equal(f16.loss, f32.loss, "the forward (and so the loss) does not change");
    assert.ok(Number.isFinite(f16.loss));
    for (const [k, g] of Object.entries(f32.gradients)) {
      assert.ok(g.some((x) => x !== 0), `${k}: a zero gradient cannot show a difference`);
      assertClose(f16.gradients[k]!, g, 1e-2, `${k} with the f16 stash`);
    }
    assert.ok(f16.bytes < f32.bytes, `activation bytes: f16 stash ${f16.bytes} vs f32 ${f32.bytes}`);
  });
}
