import assert from "node:assert/strict";
import { adamwStep, gradNormSquared, packHyper } from "../../kernels/adamw.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { createTensor, writeTensor } from "../../src/gpu/tensor.ts";
import { assertClose, download, gpu, poisoned, Rng, upload } from "../_util.ts";
import { type AdamwHyper, adamwStepRef } from "../reference/adamw.ts";

async function trajectory(P: number, h: AdamwHyper, seed: number, clip: boolean): Promise<void> {
  const g = await gpu();
  const rng = new Rng(seed);
  const p0 = rng.randn(P);
  const param = upload(g, p0),
    grad = createTensor(g, [P]),
    m = createTensor(g, [P]),
    v = createTensor(g, [P]);
  const hyper = createTensor(g, [8]), normSq = poisoned(g, [1]);
  const pr = Float64Array.from(p0), mr = new Float64Array(P), vr = new Float64Array(P);
  for (let step = 1; step <= 5; step++) {
    const gr = rng.randn(P, 0.5);
    writeTensor(g, grad, gr);
    writeTensor(g, hyper, packHyper({ ...h, step }));
    const rec = new Recorder(g);
    if (clip) gradNormSquared(rec, normSq, grad);
    adamwStep(rec, clip ? { param, grad, m, v, hyper, gradNormSq: normSq } : { param, grad, m, v, hyper });
    rec.submit();
    adamwStepRef(pr, gr, mr, vr, h, step);
  }
  // The update after 5 steps (p - p0) is checked on its own so the parameters' size does not hide it;
  // f32 rounding of m, v and the bias corrections accumulates over the steps: 1e-5 on the update.
  const pg = await download(g, param);
  assertClose(pg, pr, 1e-6, "params");
  assertClose(pg.map((x, i) => x - p0[i]!), pr.map((x, i) => x - p0[i]!), 1e-5, "param update");
  assertClose(await download(g, m), mr, 1e-5, "exp_avg");
  assertClose(await download(g, v), vr, 1e-5, "exp_avg_sq");
}

const f = Math.fround;
const BASE: AdamwHyper = {
  lr: f(1e-2),
  beta1: f(0.9),
  beta2: f(0.999),
  eps: f(1e-8),
  weightDecay: 0,
  maxGradNorm: 0,
};

Deno.test("adamwStep follows torch's AdamW for 5 steps (no weight decay)", async () => {
  await trajectory(1037, BASE, 40, false);
});

Deno.test("adamwStep follows torch's AdamW for 5 steps with weight decay 0.1", async () => {
  await trajectory(33, { ...BASE, weightDecay: f(0.1) }, 41, false);
});

Deno.test("adamwStep clips the gradient like clip_grad_norm_ when maxGradNorm > 0", async () => {
  // gradients of norm ~0.5 * sqrt(130) ≈ 5.7 clipped to 1
  await trajectory(130, { ...BASE, weightDecay: f(0.01), maxGradNorm: 1, beta1: f(0.8) }, 42, true);
});

Deno.test("gradNormSquared is the float64 sum of squares within 1e-5 and deterministic", async () => {
  const g = await gpu();
  const rng = new Rng(43);
  for (const n of [1, 7, 1037, 300001]) {
    const x = rng.randn(n);
    const out = poisoned(g, [1]), out2 = poisoned(g, [1]);
    const xt = upload(g, x);
    const rec = new Recorder(g);
    gradNormSquared(rec, out, xt);
    gradNormSquared(rec, out2, xt);
    rec.submit();
    let ss = 0;
    for (const v of x) ss += v * v;
    const got = await download(g, out);
    assertClose(got, [ss], 1e-5, `norm² n=${n}`);
    assert.deepEqual(await download(g, out2), got);
  }
});
