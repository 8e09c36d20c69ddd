/**
 * The KV-cache append writes this step's keys/values at the position held by the decode state (and
 * sets the cache mask there), leaving every other cache element alone and dropping rows past the
 * cache; the decode advance appends the sampled id to the history and moves the position on. Replaying
 * the same recorded ops walks through successive positions.
 */
import assert from "node:assert/strict";
import { decodeAdvance, kvCacheAppend, kvCacheAppendRope } from "../../kernels/kv_cache.ts";
import { Recorder, runOps } from "../../src/gpu/recorder.ts";
import { readTensor, tensorFrom } from "../../src/gpu/tensor.ts";
import { assertClose, download, gpu, Rng } from "../_util.ts";
import { invFreqRef, ropeRef } from "../reference/rope.ts";

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

Deno.test("kvCacheAppendRope rotates q in place and k into the cache (float64 RoPE reference), copies v, sets the mask", async () => {
  const g = await gpu();
  const rng = new Rng(2);
  const B = 2, T = 2, H = 6, Hkv = 2, D = 10, maxLen = 7;
  const width = Hkv * D;
  const invFreq = invFreqRef(D, 10000);
  for (const pos of [0, 3, 6]) {
    const positions = Int32Array.from({ length: B * T }, (_, n) => pos + (n % T) + 40 * (n >> 1));
    const q = rng.randn(B * T * H * D);
    const k = rng.randn(B * T * width);
    const v = rng.randn(B * T * width);
    const kc0 = Float32Array.from({ length: B * maxLen * width }, (_, i) => 1000 + i);
    const vc0 = Float32Array.from({ length: B * maxLen * width }, (_, i) => -1000 - i);
    const mask0 = new Int32Array(B * maxLen).fill(7);
    const kc = tensorFrom(g, kc0), vc = tensorFrom(g, vc0), mask = tensorFrom(g, mask0);
    const qt = tensorFrom(g, q);
    const rec = new Recorder(g);
    kvCacheAppendRope(
      rec,
      kc,
      vc,
      mask,
      qt,
      tensorFrom(g, k),
      tensorFrom(g, v),
      tensorFrom(g, invFreq),
      tensorFrom(g, positions),
      tensorFrom(g, new Uint32Array([pos, 0, 0, 0])),
      { batch: B, tokens: T, numHeads: H, numKvHeads: Hkv, maxLen },
    );
    rec.submit();
    const kRot = ropeRef(k, invFreq, positions, Hkv);
    const gotK = await readTensor(g, kc) as Float32Array;
    const wantV = vc0.slice(), wantM = mask0.slice();
    const written: number[] = [], wantWritten: number[] = [];
    const untouched = kc0.slice();
    for (let b = 0; b < B; b++) {
      for (let t = 0; t < T && pos + t < maxLen; t++) {
        wantM[b * maxLen + pos + t] = 1;
        for (let e = 0; e < width; e++) {
          const at = (b * maxLen + pos + t) * width + e;
          written.push(gotK[at]!);
          wantWritten.push(kRot[(b * T + t) * width + e]!);
          untouched[at] = gotK[at]!;
          wantV[at] = v[(b * T + t) * width + e]!;
        }
      }
    }
    // f32 cos/sin against float64: ≤ 1e-5 relative (the RoPE tests' tolerance, positions below 100)
    assertClose(await download(g, qt), ropeRef(q, invFreq, positions, H), 1e-5, `q at ${pos}`);
    assertClose(written, wantWritten, 1e-5, `rotated keys at ${pos}`);
    assert.deepEqual(gotK, untouched, `keys outside the appended rows untouched at ${pos}`);
    assert.deepEqual(await readTensor(g, vc), wantV, `values at ${pos}`);
    assert.deepEqual(await readTensor(g, mask), wantM, `mask at ${pos}`);
  }
});
