import assert from "node:assert/strict";
import { learningRate, validateSchedule } from "../../src/train/schedule.ts";

Deno.test("warmup is linear from 0, cosine ends at lr·minLrRatio, constant stays at lr", () => {
  const o = { lr: 1e-2, warmupSteps: 10, totalSteps: 110 };
  assert.equal(learningRate(5, o), 5e-3);
  assert.equal(learningRate(10, o), 1e-2);
  assert.ok(Math.abs(learningRate(11, o) - 1e-2) < 1e-15);
  assert.ok(Math.abs(learningRate(60, o) - 5.5e-3) < 1e-4); // about half way: (lr + min) / 2
  assert.ok(Math.abs(learningRate(110, o) - 1e-3) < 1e-12);
  assert.equal(learningRate(500, { ...o, kind: "constant" }), 1e-2);
  assert.equal(learningRate(1, { lr: 1, warmupSteps: 0, totalSteps: 1 }), 1);
});

Deno.test("bad schedules are refused with the flag's name", () => {
  assert.throws(
    () => validateSchedule({ lr: -1, warmupSteps: 0, totalSteps: 1 }),
    /--lr must be a positive number/,
  );
  assert.throws(() => validateSchedule({ lr: 1, warmupSteps: 1.5, totalSteps: 1 }), /--warmup-steps/);
  assert.throws(() => validateSchedule({ lr: 1, warmupSteps: 0, totalSteps: 0 }), /total number of steps/);
});
