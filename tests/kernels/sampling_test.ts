import assert from "node:assert/strict";
import { sampleTokens } from "../../kernels/sampling.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { readTensor, tensorFrom } from "../../src/gpu/tensor.ts";
import { gpu, poisoned, Rng, upload } from "../_util.ts";
import { argmaxRef, samplingDistributionRef } from "../reference/sampling.ts";

/** Draws `steps` tokens for each of B rows (successive calls, the GPU advancing the counter). */
async function draw(
  logits: Float32Array,
  B: number,
  V: number,
  steps: number,
  temperature: number,
  topP: number,
  seed: number,
): Promise<{ tokens: Int32Array; counter: number }> {
  const g = await gpu();
  const lt = upload(g, logits, [B, V]);
  const state = tensorFrom(g, new Uint32Array([seed, 7, 0, 0]));
  const out = poisoned(g, [B, steps], "i32");
  const rec = new Recorder(g);
  for (let s = 0; s < steps; s++) {
    sampleTokens(rec, { out, outIndex: s, outStride: steps, logits: lt, state, temperature, topP });
  }
  rec.submit();
  const tokens = (await readTensor(g, out)) as Int32Array;
  const counter = ((await readTensor(g, state)) as Uint32Array)[1]!;
  return { tokens, counter };
}

/** Chi-square statistic of counts against expected probabilities (cells with p = 0 must be empty). */
function chiSquare(counts: number[], p: ArrayLike<number>, total: number): number {
  let x2 = 0;
  counts.forEach((c, i) => {
    const e = p[i]! * total;
    if (e === 0) assert.equal(c, 0, `token ${i} has probability 0 but was drawn ${c} times`);
    else x2 += (c - e) ** 2 / e;
  });
  return x2;
}

function countsOf(tokens: Int32Array, V: number): number[] {
  const counts = new Array(V).fill(0);
  for (const t of tokens) {
    assert.ok(t >= 0 && t < V, `token ${t} out of range`);
    counts[t]++;
  }
  return counts;
}

Deno.test("greedy sampling (temperature 0) is torch.argmax, ties to the lowest index", async () => {
  const g = await gpu();
  const rng = new Rng(60);
  for (const V of [1, 7, 1037]) {
    const B = 5;
    const logits = rng.randn(B * V);
    if (V > 3) {
      logits[1 * V + 2] = logits[1 * V + V - 1] = 9; // a tie at the maximum
      logits[2 * V + 0] = logits[2 * V + 1] = 9;
      for (let i = 0; i < V; i++) logits[3 * V + i] = 0.5; // all tied
    }
    const out = poisoned(g, [B], "i32");
    const rec = new Recorder(g);
    sampleTokens(rec, {
      out,
      outIndex: 0,
      outStride: 1,
      logits: upload(g, logits, [B, V]),
      state: tensorFrom(g, new Uint32Array([1, 0, 0, 0])),
      temperature: 0,
      topP: 0.9,
    });
    rec.submit();
    const got = Array.from((await readTensor(g, out)) as Int32Array);
    const want = Array.from({ length: B }, (_, b) => argmaxRef(logits.subarray(b * V, (b + 1) * V)));
    assert.deepEqual(got, want, `V=${V}`);
  }
});

Deno.test("sampling draws from softmax(logits / T): chi-square of 2000 draws below 22.46 (6 dof, p=0.001)", async () => {
  const probs = [0.3, 0.05, 0.2, 0.1, 0.15, 0.12, 0.08];
  const V = 7, B = 250, steps = 8;
  for (const temperature of [1, 0.7]) {
    // logits chosen so that softmax(logits / T) = probs
    const row = probs.map((p) => Math.log(p) * temperature + 3);
    const logits = new Float32Array(B * V).map((_, i) => row[i % V]!);
    const { tokens, counter } = await draw(logits, B, V, steps, temperature, 1, 1234);
    assert.equal(counter, 7 + steps);
    const x2 = chiSquare(countsOf(tokens, V), samplingDistributionRef(row, temperature, 1), B * steps);
    assert.ok(x2 < 22.46, `chi-square ${x2.toFixed(2)} at T=${temperature}`);
  }
});

Deno.test("top-p keeps exactly HF's nucleus and draws from it renormalised", async () => {
  const rng = new Rng(61);
  // 7 tokens: nucleus at 0.75 is {0.4, 0.3, 0.15} (mass above 0.1 is 0.85 >= 0.75)
  const probs = [0.1, 0.4, 0.02, 0.15, 0.03, 0.3, 0.0];
  const row = probs.map((p) => (p > 0 ? Math.log(p) : -30));
  const B = 250, steps = 8, V = 7;
  const logits = new Float32Array(B * V).map((_, i) => row[i % V]!);
  const { tokens } = await draw(logits, B, V, steps, 1, 0.75, 99);
  const want = samplingDistributionRef(row, 1, 0.75);
  assert.deepEqual(Array.from(want, (p) => p > 0), [false, true, false, true, false, true, false]);
  const x2 = chiSquare(countsOf(tokens, V), want, B * steps);
  assert.ok(x2 < 13.82, `chi-square ${x2.toFixed(2)} (2 dof, p=0.001)`);

  // a larger vocabulary (several tokens per thread): every draw lies in the reference nucleus
  const V2 = 1037, B2 = 16;
  const big = rng.randn(B2 * V2, 2);
  const got = await draw(big, B2, V2, 4, 0.8, 0.6, 5);
  for (let b = 0; b < B2; b++) {
    const keep = samplingDistributionRef(big.subarray(b * V2, (b + 1) * V2), 0.8, 0.6);
    for (let s = 0; s < 4; s++) {
      const t = got.tokens[b * 4 + s]!;
      assert.ok(keep[t]! > 0, `row ${b} drew token ${t} outside the nucleus`);
    }
  }
});

Deno.test("the same seed gives the same tokens, and successive calls differ", async () => {
  const rng = new Rng(62);
  const V = 1037, B = 3, steps = 6;
  const logits = rng.randn(B * V, 0.5);
  const a = await draw(logits, B, V, steps, 1, 1, 42);
  const b = await draw(logits, B, V, steps, 1, 1, 42);
  const c = await draw(logits, B, V, steps, 1, 1, 43);
  assert.deepEqual(a.tokens, b.tokens);
  assert.notDeepEqual(a.tokens, c.tokens);
  assert.ok(
    new Set(a.tokens.subarray(0, steps)).size > 1,
    "the counter should change the draws between calls",
  );
});
