/**
 * The KV-cache append writes this step's keys/values at the position held by the decode state (and
 * sets the cache mask there), leaving every other cache element alone and dropping rows past the
 * cache; the decode advance appends the sampled id to the history and moves the position on. Replaying
 * the same recorded ops walks through successive positions. Keys, values, queries and caches may each
 * be f16 (activations); an f16 cache is poisoned with f16 NaN so that both the written rows and the
 * untouched ones are checked.
 */
import assert from "node:assert/strict";
import { decodeAdvance, kvCacheAppend, kvCacheAppendRope } from "../../kernels/kv_cache.ts";
import { Recorder, runOps } from "../../src/gpu/recorder.ts";
import { readTensor, type Tensor, tensorFrom } from "../../src/gpu/tensor.ts";
import { assertClose, download, downloadF16, gpu, poisoned, Rng, upload, uploadF16 } from "../_util.ts";
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

/** f16 NaN, the poison of `poisoned(g, shape, "f16")`: cache elements never written keep these bits. */
const F16_POISON = 0x7e00;

/** Splits a (B, maxLen, width) cache into the elements of appended rows and the untouched rest. */
function appendedRows(
  cache: ArrayLike<number>,
  B: number,
  T: number,
  width: number,
  maxLen: number,
  pos: number,
): { written: number[]; rest: number[]; src: number[] } {
  const written: number[] = [], rest: number[] = [], src: number[] = [];
  for (let b = 0; b < B; b++) {
    for (let j = 0; j < maxLen; j++) {
      const t = j - pos;
      for (let e = 0; e < width; e++) {
        const x = cache[(b * maxLen + j) * width + e]!;
        if (t >= 0 && t < T) {
          written.push(x);
          src.push((b * T + t) * width + e); // the element of this step's (B, T, width) it came from
        } else rest.push(x);
      }
    }
  }
  return { written, rest, src };
}

// One f16 rounding of the stored value: 2^-11 relative to nearest; WGSL lets f32 → f16 take either
// neighbour, so allow one f16 ulp, 2^-10.
const TOL_F16_OUT = 2 ** -10;

Deno.test("kvCacheAppend into f16 caches: f16 keys/values copied exactly, f32 rounded once, the rest untouched", async () => {
  const g = await gpu();
  if (!g.hasF16) return;
  const rng = new Rng(3);
  const B = 2, T = 3, width = 7, maxLen = 9; // odd width: f16 rows are not 4-byte aligned
  for (const [pos, inDtype] of [[0, "f16"], [4, "f16"], [7, "f16"], [5, "f32"]] as const) {
    const kData = rng.randn(B * T * width), vData = rng.randn(B * T * width);
    const [k, v] = [kData, vData].map((d) =>
      inDtype === "f16" ? uploadF16(g, d, [B, T, width]) : { tensor: upload(g, d, [B, T, width]), values: d }
    ) as [{ tensor: Tensor; values: Float32Array }, { tensor: Tensor; values: Float32Array }];
    const kc = poisoned(g, [B, maxLen, width], "f16"), vc = poisoned(g, [B, maxLen, width], "f16");
    const mask = tensorFrom(g, new Int32Array(B * maxLen).fill(7));
    const rec = new Recorder(g);
    kvCacheAppend(rec, kc, vc, mask, k.tensor, v.tensor, tensorFrom(g, new Uint32Array([pos, 0, 0, 0])), {
      batch: B,
      tokens: T,
      width,
      maxLen,
    });
    rec.submit();
    const wantM = new Int32Array(B * maxLen).fill(7);
    for (let b = 0; b < B; b++) {
      for (let t = 0; t < T && pos + t < maxLen; t++) wantM[b * maxLen + pos + t] = 1;
    }
    assert.deepEqual(await readTensor(g, mask), wantM, `mask at ${pos}`);
    for (const [cache, src, name] of [[kc, k, "keys"], [vc, v, "values"]] as const) {
      const bits = await readTensor(g, cache) as Uint16Array;
      const { written, rest, src: from } = appendedRows(
        await downloadF16(g, cache),
        B,
        T,
        width,
        maxLen,
        pos,
      );
      const want = from.map((i) => src.values[i]!);
      // f16 → f16 is a copy (tolerance 0); f32 → f16 rounds once
      assertClose(written, want, inDtype === "f16" ? 0 : TOL_F16_OUT, `${inDtype} ${name} at ${pos}`);
      const untouched = appendedRows(bits, B, T, width, maxLen, pos).rest;
      assert.equal(rest.length, untouched.length);
      assert.ok(
        untouched.every((b) => b === F16_POISON),
        `${name} outside the appended rows untouched at ${pos}`,
      );
    }
  }
});

Deno.test("kvCacheAppendRope with f16 q/k/v and f16 caches matches the float64 RoPE reference on the rounded inputs", async () => {
  const g = await gpu();
  if (!g.hasF16) return;
  const rng = new Rng(4);
  const B = 2, T = 3, H = 3, Hkv = 1, D = 6, maxLen = 5; // odd head counts and rows; pos 3 drops a row
  const width = Hkv * D;
  const invFreq = invFreqRef(D, 10000);
  for (const pos of [0, 3]) {
    const positions = Int32Array.from({ length: B * T }, (_, n) => pos + (n % T) + 17 * Math.floor(n / T));
    const q = uploadF16(g, rng.randn(B * T * H * D), [B * T, H * D]);
    const k = uploadF16(g, rng.randn(B * T * width), [B * T, width]);
    const v = uploadF16(g, rng.randn(B * T * width), [B * T, width]);
    const kc = poisoned(g, [B, maxLen, width], "f16"), vc = poisoned(g, [B, maxLen, width], "f16");
    const mask = tensorFrom(g, new Int32Array(B * maxLen).fill(7));
    const rec = new Recorder(g);
    kvCacheAppendRope(
      rec,
      kc,
      vc,
      mask,
      q.tensor,
      k.tensor,
      v.tensor,
      tensorFrom(g, invFreq),
      tensorFrom(g, positions),
      tensorFrom(g, new Uint32Array([pos, 0, 0, 0])),
      { batch: B, tokens: T, numHeads: H, numKvHeads: Hkv, maxLen },
    );
    rec.submit();
    // f32 cos/sin (1e-5, the RoPE tests' tolerance) then one f16 rounding of the result (≤ 2^-10): 2e-3
    const tol = 2e-3;
    assertClose(
      await downloadF16(g, q.tensor),
      ropeRef(q.values, invFreq, positions, H),
      tol,
      `f16 q at ${pos}`,
    );
    const kRot = ropeRef(k.values, invFreq, positions, Hkv);
    const keys = appendedRows(await downloadF16(g, kc), B, T, width, maxLen, pos);
    assertClose(keys.written, keys.src.map((i) => kRot[i]!), tol, `f16 rotated keys at ${pos}`);
    const values = appendedRows(await downloadF16(g, vc), B, T, width, maxLen, pos);
    assertClose(values.written, values.src.map((i) => v.values[i]!), 0, `f16 values copied at ${pos}`);
    for (const [cache, name] of [[kc, "keys"], [vc, "values"]] as const) {
      const rest = appendedRows(await readTensor(g, cache) as Uint16Array, B, T, width, maxLen, pos).rest;
      assert.ok(rest.every((b) => b === F16_POISON), `${name} outside the appended rows untouched at ${pos}`);
    }
    const wantM = new Int32Array(B * maxLen).fill(7);
    for (let b = 0; b < B; b++) {
      for (let t = 0; t < T && pos + t < maxLen; t++) wantM[b * maxLen + pos + t] = 1;
    }
    assert.deepEqual(await readTensor(g, mask), wantM, `mask at ${pos}`);
  }
});
