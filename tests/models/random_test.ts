/**
 * Random-weight models (src/models/random.ts): the built-in configs have the real models' parameter
 * counts, the invented checkpoint is deterministic in its seed, and a tiny random llama and gpt2 run end
 * to end — finite loss near ln V (weights × 0.02 make nearly uniform predictions), and AdamW on an
 * adapter lowers the loss of a fixed batch.
 */
import assert from "node:assert/strict";
import { addAdaptionPrompt, createOptimizer, forward } from "../../mod.ts";
import { normalizeConfig } from "../../src/io/hf_config.ts";
import { LAYOUTS } from "../../src/models/layout.ts";
import {
  checkpointShapes,
  createRandomModel,
  modelConfigFor,
  RANDOM_MODEL_NAMES,
  randomTensorSource,
  randomWeights,
} from "../../src/models/random.ts";
import { getGpu, type Gpu } from "../../src/gpu/device.ts";
import { createStacked, readF32, Tensor } from "../../src/gpu/tensor.ts";
import { loadWeights, uploadProjections, type Weights } from "../../src/models/weights.ts";
import type { Model } from "../../src/models/model.ts";
import { Rng, TINY_CONFIGS } from "../_util.ts";

/** Parameter counts of the published checkpoints (embedding counted once when tied). */
const PARAMS: Record<string, number> = {
  "gpt2-124M": 124_439_808,
  "smollm2-135M": 134_515_008,
  "tinyllama-1.1B": 1_100_048_384,
};

Deno.test("built-in configs have the published models' parameter counts", () => {
  for (const name of RANDOM_MODEL_NAMES) {
    const c = modelConfigFor(name);
    let n = 0;
    for (const shape of checkpointShapes(c, LAYOUTS[c.family]).values()) {
      n += shape.reduce((a, b) => a * b, 1);
    }
    assert.equal(n, PARAMS[name], name);
  }
  const smol = modelConfigFor("smollm2-135M");
  assert.deepEqual([smol.headDim, smol.numKvHeads, smol.ropeTheta, smol.tieWordEmbeddings], [
    64,
    3,
    1e5,
    true,
  ]);
});

/** Every tensor of a Weights object with its path, for structural comparison. */
function describeWeights(w: Weights): string[] {
  const out: string[] = [];
  const visit = (v: unknown, path: string): void => {
    if (v instanceof Tensor) out.push(`${path} [${v.shape}] ${v.dtype}`);
    else if (v === null) out.push(`${path} null`);
    else if (Array.isArray(v)) v.forEach((x, i) => visit(x, `${path}.${i}`));
    else if (typeof v === "object") { for (const [k, x] of Object.entries(v)) visit(x, `${path}.${k}`); }
    else out.push(`${path} ${v}`);
  };
  visit(w, "");
  return out;
}

for (const family of ["llama", "gpt2"] as const) {
  Deno.test(`randomWeights makes the tensors loadWeights makes of a ${family} checkpoint (shapes, dtypes, bytes)`, async () => {
    const g = await getGpu();
    const config = normalizeConfig(TINY_CONFIGS[family]);
    for (const dtype of ["f32", "f16"] as const) {
      if (dtype === "f16" && !g.hasF16) continue;
      const fast = randomWeights(g, config, LAYOUTS[family], dtype, 1);
      const loaded = await loadWeights(
        g,
        config,
        LAYOUTS[family],
        randomTensorSource(config, LAYOUTS[family], 1),
        dtype,
      );
      assert.deepEqual(describeWeights(fast), describeWeights(loaded), dtype);
    }
  });
}

Deno.test("the invented checkpoint is deterministic in the seed and differs between tensors", async () => {
  const c = modelConfigFor("gpt2-124M");
  const a = randomTensorSource(c, LAYOUTS.gpt2, 7), b = randomTensorSource(c, LAYOUTS.gpt2, 7);
  const q0 = await a.readF32("transformer.h.0.attn.c_attn.weight");
  assert.deepEqual(q0, await b.readF32("transformer.h.0.attn.c_attn.weight"));
  const q1 = await a.readF32("transformer.h.1.attn.c_attn.weight");
  assert.notDeepEqual(q0.slice(0, 64), q1.slice(0, 64));
  let sq = 0;
  for (const x of q0) sq += x * x;
  const std = Math.sqrt(sq / q0.length);
  assert.ok(Math.abs(std - 0.02) < 0.001, `weight std ${std} should be 0.02 ± 0.001`);
  assert.ok((await a.readF32("transformer.h.0.ln_1.weight")).every((x) => x === 1), "norm scales are 1");
  assert.ok((await a.readF32("transformer.h.0.attn.c_attn.bias")).every((x) => x === 0), "biases are 0");
});

for (const [family, raw] of Object.entries(TINY_CONFIGS)) {
  Deno.test(`a tiny random ${family}: finite loss near ln V, and AdamW on an adapter lowers it`, async () => {
    const config = normalizeConfig(raw);
    const model = await createRandomModel(config, { seed: 3, maxSeqLen: 32 });
    const rng = new Rng(11);
    const ids = Array.from({ length: 2 }, () => Array.from(rng.ints(8, config.vocabSize)));
    const batch = { inputIds: ids, labels: ids };
    const { loss, shape, logits } = await forward(model, batch);
    assert.deepEqual(shape, [2, 8, 96]);
    // the loss is HF's causal-LM loss of the logits (float64 reference, labels shifted by one)
    let ref = 0;
    for (let b = 0; b < 2; b++) {
      for (let t = 0; t + 1 < 8; t++) {
        const row = logits.subarray((b * 8 + t) * 96, (b * 8 + t + 1) * 96);
        const max = Math.max(...row);
        let sum = 0;
        for (const x of row) sum += Math.exp(x - max);
        ref += max + Math.log(sum) - row[ids[b]![t + 1]!]!;
      }
    }
    ref /= 14;
    assert.ok(
      loss !== undefined && Math.abs(loss - ref) <= 1e-5 * ref,
      `loss ${loss} should be ${ref} (≤ 1e-5 rel.)`,
    );
    // weights × 0.02 give logits of std ≈ 0.02·√C ≈ 0.11: nearly uniform predictions, loss near ln 96 = 4.564
    assert.ok(Math.abs(loss - Math.log(96)) < 0.2, `loss ${loss} should be near ln 96`);
    addAdaptionPrompt(model, { adapterLen: 4, adapterLayers: 2 });
    const opt = createOptimizer(model, { lr: 5e-2, weightDecay: 0 });
    const losses: number[] = [];
    for (let i = 0; i < 6; i++) losses.push(await opt.step(batch));
    assert.ok(losses.every(Number.isFinite), `losses ${losses} should be finite`);
    // the first step starts at the base model (gate zero), so the loss is the base loss to f32 rounding
    assert.ok(Math.abs(losses[0]! - loss!) <= 1e-5 * loss!, `first loss ${losses[0]} should equal ${loss}`);
    assert.ok(losses.at(-1)! < losses[0]! - 1e-4, `losses ${losses} should fall`);
  });
}

for (const [family, raw] of Object.entries(TINY_CONFIGS)) {
  Deno.test(`a tiny random ${family}: q, k and v (llama: gate and up) in one stacked product train exactly as separate products`, async () => {
    const config = normalizeConfig(raw);
    const llama = family === "llama";
    const stacked = await createRandomModel(config, { seed: 5, maxSeqLen: 32 });
    assert.ok(stacked.weights.layers.every((l) => l.qkv !== null), "the tiny model's q, k, v are stacked");
    assert.equal(
      stacked.weights.layers.every((l) => l.gateUp !== null),
      llama,
      "gate and up stacked (llama)",
    );
    // the same weights (views), without the stacks: three (two) products forward, three (two) input
    // gradients backward
    const apart: Model = {
      ...stacked,
      weights: {
        ...stacked.weights,
        layers: stacked.weights.layers.map((l) => ({ ...l, qkv: null, gateUp: null })),
      },
      adapters: new Map(),
      activations: new Map(),
    };
    const rng = new Rng(12);
    const ids = Array.from({ length: 2 }, () => Array.from(rng.ints(8, config.vocabSize)));
    const batch = { inputIds: ids, labels: ids };
    const losses = [];
    for (const model of [stacked, apart]) {
      addAdaptionPrompt(model, { adapterLen: 4, adapterLayers: 3, seed: 9 });
      const opt = createOptimizer(model, { lr: 5e-2, weightDecay: 0 });
      const run: number[] = [];
      for (let i = 0; i < 4; i++) run.push(await opt.step(batch));
      const { logits } = await forward(model, batch);
      losses.push({ run, logits });
      // the stack ran where it could: every saved layer's q, k, v and their gradients share one buffer
      const acts = [...model.activations.values()].find((a) => a.training)!;
      assert.equal(acts.layers.every((la) => la.qkv !== null) && acts.grad.qkv !== null, true);
      assert.equal(acts.layers.every((la) => la.gu !== null) && acts.grad.gu !== null, llama);
    }
    const [a, b] = losses as [
      { run: number[]; logits: Float32Array },
      { run: number[]; logits: Float32Array },
    ];
    assert.ok(a.run.every((x, i) => Math.abs(x - b.run[i]!) <= 1e-5 * Math.abs(x)), `${a.run} vs ${b.run}`);
    assert.ok(a.run.at(-1)! < a.run[0]! - 1e-4, `losses ${a.run} should fall`);
    let d = 0, s = 0;
    for (let i = 0; i < a.logits.length; i++) {
      d = Math.max(d, Math.abs(a.logits[i]! - b.logits[i]!));
      s = Math.max(s, Math.abs(b.logits[i]!));
    }
    assert.ok(d <= 1e-5 * s, `logits differ by ${d} (max ${s})`);
  });
}

Deno.test("uploadProjections stacks q, k and v only where each part binds alone and the groups are whole vec4s", async () => {
  const g = await getGpu();
  const rng = new Rng(4);
  const parts = (rows: number[], cols: number) =>
    rows.map((r, i) => ({
      data: Float32Array.from(rng.randn(r * cols)),
      rows: r,
      bias: null,
      label: `p${i}`,
    }));
  const stacked = parts([8, 4, 4], 16); // 512- and 256-byte parts: bindable offsets
  const up = uploadProjections(g, stacked, 16, "s");
  assert.ok(up.stacked, "stacked");
  assert.deepEqual(up.stacked.groups, [8, 12]);
  assert.deepEqual(up.stacked.lin.w.shape, [16, 16]);
  // the k|v rows as one linear layer: a view starting at k
  assert.deepEqual(up.stacked.kv?.w.shape, [8, 16]);
  assert.equal(up.stacked.kv?.w.offset, up.linears[1]!.w.offset);
  assert.equal(up.stacked.kv?.w.buffer, up.stacked.lin.w.buffer);
  assert.ok(
    up.linears.every((l) => l.w.buffer === up.stacked!.lin.w.buffer),
    "the parts are views of the stack",
  );
  for (const [i, l] of up.linears.entries()) assert.deepEqual(await readF32(g, l.w), stacked[i]!.data);
  assert.deepEqual(
    await readF32(g, up.stacked.lin.w),
    Float32Array.from(stacked.flatMap((p) => [...p.data])),
  );
  // rows not multiples of 4, or offsets the device cannot bind: three separate buffers
  for (const [rows, cols] of [[[6, 2, 2], 64], [[4, 4, 4], 4]] as const) {
    const apart = uploadProjections(g, parts([...rows], cols), cols, "a");
    assert.equal(apart.stacked, null, `rows ${rows} x ${cols}`);
    assert.equal(new Set(apart.linears.map((l) => l.w.buffer)).size, 3);
  }
  // a whole that one binding cannot hold is not stacked (refused before anything is allocated)
  const small = {
    limits: { minStorageBufferOffsetAlignment: 256, maxStorageBufferBindingSize: 1024 },
  } as Gpu;
  assert.equal(createStacked(small, [[8, 16], [8, 16], [8, 16]], "f32", "too big"), null);
});
