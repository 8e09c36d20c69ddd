/**
 * The KV-cache append writes this step's keys/values at the position held by the decode state (and
 * sets the cache mask there), leaving every other cache element alone and dropping rows past the
 * cache; the decode advance appends the sampled id to the history and moves the position on. Replaying
 * the same recorded ops walks through successive positions.
 */
import assert from "node:assert/strict";
import { decodeAdvance, kvCacheAppend } from "../../kernels/kv_cache.ts";
import { Recorder, runOps } from "../../src/gpu/recorder.ts";
import { readTensor, tensorFrom } from "../../src/gpu/tensor.ts";
import { gpu, Rng } from "../_util.ts";

Deno.test("kvCacheAppend writes at state[0] for every batch row, sets the mask, drops rows past maxLen", async () => {
  const g = await gpu();
  const rng = new Rng(1);
  const B = 2, T = 3, width = 5, maxLen = 8;
  for (const pos of [0, 2, 6]) {
    const k = Float32Array.from({ length: B * T * width }, () => rng.normal());
    const v = Float32Array.from({ length: B * T * width }, () => rng.normal());
    const kc0 = Float32Array.from({ length: B * maxLen * width }, (_, i) => 1000 + i);
    const vc0 = Float32Array.from({ length: B * maxLen * width }, (_, i) => -1000 - i);
    const mask0 = new Int32Array(B * maxLen).fill(7);
    const kc = tensorFrom(g, kc0), vc = tensorFrom(g, vc0), mask = tensorFrom(g, mask0);
    const state = tensorFrom(g, new Uint32Array([pos, 0, 0, 0]));
    const rec = new Recorder(g);
    kvCacheAppend(rec, kc, vc, mask, tensorFrom(g, k), tensorFrom(g, v), state, {
      batch: B,
      tokens: T,
      width,
      maxLen,
    });
    rec.submit();
    const wantK = kc0.slice(), wantV = vc0.slice(), wantM = mask0.slice();
    for (let b = 0; b < B; b++) {
      for (let t = 0; t < T && pos + t < maxLen; t++) {
        wantM[b * maxLen + pos + t] = 1;
        for (let e = 0; e < width; e++) {
          wantK[(b * maxLen + pos + t) * width + e] = k[(b * T + t) * width + e]!;
          wantV[(b * maxLen + pos + t) * width + e] = v[(b * T + t) * width + e]!;
        }
      }
    }
    assert.deepEqual(await readTensor(g, kc), wantK, `keys at ${pos}`);
    assert.deepEqual(await readTensor(g, vc), wantV, `values at ${pos}`);
    assert.deepEqual(await readTensor(g, mask), wantM, `mask at ${pos}`);
  }
});

Deno.test("decodeAdvance: replayed ops append to the history and advance the position", async () => {
  const g = await gpu();
  const state = tensorFrom(g, new Uint32Array([4, 0, 0, 0]));
  const ids = tensorFrom(g, new Int32Array([0]));
  const history = tensorFrom(g, new Int32Array(3).fill(-1));
  const positions = tensorFrom(g, new Int32Array([-1]));
  const rec = new Recorder(g);
  decodeAdvance(rec, state, ids, history, positions);
  const ops = rec.take();
  for (let s = 0; s < 5; s++) {
    g.device.queue.writeBuffer(ids.buffer, 0, new Int32Array([10 + s]));
    runOps(g, ops);
  }
  assert.deepEqual(await readTensor(g, state), new Uint32Array([9, 5, 0, 0]));
  assert.deepEqual(await readTensor(g, history), new Int32Array([10, 11, 12])); // past its end: dropped
  assert.deepEqual(await readTensor(g, positions), new Int32Array([9]));
});
