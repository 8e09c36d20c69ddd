import { layernormBackward, layernormForward, rmsnormBackward, rmsnormForward } from "../../kernels/norm.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { assertClose, download, gpu, poisoned, Rng, upload } from "../_util.ts";
import {
  finiteDifference,
  layernormBackwardRef,
  layernormRef,
  rmsnormBackwardRef,
  rmsnormRef,
} from "../reference/norm.ts";

// Shapes: a single row, an odd count below the workgroup size, and C above it (threads loop over channels).
const SHAPES: [number, number][] = [[1, 7], [7, 33], [33, 130], [5, 577]];
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
