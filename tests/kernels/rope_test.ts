import assert from "node:assert/strict";
import { ropeBackward, ropeBackwardInPlace, ropeForward, ropeInPlace } from "../../kernels/rope.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { tensorFrom } from "../../src/gpu/tensor.ts";
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
