/**
 * An f16 model runs with f16 activations (the residual stream, q/k/v, attention and MLP outputs, the KV
 * cache; statistics and gradients stay f32). Against the same f16 weights with f32 activations
 * (`activationTuning.f16 = false`): logits within 5e-3 normwise, the training loss within 1e-3 and every
 * adapter gradient within 1e-2 (each f16 store rounds to 2^-11 relative, a layer stores a dozen times and
 * the residual stream carries the rounding through every layer; measured: logits 0.9-1.2e-3, gradients
 * ≤ 2.7e-3, about what f16 weights alone cost against f32), with fewer activation bytes. A prefill plus
 * one-token steps over the f16 KV cache give the full f16 forward's logits within 5e-3.
 * llama with GQA and padding, and gpt2.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { forward, loadAdapter, loadModel, type Model } from "../../mod.ts";
import { lossAndGradients } from "../../src/models/run.ts";
import { activationsFor, activationTuning } from "../../src/models/transformer.ts";
import { createDecoder, createKvCache } from "../../src/models/generate.ts";
import { gpuBytesAllocated } from "../../src/gpu/tensor.ts";
import { assertClose, relError, Rng } from "../_util.ts";
import { addGatedAdapter } from "./_gated_adapter.ts";

const ROOT = new URL("../fixtures/golden/", import.meta.url).pathname;

async function f16Model(name: string): Promise<Model> {
  const model = await loadModel(join(ROOT, name, "model"), { dtype: "f16", maxSeqLen: 32 });
  if (!model.gpu.hasF16) throw new Error("this GPU lacks shader-f16; the CI device (lavapipe) has it");
  return model;
}

/** Runs `fn` with f32 activations under the f16 weights, restoring the default after. */
async function withF32Activations<T>(fn: () => Promise<T>): Promise<T> {
  activationTuning.f16 = false;
  try {
    return await fn();
  } finally {
    activationTuning.f16 = true;
  }
}

for (const name of ["llama_gqa_pad", "gpt2_basic"]) {
  Deno.test(`${name} f16: f16 activations give f32-activation logits, loss and gradients within f16 rounding`, async () => {
    const model = await f16Model(name);
    await loadAdapter(model, join(ROOT, name, "adapter"));
    const rng = new Rng(21);
    const V = model.config.vocabSize;
    const ids = Array.from({ length: 2 }, () => Array.from(rng.ints(12, V)));
    const batch = {
      inputIds: ids,
      attentionMask: ids.map((r, b) => r.map((_, t) => (b === 1 && t < 3 ? 0 : 1))),
      labels: ids.map((r, b) => r.map((x, t) => (b === 1 && t < 3 ? -100 : x))),
    };
    const run = async () => {
      const before = gpuBytesAllocated;
      const acts = activationsFor(model, 2, 12, true);
      const bytes = gpuBytesAllocated - before;
      const logits = (await forward(model, batch)).logits;
      return { ...(await lossAndGradients(model, batch)), logits, bytes, acts };
    };
    const wide = await withF32Activations(run), half = await run();
    assert.equal(half.acts.dtype, "f16");
    assert.equal(half.acts.layers[1]!.x2.dtype, "f16", "the residual stream is f16");
    assert.equal(wide.acts.layers[1]!.x2.dtype, "f32");
    assertClose(half.logits, wide.logits, 5e-3, "logits");
    assert.ok(Number.isFinite(half.loss));
    assert.ok(
      Math.abs(half.loss - wide.loss) <= 1e-3 * Math.abs(wide.loss),
      `loss ${half.loss} vs ${wide.loss}`,
    );
    for (const [k, g] of Object.entries(wide.gradients)) {
      assert.ok(g.some((x) => x !== 0), `${k}: a zero gradient cannot show a difference`);
      assertClose(half.gradients[k]!, g, 1e-2, `${k} with f16 activations`);
    }
    assert.ok(half.bytes < 0.8 * wide.bytes, `activation bytes: f16 ${half.bytes} vs f32 ${wide.bytes}`);
  });

  Deno.test(`${name} f16: prefill + steps over the f16 KV cache = the full f16 forward`, async () => {
    const model = await f16Model(name);
    addGatedAdapter(model);
    const rng = new Rng(9);
    const V = model.config.vocabSize;
    const T0 = 5, steps = 4, T = T0 + steps;
    const ids = Array.from(rng.ints(T, V));
    const full = (await forward(model, { inputIds: [ids] })).logits;
    const at = (t: number) => full.subarray(t * V, (t + 1) * V);
    assert.equal(createKvCache(model, 1).k[0]!.dtype, "f16", "the KV cache is f16");
    const dec = createDecoder(model, 1);
    const errors = [relError(await dec.prefill({ inputIds: [ids.slice(0, T0)] }), at(T0 - 1))];
    for (let s = 0; s < steps; s++) errors.push(relError(await dec.step([ids[T0 + s]!]), at(T0 + s)));
    assert.ok(errors.every((e) => e <= 5e-3), `prefill and step logits vs the full forward: ${errors}`);
  });
}
