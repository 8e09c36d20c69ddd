/**
 * KV-cache decoding equals the full forward: a prefill plus one-token steps give the same logits as
 * a forward over the whole sequence (≤ 1e-5 relative), for batch 1 and for batch 3 with right padding,
 * on llama (GQA), mistral and gpt2; greedy `generate` equals a loop of full forwards (no cache); and the
 * replayed decode step gives the same tokens as recording every step (greedy, sampled, chunks, stops).
 * One-token steps run the fused decode layers (checked: `decodeFusable`), so the comparisons above hold
 * for them; switched off, the general forward gives the same logits.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { forward, generate, loadModel, type Model } from "../../mod.ts";
import { createDecoder, createKvCache, generateStream } from "../../src/models/generate.ts";
import { activationsFor, decodeFusable, decodeTuning } from "../../src/models/transformer.ts";
import { runningAdapter } from "../../src/models/model.ts";
import { assertClose, Rng } from "../_util.ts";
import { addGatedAdapter } from "./_gated_adapter.ts";

const ROOT = new URL("../fixtures/golden/", import.meta.url).pathname;

async function modelWithAdapter(name: string): Promise<Model> {
  const model = await loadModel(join(ROOT, name, "model"), { maxSeqLen: 64 });
  addGatedAdapter(model);
  return model;
}

function lastRows(logits: Float32Array, B: number, T: number, V: number, at: number[]): Float32Array {
  const out = new Float32Array(B * V);
  for (let b = 0; b < B; b++) out.set(logits.subarray((b * T + at[b]!) * V, (b * T + at[b]! + 1) * V), b * V);
  return out;
}

for (const name of ["llama_gqa_pad", "mistral_gqa", "gpt2_basic"]) {
  Deno.test(`${name}: prefill + steps = full forward, batch 1 and batch 3 with padding`, async () => {
    const model = await modelWithAdapter(name);
    const V = model.config.vocabSize;
    const rng = new Rng(3);
    const B = 3, T0 = 5, steps = 4, T = T0 + steps;
    const ids = Array.from({ length: B }, () => Array.from(rng.ints(T, V)));
    // row 2 is padded after 3 prompt tokens; its later positions are masked out
    const mask = ids.map((row, b) => row.map((_, t) => (b === 2 && t >= 3 && t < T0 ? 0 : 1)));
    const full = await forward(model, { inputIds: ids, attentionMask: mask });
    const dec = createDecoder(model, B);
    let got = await dec.prefill({
      inputIds: ids.map((r) => r.slice(0, T0)),
      attentionMask: mask.map((r) => r.slice(0, T0)),
    });
    assertClose(got, lastRows(full.logits, B, T, V, [T0 - 1, T0 - 1, T0 - 1]), 1e-5, "prefill logits");
    for (let s = 0; s < steps; s++) {
      const t = T0 + s;
      got = await dec.step(ids.map((r) => r[t]!), mask.map((r) => r[t]!));
      assertClose(got, lastRows(full.logits, B, T, V, [t, t, t]), 1e-5, `step ${s} logits`);
    }
    const one = createDecoder(model, 1);
    const single = await one.prefill({ inputIds: [ids[0]!.slice(0, T0)] });
    assertClose(single, lastRows(full.logits, B, T, V, [T0 - 1]).subarray(0, V), 1e-5, "batch 1 prefill");
    for (let s = 0; s < steps; s++) {
      const got1 = await one.step([ids[0]![T0 + s]!]);
      assertClose(got1, lastRows(full.logits, B, T, V, [T0 + s]).subarray(0, V), 1e-5, `batch 1 step ${s}`);
    }
  });
}

Deno.test("one-token steps take the fused decode layers, which give the general forward's logits", async () => {
  for (const name of ["llama_gqa_pad", "mistral_gqa", "gpt2_basic"]) {
    const model = await modelWithAdapter(name);
    const fusable = (B: number) =>
      decodeFusable(model, activationsFor(model, B, 1, false), {
        adapter: runningAdapter(model),
        masked: true,
        head: {},
        cache: { kv: createKvCache(model, B), past: 3 },
      });
    assert.ok(fusable(1) && fusable(3), `${name}: decode steps are not fused`);
    const rng = new Rng(4);
    const ids = Array.from({ length: 2 }, () => Array.from(rng.ints(7, model.config.vocabSize)));
    const run = async (fused: boolean) => {
      decodeTuning.fused = fused;
      try {
        const dec = createDecoder(model, 2);
        const out = [await dec.prefill({ inputIds: ids.map((r) => r.slice(0, 4)) })];
        for (let t = 4; t < 7; t++) out.push(await dec.step(ids.map((r) => r[t]!), [1, t === 5 ? 0 : 1]));
        return out;
      } finally {
        decodeTuning.fused = true;
      }
    };
    const general = await run(false), fused = await run(true);
    general.forEach((g, i) => assertClose(fused[i]!, g, 1e-5, `${name} step ${i}: fused vs general`));
  }
});

Deno.test("a replayed prefill takes each call's prompt: same-length prompts give their own tokens", async () => {
  const model = await modelWithAdapter("llama_gqa_pad");
  const rng = new Rng(11);
  const V = model.config.vocabSize;
  const a = Array.from(rng.ints(6, V)), b = Array.from(rng.ints(6, V)), c = Array.from(rng.ints(9, V));
  const fresh: number[][] = [];
  for (const p of [a, b, c]) fresh.push(await generate(model, p, { maxNewTokens: 5, replay: false }));
  for (const [i, p] of [a, b, a, c, b].entries()) {
    const want = fresh[[a, b, c].indexOf(p)]!;
    assert.deepEqual(await generate(model, p, { maxNewTokens: 5 }), want, `call ${i}`);
  }
});

Deno.test("greedy generate with the KV cache equals greedy decoding by full forwards (no cache)", async () => {
  const model = await modelWithAdapter("llama_basic");
  const V = model.config.vocabSize;
  const prompt = [5, 17, 42, 99];
  const cached = await generate(model, prompt, { maxNewTokens: 8 });
  const seq = [...prompt];
  for (let i = 0; i < 8; i++) {
    const { logits } = await forward(model, { inputIds: [seq] });
    const last = logits.subarray((seq.length - 1) * V, seq.length * V);
    let best = 0;
    for (let v = 1; v < V; v++) if (last[v]! > last[best]!) best = v;
    seq.push(best);
  }
  assert.deepEqual(cached, seq.slice(prompt.length));
});

Deno.test("replayed decode steps give the tokens of per-step recording: greedy, sampled, chunks, stops", async () => {
  for (const name of ["llama_gqa_pad", "mistral_gqa", "gpt2_basic"]) {
    const model = await modelWithAdapter(name);
    const V = model.config.vocabSize;
    const rng = new Rng(11);
    const long = Array.from(rng.ints(9, V)), short = Array.from(rng.ints(3, V));
    for (const prompt of [long, short, long]) {
      const want = await generate(model, prompt, { maxNewTokens: 70, replay: false });
      assert.equal(want.length, 64 - prompt.length, `${name}: capped at maxSeqLen`);
      for (const chunk of [1, 3, 32]) {
        const got = await generate(model, prompt, { maxNewTokens: 70, chunk });
        assert.deepEqual(got, want, `${name} greedy, prompt ${prompt.length}, chunk ${chunk}`);
      }
      const few = await generate(model, prompt, { maxNewTokens: 5 });
      assert.deepEqual(few, want.slice(0, 5), `${name}: 5 new tokens`);
      const sampling = { maxNewTokens: 20, temperature: 0.9, topP: 0.8, seed: 7 };
      const sampled = await generate(model, prompt, { ...sampling, replay: false });
      assert.deepEqual(await generate(model, prompt, { ...sampling, chunk: 4 }), sampled, `${name} sampled`);
      const stopAt = want[6]!;
      const stopped = await generate(model, prompt, { maxNewTokens: 30, stop: [stopAt], chunk: 4 });
      assert.deepEqual(stopped, want.slice(0, want.indexOf(stopAt) + 1), `${name}: stop token`);
    }
    // a stream abandoned mid-way leaves nothing behind for the next call
    for await (const _ of generateStream(model, long, { maxNewTokens: 40, chunk: 2 })) break;
    const again = await generate(model, short, { maxNewTokens: 12 });
    assert.deepEqual(
      again,
      await generate(model, short, { maxNewTokens: 12, replay: false }),
      `${name}: after break`,
    );
  }
});
