import assert from "node:assert/strict";
import { ropeBackward, ropeBackwardInPlace, ropeForward, ropeInPlace } from "../../kernels/rope.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { tensorFrom } from "../../src/gpu/tensor.ts";
import { assertClose, download, gpu, poisoned, Rng, upload } from "../_util.ts";
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
