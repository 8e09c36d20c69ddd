import { layernormBackward, layernormForward, rmsnormBackward, rmsnormForward } from "../../kernels/norm.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import type { Gpu } from "../../src/gpu/device.ts";
import type { Tensor } from "../../src/gpu/tensor.ts";
import { assertClose, download, downloadF16, gpu, poisoned, Rng, upload, uploadF16 } from "../_util.ts";
import {
  finiteDifference,
  layernormBackwardRef,
  layernormRef,
  rmsnormBackwardRef,
  rmsnormRef,
} from "../reference/norm.ts";

// Shapes: a single row, an odd count below the workgroup size, and C above it (threads loop over channels,
// up to 5 times at C = 1100).
const SHAPES: [number, number][] = [[1, 7], [7, 33], [33, 130], [5, 577], [3, 1100]];
const EPS = 1e-5;

Deno.test("the float64 norm gradients match central finite differences", () => {
  const rng = new Rng(10);
  const N = 3, C = 7;
  const x = rng.randn(N * C), w = rng.randn(C), dout = rng.randn(N * C);
  const fdR = finiteDifference((xx) => rmsnormRef(xx, w, N, C, EPS).out, x, dout);
  assertClose(rmsnormBackwardRef(dout, x, w, N, C, EPS), fdR, 1e-7, "rmsnorm dx vs finite differences");
  const b = rng.randn(C);
  const fdL = finiteDifference((xx) => layernormRef(xx, w, b, N, C, EPS).out, x, dout);
  assertClose(layernormBackwardRef(dout, x, w, N, C, EPS), fdL, 1e-7, "layernorm dx vs finite differences");
});

Deno.test("rmsnormForward matches float64 within 1e-5 and saves rstd", async () => {
  const g = await gpu();
  const rng = new Rng(11);
  for (const [N, C] of SHAPES) {
    const x = rng.randn(N * C, 2), w = rng.randn(C);
    const out = poisoned(g, [N, C]), rstd = poisoned(g, [N]);
    const rec = new Recorder(g);
    rmsnormForward(rec, out, rstd, upload(g, x, [N, C]), upload(g, w), EPS);
    rec.submit();
    const ref = rmsnormRef(x, w, N, C, EPS);
    assertClose(await download(g, out), ref.out, 1e-5, `rmsnorm out ${N}x${C}`);
    assertClose(await download(g, rstd), ref.rstd, 1e-5, `rmsnorm rstd ${N}x${C}`);
  }
});

Deno.test("rmsnormBackward matches the float64 gradient within 1e-4, overwriting or accumulating", async () => {
  const g = await gpu();
  const rng = new Rng(12);
  for (const [N, C] of SHAPES) {
    const x = rng.randn(N * C), w = rng.randn(C), dout = rng.randn(N * C), prior = rng.randn(N * C);
    const xt = upload(g, x, [N, C]), wt = upload(g, w);
    const out = poisoned(g, [N, C]), rstd = poisoned(g, [N]), dx = poisoned(g, [N, C]);
    const dxAcc = upload(g, prior, [N, C]);
    const rec = new Recorder(g);
    rmsnormForward(rec, out, rstd, xt, wt, EPS);
    rmsnormBackward(rec, dx, upload(g, dout, [N, C]), xt, wt, rstd);
    rmsnormBackward(rec, dxAcc, upload(g, dout, [N, C]), xt, wt, rstd, { accumulate: true });
    rec.submit();
    const ref = rmsnormBackwardRef(dout, x, w, N, C, EPS);
    assertClose(await download(g, dx), ref, 1e-4, `rmsnorm dx ${N}x${C}`);
    assertClose(await download(g, dxAcc), ref.map((v, i) => v + prior[i]!), 1e-4, `rmsnorm dx acc ${N}x${C}`);
  }
});

Deno.test("layernormForward matches float64 within 1e-5 and saves mean and rstd", async () => {
  const g = await gpu();
  const rng = new Rng(13);
  for (const [N, C] of SHAPES) {
    // an offset mean checks the two-pass variance
    const x = rng.randn(N * C, 2).map((v) => v + 3), w = rng.randn(C), b = rng.randn(C);
    const out = poisoned(g, [N, C]), mean = poisoned(g, [N]), rstd = poisoned(g, [N]);
    const rec = new Recorder(g);
    layernormForward(rec, out, mean, rstd, upload(g, x, [N, C]), upload(g, w), upload(g, b), EPS);
    rec.submit();
    const ref = layernormRef(x, w, b, N, C, EPS);
    assertClose(await download(g, out), ref.out, 1e-5, `layernorm out ${N}x${C}`);
    assertClose(await download(g, mean), ref.mean, 1e-5, `layernorm mean ${N}x${C}`);
    assertClose(await download(g, rstd), ref.rstd, 1e-5, `layernorm rstd ${N}x${C}`);
  }
});

Deno.test("layernormBackward matches the float64 gradient within 1e-4, overwriting or accumulating", async () => {
  const g = await gpu();
  const rng = new Rng(14);
  for (const [N, C] of SHAPES) {
    const x = rng.randn(N * C), w = rng.randn(C), b = rng.randn(C), dout = rng.randn(N * C);
    const prior = rng.randn(N * C);
    const xt = upload(g, x, [N, C]), wt = upload(g, w);
    const out = poisoned(g, [N, C]), mean = poisoned(g, [N]), rstd = poisoned(g, [N]);
    const dx = poisoned(g, [N, C]), dxAcc = upload(g, prior, [N, C]);
    const rec = new Recorder(g);
    layernormForward(rec, out, mean, rstd, xt, wt, upload(g, b), EPS);
    layernormBackward(rec, dx, upload(g, dout, [N, C]), xt, wt, mean, rstd);
    layernormBackward(rec, dxAcc, upload(g, dout, [N, C]), xt, wt, mean, rstd, { accumulate: true });
    rec.submit();
    const ref = layernormBackwardRef(dout, x, w, N, C, EPS);
    assertClose(await download(g, dx), ref, 1e-4, `layernorm dx ${N}x${C}`);
    assertClose(
      await download(g, dxAcc),
      ref.map((v, i) => v + prior[i]!),
      1e-4,
      `layernorm dx acc ${N}x${C}`,
    );
  }
});

// f16 activations: inputs rounded to f16 (the float64 reference uses the rounded values). An f16 output is
// rounded once from f32 (2^-11 relative), so it is held to 2e-3; f32 outputs and statistics keep 1e-5 and
// gradients 1e-4, since reference and kernel read the same rounded inputs.
const F16_OUT_TOL = 2e-3;
/** (x, out) dtypes of the forwards: both f16 (the model's f16 path) and each mix. */
const F16_MIXES = [["f16", "f16"], ["f16", "f32"], ["f32", "f16"]] as const;

/** An (N, C) input in `dtype`, and the values the reference should use. */
function input(
  g: Gpu,
  x: Float32Array,
  shape: number[],
  dtype: "f32" | "f16",
): { t: Tensor; v: Float32Array } {
  if (dtype === "f32") return { t: upload(g, x, shape), v: x };
  const { tensor, values } = uploadF16(g, x, shape);
  return { t: tensor, v: values };
}

function readAs(g: Gpu, t: Tensor): Promise<Float32Array> {
  return t.dtype === "f16" ? downloadF16(g, t) : download(g, t);
}

Deno.test("rmsnormForward with f16 x and/or out: f16 out within 2e-3, f32 out and rstd 1e-5", async () => {
  const g = await gpu();
  const rng = new Rng(15);
  for (const [N, C] of SHAPES) {
    for (const [xd, od] of F16_MIXES) {
      const x = input(g, rng.randn(N * C, 2), [N, C], xd), w = rng.randn(C);
      const out = poisoned(g, [N, C], od), rstd = poisoned(g, [N]);
      const rec = new Recorder(g);
      rmsnormForward(rec, out, rstd, x.t, upload(g, w), EPS);
      rec.submit();
      const ref = rmsnormRef(x.v, w, N, C, EPS);
      const what = `rmsnorm ${N}x${C} x ${xd} out ${od}`;
      assertClose(await readAs(g, out), ref.out, od === "f16" ? F16_OUT_TOL : 1e-5, `${what} out`);
      assertClose(await download(g, rstd), ref.rstd, 1e-5, `${what} rstd`);
    }
  }
});

Deno.test("rmsnormBackward with an f16 saved x: f32 dx within 1e-4, overwriting or accumulating", async () => {
  const g = await gpu();
  const rng = new Rng(16);
  for (const [N, C] of SHAPES) {
    const x = uploadF16(g, rng.randn(N * C), [N, C]), w = rng.randn(C), dout = rng.randn(N * C);
    const prior = rng.randn(N * C), wt = upload(g, w);
    const out = poisoned(g, [N, C], "f16"), rstd = poisoned(g, [N]), dx = poisoned(g, [N, C]);
    const dxAcc = upload(g, prior, [N, C]);
    const rec = new Recorder(g);
    rmsnormForward(rec, out, rstd, x.tensor, wt, EPS);
    rmsnormBackward(rec, dx, upload(g, dout, [N, C]), x.tensor, wt, rstd);
    rmsnormBackward(rec, dxAcc, upload(g, dout, [N, C]), x.tensor, wt, rstd, { accumulate: true });
    rec.submit();
    const ref = rmsnormBackwardRef(dout, x.values, w, N, C, EPS);
    assertClose(await download(g, dx), ref, 1e-4, `rmsnorm dx (x f16) ${N}x${C}`);
    assertClose(
      await download(g, dxAcc),
      ref.map((v, i) => v + prior[i]!),
      1e-4,
      `rmsnorm dx acc (x f16) ${N}x${C}`,
    );
  }
});

Deno.test("layernormForward with f16 x and/or out: f16 out within 2e-3, f32 out and stats 1e-5", async () => {
  const g = await gpu();
  const rng = new Rng(17);
  for (const [N, C] of SHAPES) {
    for (const [xd, od] of F16_MIXES) {
      const x = input(g, rng.randn(N * C, 2).map((v) => v + 3), [N, C], xd);
      const w = rng.randn(C), b = rng.randn(C);
      const out = poisoned(g, [N, C], od), mean = poisoned(g, [N]), rstd = poisoned(g, [N]);
      const rec = new Recorder(g);
      layernormForward(rec, out, mean, rstd, x.t, upload(g, w), upload(g, b), EPS);
      rec.submit();
      const ref = layernormRef(x.v, w, b, N, C, EPS);
      const what = `layernorm ${N}x${C} x ${xd} out ${od}`;
      assertClose(await readAs(g, out), ref.out, od === "f16" ? F16_OUT_TOL : 1e-5, `${what} out`);
      assertClose(await download(g, mean), ref.mean, 1e-5, `${what} mean`);
      assertClose(await download(g, rstd), ref.rstd, 1e-5, `${what} rstd`);
    }
  }
});

Deno.test("layernormBackward with an f16 saved x: f32 dx within 1e-4, overwriting or accumulating", async () => {
  const g = await gpu();
  const rng = new Rng(18);
  for (const [N, C] of SHAPES) {
    const x = uploadF16(g, rng.randn(N * C), [N, C]), w = rng.randn(C), b = rng.randn(C);
    const dout = rng.randn(N * C), prior = rng.randn(N * C), wt = upload(g, w);
    const out = poisoned(g, [N, C], "f16"), mean = poisoned(g, [N]), rstd = poisoned(g, [N]);
    const dx = poisoned(g, [N, C]), dxAcc = upload(g, prior, [N, C]);
    const rec = new Recorder(g);
    layernormForward(rec, out, mean, rstd, x.tensor, wt, upload(g, b), EPS);
    layernormBackward(rec, dx, upload(g, dout, [N, C]), x.tensor, wt, mean, rstd);
    layernormBackward(rec, dxAcc, upload(g, dout, [N, C]), x.tensor, wt, mean, rstd, { accumulate: true });
    rec.submit();
    const ref = layernormBackwardRef(dout, x.values, w, N, C, EPS);
    assertClose(await download(g, dx), ref, 1e-4, `layernorm dx (x f16) ${N}x${C}`);
    assertClose(
      await download(g, dxAcc),
      ref.map((v, i) => v + prior[i]!),
      1e-4,
      `layernorm dx acc (x f16) ${N}x${C}`,
    );
  }
});
