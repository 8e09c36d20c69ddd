import {
  addBiasRows,
  addInto,
  geluBackward,
  geluForward,
  scaleInto,
  swigluBackward,
  swigluForward,
} from "../../kernels/activation.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { assertClose, download, gpu, poisoned, Rng, upload } from "../_util.ts";
import { finiteDifference } from "../reference/norm.ts";
import { geluBackwardRef, geluRef, swigluBackwardRef, swigluRef } from "../reference/activation.ts";

const SIZES = [1, 7, 33, 1037];

/** Normal draws with a few extreme values, where exp and tanh overflow if unguarded. */
function inputs(rng: Rng, n: number): Float32Array {
  const x = rng.randn(n, 3);
  if (n > 4) {
    x[1] = 60;
    x[2] = -60;
    x[3] = 120;
  }
  return x;
}

Deno.test("the float64 activation gradients match central finite differences", () => {
  const rng = new Rng(30);
  const x = rng.randn(9, 2), up = rng.randn(9), dout = rng.randn(9);
  const fdGate = finiteDifference((g) => swigluRef(g, up), x, dout);
  const fdUp = finiteDifference((u) => swigluRef(x, u), up, dout);
  const ref = swigluBackwardRef(dout, x, up);
  assertClose(ref.dgate, fdGate, 1e-7, "swiglu dgate vs finite differences");
  assertClose(ref.dup, fdUp, 1e-7, "swiglu dup vs finite differences");
  assertClose(
    geluBackwardRef(dout, x),
    finiteDifference(geluRef, x, dout),
    1e-7,
    "gelu dx vs finite differences",
  );
});

Deno.test("swigluForward and swigluBackward match float64 (1e-5 forward, 1e-4 backward)", async () => {
  const g = await gpu();
  const rng = new Rng(31);
  for (const n of SIZES) {
    const gate = inputs(rng, n), up = rng.randn(n), dout = rng.randn(n);
    const gt = upload(g, gate), ut = upload(g, up);
    const out = poisoned(g, [n]), dgate = poisoned(g, [n]), dup = poisoned(g, [n]);
    const rec = new Recorder(g);
    swigluForward(rec, out, gt, ut);
    swigluBackward(rec, dgate, dup, upload(g, dout), gt, ut);
    rec.submit();
    const ref = swigluBackwardRef(dout, gate, up);
    // the normal part separately, so that the extremes do not dominate the normwise error
    for (const from of [0, 4]) {
      const cut = <T extends { slice(i: number): T }>(a: T) => a.slice(Math.min(from, n - 1));
      assertClose(cut(await download(g, out)), cut(swigluRef(gate, up)), 1e-5, `swiglu out n=${n}`);
      assertClose(cut(await download(g, dgate)), cut(ref.dgate), 1e-4, `swiglu dgate n=${n}`);
      assertClose(cut(await download(g, dup)), cut(ref.dup), 1e-4, `swiglu dup n=${n}`);
    }
  }
});

Deno.test("geluForward and geluBackward match float64 and stay finite for large |x|", async () => {
  const g = await gpu();
  const rng = new Rng(32);
  for (const n of SIZES) {
    const x = inputs(rng, n), dout = rng.randn(n), prior = rng.randn(n);
    const xt = upload(g, x);
    const out = poisoned(g, [n]), dx = poisoned(g, [n]), dxAcc = upload(g, prior);
    const rec = new Recorder(g);
    geluForward(rec, out, xt);
    geluBackward(rec, dx, upload(g, dout), xt);
    geluBackward(rec, dxAcc, upload(g, dout), xt, { accumulate: true });
    rec.submit();
    const ref = geluBackwardRef(dout, x);
    const refAcc = ref.map((v, i) => v + prior[i]!);
    // the normal part separately, so that the extremes do not dominate the normwise error
    for (const from of [0, 4]) {
      const cut = <T extends { slice(i: number): T }>(a: T) => a.slice(Math.min(from, n - 1));
      assertClose(cut(await download(g, out)), cut(geluRef(x)), 1e-5, `gelu out n=${n}`);
      assertClose(cut(await download(g, dx)), cut(ref), 1e-4, `gelu dx n=${n}`);
      assertClose(cut(await download(g, dxAcc)), cut(refAcc), 1e-4, `gelu dx acc n=${n}`);
    }
  }
});

Deno.test("addInto, scaleInto and addBiasRows add exactly as f32", async () => {
  const g = await gpu();
  const rng = new Rng(33);
  const N = 7, C = 33;
  const a = rng.randn(N * C), b = rng.randn(N * C), bias = rng.randn(C);
  const acc = upload(g, a, [N, C]), acc2 = upload(g, a, [N, C]), rows = upload(g, a, [N, C]);
  const rec = new Recorder(g);
  addInto(rec, acc, upload(g, b, [N, C]));
  scaleInto(rec, acc2, upload(g, b, [N, C]), 0.3);
  addBiasRows(rec, rows, upload(g, bias));
  rec.submit();
  const s = Math.fround(0.3);
  assertClose(await download(g, acc), a.map((v, i) => v + b[i]!), 1e-7, "addInto");
  assertClose(await download(g, acc2), Float64Array.from(a, (v, i) => v + s * b[i]!), 1e-7, "scaleInto");
  assertClose(await download(g, rows), a.map((v, i) => v + bias[i % C]!), 1e-7, "addBiasRows");
});
