import assert from "node:assert/strict";
import { ropeBackward, ropeBackwardInPlace, ropeForward, ropeInPlace } from "../../kernels/rope.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { createStacked, type Tensor, tensorFrom, writeTensor } from "../../src/gpu/tensor.ts";
import { GpuError } from "../../src/errors.ts";
import { assertClose, download, downloadF16, gpu, poisoned, Rng, upload, uploadF16 } from "../_util.ts";
import { finiteDifference } from "../reference/norm.ts";
import { invFreqRef, ropeRef } from "../reference/rope.ts";

// Positions up to ~100: WGSL cos/sin of f32 angles up to 100 rad stay within 1e-5 (normwise) of float64
// here; drivers with cruder range reduction may need care at thousands of positions.
const CASES: [number, number, number][] = [[1, 1, 2], [7, 3, 8], [33, 2, 64], [130, 1, 18]]; // N, H, D

function positionsFor(rng: Rng, N: number): Int32Array {
  const p = rng.ints(N, 100);
  p[0] = 0;
  return p;
}

Deno.test("the float64 rope transpose is the gradient (finite differences)", () => {
  const rng = new Rng(20);
  const N = 3, H = 2, D = 4;
  const inv = invFreqRef(D, 10000), pos = positionsFor(rng, N);
  const x = rng.randn(N * H * D), dout = rng.randn(N * H * D);
  const fd = finiteDifference((xx) => ropeRef(xx, inv, pos, H), x, dout);
  assertClose(ropeRef(dout, inv, pos, H, -1), fd, 1e-7, "rope backward vs finite differences");
});

Deno.test("ropeForward and ropeInPlace match float64 within 1e-5 for positions below 100", async () => {
  const g = await gpu();
  const rng = new Rng(21);
  for (const [N, H, D] of CASES) {
    const inv = invFreqRef(D, 10000), pos = positionsFor(rng, N), x = rng.randn(N * H * D);
    const invT = upload(g, inv), posT = tensorFrom(g, pos);
    const out = poisoned(g, [N, H * D]);
    const inPlace = upload(g, x, [N, H * D]);
    const rec = new Recorder(g);
    ropeForward(rec, out, upload(g, x, [N, H * D]), invT, posT, H);
    ropeInPlace(rec, inPlace, invT, posT, H);
    rec.submit();
    const ref = ropeRef(x, inv, pos, H);
    assertClose(await download(g, out), ref, 1e-5, `rope out N=${N} H=${H} D=${D}`);
    assertClose(await download(g, inPlace), ref, 1e-5, `rope in place N=${N} H=${H} D=${D}`);
  }
});

Deno.test("ropeBackward and ropeBackwardInPlace apply the transpose rotation within 1e-5", async () => {
  const g = await gpu();
  const rng = new Rng(22);
  for (const [N, H, D] of CASES) {
    const inv = invFreqRef(D, 500000), pos = positionsFor(rng, N), dout = rng.randn(N * H * D);
    const invT = upload(g, inv), posT = tensorFrom(g, pos);
    const dx = poisoned(g, [N, H * D]);
    const inPlace = upload(g, dout, [N, H * D]);
    const rec = new Recorder(g);
    ropeBackward(rec, dx, upload(g, dout, [N, H * D]), invT, posT, H);
    ropeBackwardInPlace(rec, inPlace, invT, posT, H);
    rec.submit();
    const ref = ropeRef(dout, inv, pos, H, -1);
    assertClose(await download(g, dx), ref, 1e-5, `rope dx N=${N} H=${H} D=${D}`);
    assertClose(await download(g, inPlace), ref, 1e-5, `rope dx in place N=${N} H=${H} D=${D}`);
  }
});

// q (N, H*D) followed by k (N, Hkv*D) in one buffer, as a stacked q/k/v buffer holds them, then v, which
// must stay untouched: one dispatch rotates q and k (forward and the transpose), each as its own tensor would
// (sizes whose offsets are multiples of 256 bytes: bindable on every device)
Deno.test("ropeInPlace and ropeBackwardInPlace rotate q and the k that follows it in one dispatch", async () => {
  const g = await gpu();
  const rng = new Rng(24);
  for (const [N, H, Hkv, D] of [[8, 3, 1, 8], [33, 4, 2, 64], [4, 2, 2, 16]] as const) {
    const qn = N * H * D, kn = N * Hkv * D, vn = N * Hkv * D;
    for (const inverse of [false, true]) {
      const inv = invFreqRef(D, 10000), pos = positionsFor(rng, N);
      const data = rng.randn(qn + kn + vn);
      const stack = createStacked(g, [[N, H * D], [N, Hkv * D], [N, Hkv * D]], "f32", "qkv");
      assert.ok(stack, "bindable offsets");
      const [q, k] = stack.parts as [Tensor, Tensor];
      writeTensor(g, stack.whole, Float32Array.from(data));
      const rec = new Recorder(g);
      const rope = inverse ? ropeBackwardInPlace : ropeInPlace;
      rope(rec, q, upload(g, inv), tensorFrom(g, pos), H, { x: k, numHeads: Hkv });
      assert.equal(rec.take().length, 1, "one dispatch");
      const rec2 = new Recorder(g);
      rope(rec2, q, upload(g, inv), tensorFrom(g, pos), H, { x: k, numHeads: Hkv });
      rec2.submit();
      const got = await download(g, stack.whole);
      const sign = inverse ? -1 : 1;
      const what = `${inverse ? "backward" : "forward"} N=${N} H=${H} Hkv=${Hkv} D=${D}`;
      assertClose(got.subarray(0, qn), ropeRef(data.subarray(0, qn), inv, pos, H, sign), 1e-5, `q ${what}`);
      assertClose(
        got.subarray(qn, qn + kn),
        ropeRef(data.subarray(qn, qn + kn), inv, pos, Hkv, sign),
        1e-5,
        `k ${what}`,
      );
      assert.deepEqual(
        got.subarray(qn + kn),
        Float32Array.from(data.subarray(qn + kn)),
        `v untouched ${what}`,
      );
    }
  }
  // a second tensor elsewhere is refused
  const x = upload(g, rng.randn(8), [1, 8]), y = upload(g, rng.randn(8), [1, 8]);
  const inv = upload(g, invFreqRef(8, 10000)), pos = tensorFrom(g, new Int32Array([0]));
  assert.throws(() => ropeInPlace(new Recorder(g), x, inv, pos, 1, { x: y, numHeads: 1 }), GpuError);
});

// f16 queries/keys: x rounded to f16 (the reference rotates the rounded values). An f16 output is rounded
// once from the f32 rotation (2^-11 relative): 2e-3; an f32 output of an f16 input keeps 1e-5.
Deno.test("ropeForward/ropeInPlace rotate f16 q/k: f16 out within 2e-3, f32 out of f16 x 1e-5", async () => {
  const g = await gpu();
  const rng = new Rng(23);
  for (const [N, H, D] of CASES) {
    const inv = invFreqRef(D, 10000), pos = positionsFor(rng, N);
    const x = uploadF16(g, rng.randn(N * H * D), [N, H * D]), x32 = rng.randn(N * H * D);
    const invT = upload(g, inv), posT = tensorFrom(g, pos);
    const out16 = poisoned(g, [N, H * D], "f16"), out32 = poisoned(g, [N, H * D]);
    const out16of32 = poisoned(g, [N, H * D], "f16");
    const inPlace = uploadF16(g, x.values, [N, H * D]).tensor;
    const rec = new Recorder(g);
    ropeForward(rec, out16, x.tensor, invT, posT, H);
    ropeForward(rec, out32, x.tensor, invT, posT, H);
    ropeForward(rec, out16of32, upload(g, x32, [N, H * D]), invT, posT, H);
    ropeInPlace(rec, inPlace, invT, posT, H);
    rec.submit();
    const ref = ropeRef(x.values, inv, pos, H);
    const what = `N=${N} H=${H} D=${D}`;
    assertClose(await downloadF16(g, out16), ref, 2e-3, `rope f16 -> f16 ${what}`);
    assertClose(await download(g, out32), ref, 1e-5, `rope f16 -> f32 ${what}`);
    assertClose(await downloadF16(g, out16of32), ropeRef(x32, inv, pos, H), 2e-3, `rope f32 -> f16 ${what}`);
    assertClose(await downloadF16(g, inPlace), ref, 2e-3, `rope f16 in place ${what}`);
  }
});

Deno.test("ropeBackward rejects f16 gradients (gradients are f32)", async () => {
  const g = await gpu();
  const rec = new Recorder(g);
  const inv = upload(g, invFreqRef(4, 1e4)), pos = tensorFrom(g, new Int32Array(3));
  const d16 = poisoned(g, [3, 8], "f16");
  assert.throws(() => ropeBackward(rec, poisoned(g, [3, 8]), d16, inv, pos, 2), /must be f32/);
  assert.throws(() => ropeBackwardInPlace(rec, d16, inv, pos, 2), /must be f32/);
});

Deno.test("rope rejects a tensor whose size is not N * H * D", async () => {
  const g = await gpu();
  const rec = new Recorder(g);
  assert.throws(() =>
    ropeForward(
      rec,
      poisoned(g, [3, 10]),
      poisoned(g, [3, 10]),
      upload(g, invFreqRef(4, 1e4)),
      tensorFrom(g, new Int32Array(3)),
      2,
    )
  );
});
