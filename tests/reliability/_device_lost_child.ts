/**
 * Run by device_lost_test.ts in its own process (destroying the process-wide device breaks every later
 * GPU use in that process): trains the small run in `Deno.args[0]`/`[1]`/`[2]` (model, data, out) and
 * destroys the WebGPU device right after step `Deno.args[3]`, then prints the error it ended with as one
 * JSON line `{ name, message, isGpuError }`.
 *
 * @module
 */

import { getGpu, GpuError } from "../../mod.ts";
import { train } from "../../src/train/trainer.ts";
import { TRAIN_DEFAULTS } from "../../src/cli/train.ts";
import { byteTokenizer } from "../train/_byte_tokenizer.ts";

const [model, data, out, at] = Deno.args as [string, string, string, string];
const gpu = await getGpu();
try {
  await train({
    ...TRAIN_DEFAULTS,
    model,
    data,
    out,
    seqLen: 32,
    batchSize: 2,
    adapterLayers: 2,
    adapterLen: 4,
    lr: 0.01,
    warmupSteps: 0,
    schedule: "constant",
    evalSplit: 0,
    sampleTokens: 0,
    saveEvery: 1,
    maxSteps: 100,
  }, {
    tokenizer: byteTokenizer,
    handleSignals: false,
    onStep: (step) => {
      if (step === Number(at)) gpu.device.destroy();
    },
  });
  console.log(JSON.stringify({ name: "none", message: "training finished", isGpuError: false }));
} catch (e) {
  const err = e as Error;
  console.log(JSON.stringify({ name: err.name, message: err.message, isGpuError: e instanceof GpuError }));
}
