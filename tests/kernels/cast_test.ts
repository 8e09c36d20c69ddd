/**
 * The f32 ↔ f16 casts: f32 → f16 rounds every element to a neighbouring f16 (within one f16 ulp of
 * round-to-nearest-even, computed here in float64) and f16 → f32 is exact, for odd sizes, with the
 * outputs poisoned with NaN first so an unwritten element fails.
 */
import assert from "node:assert/strict";
import { castElements } from "../../kernels/cast.ts";
import { fill } from "../../kernels/fill.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { createTensor, readTensor, tensorFrom } from "../../src/gpu/tensor.ts";
import { f16ArrayToF32, f32ArrayToF16 } from "../../src/io/dtype.ts";
import { gpu, poisoned, Rng } from "../_util.ts";

/** The f16 spacing at |x| (normal range; 2^-24 below it). */
function f16Ulp(x: number): number {
  const a = Math.abs(x);
  if (a < 2 ** -14) return 2 ** -24;
  return 2 ** (Math.floor(Math.log2(a)) - 10);
}

Deno.test("castElements f32 → f16 → f32: each f16 within one ulp of round-to-nearest, back exactly", async () => {
  const g = await gpu();
  const rng = new Rng(7);
  for (const n of [1, 7, 33, 1025]) {
    // magnitudes from 1e-6 to 6e4: subnormals, normals, near the f16 maximum (65504)
    const src = Float32Array.from(
      { length: n },
      () => Math.sign(rng.normal()) * Math.min(6e4, (1 + rng.next()) * 10 ** (rng.next() * 10.5 - 6)),
    );
    const half = createTensor(g, [n], "f16", "half");
    const rec = new Recorder(g);
    fill(rec, half, 0x7e007e00); // both halves of every word: f16 NaN
    castElements(rec, half, tensorFrom(g, src));
    const back = poisoned(g, [n]);
    castElements(rec, back, half);
    rec.submit();
    const bits = (await readTensor(g, half)) as Uint16Array;
    const got = f16ArrayToF32(bits.subarray(0, n));
    const rne = f16ArrayToF32(f32ArrayToF16(src));
    for (let i = 0; i < n; i++) {
      assert.ok(Number.isFinite(got[i]!), `n=${n} element ${i} unwritten or overflowed: ${got[i]}`);
      assert.ok(
        Math.abs(got[i]! - rne[i]!) <= f16Ulp(rne[i]!),
        `n=${n} [${i}] ${src[i]} → ${got[i]} (RNE ${rne[i]})`,
      );
    }
    assert.deepEqual(await readTensor(g, back), got, `n=${n}: f16 → f32 is exact`);
  }
});

Deno.test("castElements refuses other dtype pairs and a destination too small", async () => {
  const g = await gpu();
  const rec = new Recorder(g);
  const f = tensorFrom(g, new Float32Array(4));
  assert.throws(() => castElements(rec, tensorFrom(g, new Float32Array(4)), f), /f32 → f16 or f16 → f32/);
  assert.throws(() => castElements(rec, createTensor(g, [3], "f16"), f), /smaller/);
});
