/**
 * Gradient checkpointing (`model.gradientCheckpointing`): the adapted layers keep only their input and the
 * backward runs each one's forward again, so a training step gives bit-identical loss and adapter gradients
 * to the step that keeps every activation — on llama (GQA, padding), mistral and gpt2, with adapters on all
 * layers and on the top 2, and on an f16 llama — while allocating fewer activation bytes and recording the extra forwards.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { loadModel, lossAndGradients } from "../../mod.ts";
import { recordLossAndGradients } from "../../src/models/run.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { gpuBytesAllocated } from "../../src/gpu/tensor.ts";
import { Rng } from "../_util.ts";
import { addGatedAdapter, paddedBatch } from "./_gated_adapter.ts";

const ROOT = new URL("../fixtures/golden/", import.meta.url).pathname;

const CASES = [
  ...["llama_gqa_pad", "mistral_gqa", "gpt2_basic"].flatMap((name) =>
    (["all", 2] as const).map((layers) => ({ name, layers, dtype: "f32" as const }))
  ),
  { name: "llama_gqa_pad", layers: "all" as const, dtype: "f16" as const },
];
for (const { name, layers, dtype } of CASES) {
  Deno.test({
    name:
      `${name} ${dtype}, adapters on ${layers} layers: checkpointed step = stored step, bit for bit, in less memory`,
    fn: async () => {
      const model = await loadModel(join(ROOT, name, "model"), { maxSeqLen: 32, dtype });
      const L = model.config.numLayers;
      addGatedAdapter(model, 3, layers === "all" ? L : layers);
      const batch = paddedBatch(new Rng(71), model.config.vocabSize, 16, 4);
      const run = async (checkpoint: boolean) => {
        model.gradientCheckpointing = checkpoint;
        const before = gpuBytesAllocated;
        const rec = new Recorder(model.gpu);
        recordLossAndGradients(rec, model, batch); // allocates this mode's buffers, records its step
        const ops = rec.take().length;
        const bytes = gpuBytesAllocated - before;
        return { ops, bytes, ...(await lossAndGradients(model, batch)) };
      };
      const stored = await run(false), ckpt = await run(true);
      assert.equal(ckpt.loss, stored.loss, "loss");
      for (const [k, g] of Object.entries(stored.gradients)) {
        assert.ok(g.some((x) => x !== 0), `${k}: a zero gradient cannot show a difference`);
        assert.deepEqual(ckpt.gradients[k], g, k);
      }
      assert.ok(ckpt.ops > stored.ops, `recorded ops: ${ckpt.ops} with checkpointing vs ${stored.ops}`);
      assert.ok(ckpt.bytes < stored.bytes, `bytes: ${ckpt.bytes} with checkpointing vs ${stored.bytes}`);
      model.gradientCheckpointing = false;
    },
  });
}
