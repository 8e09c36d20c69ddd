/**
 * The adapter keys/values that decoding caches per adapter are invalidated when the prompt changes:
 * after optimizer steps (and after switching adapters) greedy `generate` still equals greedy decoding
 * by full forwards; `forward` reuses the keys/values of an unchanged adapter and recomputes them after a step.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import {
  addAdaptionPrompt,
  createOptimizer,
  forward,
  generate,
  loadModel,
  type Model,
  setAdapter,
} from "../../mod.ts";
import { addGatedAdapter } from "./_gated_adapter.ts";

const MODEL = join(new URL("../fixtures/golden/", import.meta.url).pathname, "llama_gqa_pad", "model");

async function greedyByForward(model: Model, prompt: number[], n: number): Promise<number[]> {
  const V = model.config.vocabSize;
  const seq = [...prompt];
  for (let i = 0; i < n; i++) {
    const { logits } = await forward(model, { inputIds: [seq] });
    const last = logits.subarray((seq.length - 1) * V, seq.length * V);
    let best = 0;
    for (let v = 1; v < V; v++) if (last[v]! > last[best]!) best = v;
    seq.push(best);
  }
  return seq.slice(prompt.length);
}

Deno.test("cached adapter keys/values follow training steps and adapter switches", async () => {
  const model = await loadModel(MODEL, { maxSeqLen: 32 });
  const prompt = [7, 3, 99, 140, 12];
  addAdaptionPrompt(model, { adapterLen: 4, adapterLayers: 3, name: "a", seed: 1 });
  const before = await generate(model, prompt, { maxNewTokens: 6 }); // caches a's keys/values (gate 0)
  const ids = [[5, 9, 200, 17, 64, 33, 8, 120, 77, 2]];
  const opt = createOptimizer(model, { lr: 0.2, weightDecay: 0 });
  for (let i = 0; i < 4; i++) await opt.step({ inputIds: ids, labels: ids });
  const after = await generate(model, prompt, { maxNewTokens: 6 });
  assert.deepEqual(after, await greedyByForward(model, prompt, 6));
  assert.notDeepEqual(after, before, "training with lr 0.2 should change the greedy continuation");
  addAdaptionPrompt(model, { adapterLen: 2, adapterLayers: 1, name: "b", seed: 2 });
  assert.deepEqual(await generate(model, prompt, { maxNewTokens: 6 }), before); // b is fresh: the base model
  setAdapter(model, "a");
  assert.deepEqual(await generate(model, prompt, { maxNewTokens: 6 }), after);
});

Deno.test("forward reuses the adapter keys/values of the same adapter version and recomputes them after a step", async () => {
  const model = await loadModel(MODEL, { maxSeqLen: 32 });
  addGatedAdapter(model);
  const ids = [[5, 9, 200, 17, 64, 33, 8, 120, 77, 2]];
  const first = (await forward(model, { inputIds: ids })).logits;
  assert.deepEqual(
    (await forward(model, { inputIds: ids })).logits,
    first,
    "cached keys/values: same logits",
  );
  const opt = createOptimizer(model, { lr: 0.2, weightDecay: 0 });
  await opt.step({ inputIds: ids, labels: ids });
  const after = (await forward(model, { inputIds: ids })).logits;
  model.adapters.get("default")!.kvVersion = -1; // force a recomputation
  assert.deepEqual(
    after,
    (await forward(model, { inputIds: ids })).logits,
    "after a step: fresh keys/values",
  );
  assert.notDeepEqual(after, first, "the step changed the adapter");
});
