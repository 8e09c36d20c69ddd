/**
 * The optimizer's replayed steps (src/train/optimizer.ts): a step recorded once and replayed for batches
 * of the same shape and mask pattern trains exactly as recording every step, and a batch with another
 * shape or mask pattern is recorded anew.
 */
import assert from "node:assert/strict";
import { addAdaptionPrompt, createOptimizer } from "../../mod.ts";
import { normalizeConfig } from "../../src/io/hf_config.ts";
import { createRandomModel } from "../../src/models/random.ts";
import { readF32 } from "../../src/gpu/tensor.ts";
import type { Batch } from "../../src/models/transformer.ts";
import { stepsRecorded } from "../../src/train/optimizer.ts";
import { Rng, TINY_CONFIGS } from "../_util.ts";

function batchOf(rng: Rng, B: number, T: number, leftPad = 0): Batch {
  const ids = Array.from({ length: B }, () => Array.from(rng.ints(T, 96)));
  if (!leftPad) return { inputIds: ids, labels: ids };
  const mask = ids.map((row, b) => row.map((_, t) => (b === 0 && t < leftPad ? 0 : 1)));
  const labels = ids.map((row, b) => row.map((id, t) => (b === 0 && t < leftPad ? -100 : id)));
  return { inputIds: ids, attentionMask: mask, labels };
}

Deno.test("replayed optimizer steps train exactly as steps recorded anew; a new shape or mask pattern records again", async () => {
  const config = normalizeConfig(TINY_CONFIGS.llama);
  const rng = new Rng(21);
  // same shape twice, then padding (another mask pattern), no padding again, another length
  const batches = [
    batchOf(rng, 2, 8),
    batchOf(rng, 2, 8),
    batchOf(rng, 2, 8, 3),
    batchOf(rng, 2, 8),
    batchOf(rng, 2, 6),
  ];
  const run = async (replay: boolean) => {
    const model = await createRandomModel(config, { seed: 3, maxSeqLen: 32 });
    addAdaptionPrompt(model, { adapterLen: 4, adapterLayers: 2, seed: 9 });
    const opt = createOptimizer(model, { lr: 5e-2, weightDecay: 0.01, maxGradNorm: 1, replay });
    const losses: number[] = [];
    const recorded: number[] = [];
    for (const b of [...batches, batches[1]!]) {
      const before = stepsRecorded;
      losses.push(await opt.step(b));
      recorded.push(stepsRecorded - before);
    }
    return { losses, recorded, params: await readF32(model.gpu, opt.adapter.params) };
  };
  const fresh = await run(false);
  const replayed = await run(true);
  assert.deepEqual(fresh.recorded, [1, 1, 1, 1, 1, 1]);
  // recorded: the first step, the padded batch, the unpadded one after it, the shorter one, the first
  // shape after it; replayed: the second step only
  assert.deepEqual(replayed.recorded, [1, 0, 1, 1, 1, 1]);
  assert.deepEqual(replayed.losses, fresh.losses);
  assert.deepEqual(replayed.params, fresh.params);
  assert.ok(fresh.losses.every(Number.isFinite));
  assert.notEqual(fresh.losses[0], fresh.losses[1], "the replayed step sees the new batch's tokens");
});

Deno.test("a replayed step reads the batch uploaded for it, not the recorded one", async () => {
  const config = normalizeConfig(TINY_CONFIGS.llama);
  const rng = new Rng(5);
  const [a, b] = [batchOf(rng, 2, 8), batchOf(rng, 2, 8)];
  const lossAfter = async (first: Batch, second: Batch) => {
    const model = await createRandomModel(config, { seed: 3, maxSeqLen: 32 });
    addAdaptionPrompt(model, { adapterLen: 4, adapterLayers: 3, seed: 2 });
    const opt = createOptimizer(model, { lr: 0 });
    await opt.step(first);
    return await opt.step(second);
  };
  // lr 0: the adapter does not move, so the second loss depends only on the second batch
  const before = stepsRecorded;
  assert.equal(await lossAfter(a, b), await lossAfter(b, b));
  assert.equal(stepsRecorded - before, 2, "one recording per optimizer, the second step replayed");
});
