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
import assert from "node:assert/strict";
import type { Gpu } from "../../src/gpu/device.ts";
import type { Tensor } from "../../src/gpu/tensor.ts";
import { assertClose, download, downloadF16, gpu, poisoned, Rng, upload, uploadF16 } from "../_util.ts";
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

// f16 activations: inputs rounded to f16 (the float64 references use the rounded values). An f16 output is
// rounded once from f32 (2^-11 relative), so it is held to 2e-3; f32 outputs and gradients computed from
// f16 inputs keep the f32 tolerances, since kernel and reference read the same rounded inputs.
const F16_OUT_TOL = 2e-3;
type Dt = "f32" | "f16";

/** A tensor of `x` in `dtype`, and the values the reference should use. */
function input(g: Gpu, x: Float32Array, dtype: Dt): { t: Tensor; v: Float32Array } {
  if (dtype === "f32") return { t: upload(g, x), v: x };
  const { tensor, values } = uploadF16(g, x);
  return { t: tensor, v: values };
}

function readAs(g: Gpu, t: Tensor): Promise<Float32Array> {
  return t.dtype === "f16" ? downloadF16(g, t) : download(g, t);
}

Deno.test("swiglu with f16 gate, up, out in any mix: f16 out 2e-3, f32 out 1e-5, grads 1e-4", async () => {
  const g = await gpu();
  const rng = new Rng(34);
  // (gate, up, out): the f16 model path, f16 in with f32 out and back, and mixed inputs
  const mixes: [Dt, Dt, Dt][] = [
    ["f16", "f16", "f16"],
    ["f16", "f16", "f32"],
    ["f32", "f32", "f16"],
    ["f16", "f32", "f16"],
  ];
  for (const n of SIZES) {
    for (const [gd, ud, od] of mixes) {
      const gate = input(g, inputs(rng, n), gd), up = input(g, rng.randn(n), ud), dout = rng.randn(n);
      const out = poisoned(g, [n], od), dgate = poisoned(g, [n]), dup = poisoned(g, [n]);
      const rec = new Recorder(g);
      swigluForward(rec, out, gate.t, up.t);
      swigluBackward(rec, dgate, dup, upload(g, dout), gate.t, up.t);
      rec.submit();
      const ref = swigluBackwardRef(dout, gate.v, up.v);
      const what = `n=${n} gate ${gd} up ${ud} out ${od}`;
      for (const from of [0, 4]) {
        const cut = <T extends { slice(i: number): T }>(a: T) => a.slice(Math.min(from, n - 1));
        const tol = od === "f16" ? F16_OUT_TOL : 1e-5;
        assertClose(cut(await readAs(g, out)), cut(swigluRef(gate.v, up.v)), tol, `swiglu out ${what}`);
        assertClose(cut(await download(g, dgate)), cut(ref.dgate), 1e-4, `swiglu dgate ${what}`);
        assertClose(cut(await download(g, dup)), cut(ref.dup), 1e-4, `swiglu dup ${what}`);
      }
    }
  }
});

Deno.test("geluForward with f16 x and/or out, geluBackward with an f16 saved x (f32 dx)", async () => {
  const g = await gpu();
  const rng = new Rng(35);
  const mixes: [Dt, Dt][] = [["f16", "f16"], ["f16", "f32"], ["f32", "f16"]]; // (x, out)
  for (const n of SIZES) {
    for (const [xd, od] of mixes) {
      const x = input(g, inputs(rng, n), xd), dout = rng.randn(n), prior = rng.randn(n);
      const out = poisoned(g, [n], od), dx = poisoned(g, [n]), dxAcc = upload(g, prior);
      const rec = new Recorder(g);
      geluForward(rec, out, x.t);
      geluBackward(rec, dx, upload(g, dout), x.t);
      geluBackward(rec, dxAcc, upload(g, dout), x.t, { accumulate: true });
      rec.submit();
      const ref = geluBackwardRef(dout, x.v);
      const refAcc = ref.map((v, i) => v + prior[i]!);
      const what = `n=${n} x ${xd} out ${od}`;
      for (const from of [0, 4]) {
        const cut = <T extends { slice(i: number): T }>(a: T) => a.slice(Math.min(from, n - 1));
        const tol = od === "f16" ? F16_OUT_TOL : 1e-5;
        assertClose(cut(await readAs(g, out)), cut(geluRef(x.v)), tol, `gelu out ${what}`);
        assertClose(cut(await download(g, dx)), cut(ref), 1e-4, `gelu dx ${what}`);
        assertClose(cut(await download(g, dxAcc)), cut(refAcc), 1e-4, `gelu dx acc ${what}`);
      }
    }
  }
});

Deno.test("addInto adds f16/f32 operands in any mix; addBiasRows adds into f16 rows (f16 2e-3)", async () => {
  const g = await gpu();
  const rng = new Rng(36);
  const N = 7, C = 33;
  const mixes: [Dt, Dt][] = [["f16", "f16"], ["f16", "f32"], ["f32", "f16"]]; // (acc, x)
  for (const [ad, xd] of mixes) {
    const a = input(g, rng.randn(N * C), ad), b = input(g, rng.randn(N * C), xd);
    const rec = new Recorder(g);
    addInto(rec, a.t, b.t);
    rec.submit();
    // an f32 sum of two f32-exact values is exact up to f32 rounding; an f16 acc rounds it once more
    const tol = ad === "f16" ? F16_OUT_TOL : 1e-7;
    assertClose(await readAs(g, a.t), a.v.map((v, i) => v + b.v[i]!), tol, `addInto acc ${ad} += x ${xd}`);
  }
  const rows = uploadF16(g, rng.randn(N * C), [N, C]), bias = rng.randn(C);
  const rec = new Recorder(g);
  addBiasRows(rec, rows.tensor, upload(g, bias));
  rec.submit();
  const want = rows.values.map((v, i) => v + bias[i % C]!);
  assertClose(await downloadF16(g, rows.tensor), want, F16_OUT_TOL, "addBiasRows f16 rows");
});

Deno.test("scaleInto rejects f16 tensors (it sums gradients, which are f32)", async () => {
  const g = await gpu();
  const rec = new Recorder(g);
  const x16 = uploadF16(g, new Rng(37).randn(5)).tensor;
  assert.throws(() => scaleInto(rec, x16, upload(g, new Rng(38).randn(5)), 0.5), /must be f32/);
  assert.throws(() => scaleInto(rec, upload(g, new Rng(39).randn(5)), x16, 0.5), /must be f32/);
});
