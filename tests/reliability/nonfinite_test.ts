/**
 * A NaN or infinite loss (issue 9): a learning rate of 1e30 (a real cause: AdamW moves every weight by
 * about lr on the first step, the next forward overflows) stops the CLI with the step number and exit code
 * 1, keeping the checkpoint of the last finite step; `--skip-nonfinite` rolls a poisoned step back and goes
 * on, and gives up after {@link MAX_CONSECUTIVE_SKIPS} non-finite batches in a row instead of looping.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { adapterState, loadAdapter, loadModel } from "../../mod.ts";
import { getAdapter, writeAdapterTensors } from "../../src/adapters/manage.ts";
import { findCheckpoint, readCheckpoint } from "../../src/train/checkpoint.ts";
import { MAX_CONSECUTIVE_SKIPS, train, type TrainConfig } from "../../src/train/trainer.ts";
import { TRAIN_DEFAULTS } from "../../src/cli/train.ts";
import { byteTokenizer } from "../train/_byte_tokenizer.ts";
import { metricLosses, runTrain, smallRunArgs, workspace } from "./_train_process.ts";

Deno.test("--lr 1e30 makes the loss NaN: the CLI stops naming the step and the last good checkpoint loads", async () => {
  const ws = await workspace();
  const out = join(ws.dir, "run");
  const r = await runTrain([...smallRunArgs(ws, out, 20), "--lr", "1e30"]);
  assert.equal(r.code, 1, r.stderr);
  const m = r.stderr.match(/the loss became (NaN|-?Infinity) at step (\d+); training stopped/);
  assert.ok(m, r.stderr);
  const bad = Number(m[2]);
  assert.match(r.stderr, new RegExp(`last good checkpoint \\(step ${bad - 1}\\)`));
  assert.ok(r.events.some((e) => e.e.event === "error" && e.e.kind === "TrainingError"));
  const dir = await findCheckpoint(out);
  assert.equal(dir, join(out, "checkpoint"));
  const { state } = await readCheckpoint(dir!);
  assert.equal(state.step, bad - 1);
  assert.deepEqual([...(await metricLosses(out)).keys()].at(-1), bad - 1, "no metrics line for the bad step");
  const model = await loadModel(ws.model);
  await loadAdapter(model, dir!, { name: "ckpt" });
  await loadAdapter(model, out, { name: "run" });
});

async function base(): Promise<TrainConfig> {
  const ws = await workspace();
  return {
    ...TRAIN_DEFAULTS,
    model: ws.model,
    data: ws.data,
    out: join(ws.dir, "run"),
    seqLen: 32,
    batchSize: 2,
    adapterLayers: 2,
    adapterLen: 4,
    lr: 0.01,
    warmupSteps: 0,
    schedule: "constant",
    evalSplit: 0,
    sampleTokens: 0,
    saveEvery: 2,
    maxSteps: 6,
    skipNonfinite: true,
  };
}

Deno.test("--skip-nonfinite rolls back a step whose loss is NaN (adapter poisoned on the GPU) and trains on", async () => {
  const config = await base();
  const losses: number[] = [];
  const attempts: number[] = [];
  const s = await train(config, {
    tokenizer: byteTokenizer,
    handleSignals: false,
    onStep: (_, l) => losses.push(l),
    beforeStep: async (step, model) => {
      attempts.push(step);
      if (attempts.length === 3 || attempts.length === 6) {
        const poisoned = await adapterState(model, config.adapterName);
        for (const t of Object.values(poisoned)) t.fill(NaN);
        writeAdapterTensors(model, getAdapter(model, config.adapterName), poisoned);
      }
    },
  });
  assert.equal(s.steps, 6);
  assert.deepEqual(attempts, [1, 2, 3, 3, 4, 5, 5, 6], "steps 3 and 5 were tried twice");
  assert.equal(losses.length, 6);
  assert.ok(losses.every(Number.isFinite), losses.join(" "));
  const { optimizer } = await readCheckpoint(join(config.out, "checkpoint"));
  assert.ok(optimizer.m.every(Number.isFinite) && optimizer.v.every(Number.isFinite));
  const model = await loadModel(config.model);
  await loadAdapter(model, config.out);
  for (const t of Object.values(await adapterState(model))) assert.ok(t.every(Number.isFinite));
});

Deno.test(`--skip-nonfinite gives up after ${MAX_CONSECUTIVE_SKIPS} non-finite batches in a row (--lr 1e30)`, async () => {
  const config = { ...(await base()), lr: 1e30, maxSteps: 50 };
  await assert.rejects(
    train(config, { tokenizer: byteTokenizer, handleSignals: false }),
    new RegExp(
      `was NaN on ${MAX_CONSECUTIVE_SKIPS} batches in a row at step 2 .*last checkpoint \\(step 0\\)`,
    ),
  );
});
