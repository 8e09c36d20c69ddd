import assert from "node:assert/strict";
import {
  linearBackwardInput,
  linearForward,
  type MatmulEpilogue,
  type MatmulKernelChoice,
  matmulTuning,
} from "../../kernels/matmul.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import type { Gpu } from "../../src/gpu/device.ts";
import { GpuError } from "../../src/errors.ts";
import { assertClose, download, downloadAny, gpu, poisoned, Rng, upload, uploadAs } from "../_util.ts";
import { linearBackwardInputRef, linearForwardRef } from "../reference/matmul.ts";
import { geluBackwardRef, swigluBackwardRef } from "../reference/activation.ts";

// f32 outputs: single f32 dot products of length ≤ 48 plus an elementwise op: 1e-5 normwise; an f16 output
// is the f32 result rounded once (2^-11 relative per element): 2e-3.
const TOL = 1e-5;
const TOL_F16 = 2e-3;

type Act = "f32" | "f16";

/**
 * Where the epilogue runs: in the tiled kernel's stores (whole tiles: 128x128x48 on 64x64, or ragged) or in the split-K
 * reduction, which sums 4 outputs per thread where N is a multiple of 4 and one otherwise (`reduceVec4`).
 */
const PLANS: { label: string; force: MatmulKernelChoice | null; splitK?: number; reduceVec4?: boolean }[] = [
  { label: "heuristic", force: null },
  { label: "64x64 tile", force: "64x64" },
  { label: "64x64-8x8 split-K 3", force: "64x64-8x8", splitK: 3 },
  { label: "32x32 split-K 2, one output per reduction thread", force: "32x32", splitK: 2, reduceVec4: false },
];

// (M, N, K): N a multiple of 4 and not (the reduction's vec4 and scalar forms), ragged and whole tiles
const SHAPES: [number, number, number][] = [[33, 36, 20], [7, 13, 33], [128, 128, 48]];

async function forEachPlan(body: (label: string) => Promise<void>): Promise<void> {
  try {
    for (const p of PLANS) {
      matmulTuning.force = p.force;
      matmulTuning.splitK = p.splitK ?? null;
      matmulTuning.reduceVec4 = p.reduceVec4 ?? null;
      await body(p.label);
    }
  } finally {
    matmulTuning.force = null;
    matmulTuning.splitK = null;
    matmulTuning.reduceVec4 = null;
  }
}

function record(g: Gpu, body: (rec: Recorder) => void): void {
  const rec = new Recorder(g);
  body(rec);
  rec.submit();
}

Deno.test("linearForward with the residual epilogue gives x + product + bias, f32 or f16 x and out, on every plan", async () => {
  const g = await gpu();
  const rng = new Rng(81);
  const kinds: Act[] = g.hasF16 ? ["f32", "f16"] : ["f32"];
  await forEachPlan(async (plan) => {
    for (const [M, N, K] of SHAPES) {
      for (const dt of kinds) {
        const a = uploadAs(g, rng.randn(M * K), [M, K], dt);
        const w = rng.randn(N * K, 0.5), b = rng.randn(N);
        const x = uploadAs(g, rng.randn(M * N), [M, N], dt);
        const out = poisoned(g, [M, N], dt);
        record(g, (rec) =>
          linearForward(rec, out, a.tensor, upload(g, w, [N, K]), upload(g, b), {
            epilogue: { kind: "residual", x: x.tensor },
          }));
        const want = linearForwardRef(a.values, w, b, M, N, K).map((v, i) => v + x.values[i]!);
        assertClose(
          await downloadAny(g, out),
          want,
          dt === "f16" ? TOL_F16 : TOL,
          `${plan} ${dt} ${M}x${N}x${K}`,
        );
      }
    }
  });
});

Deno.test("linearBackwardInput with the SwiGLU and GELU backward epilogues matches float64, f32 or f16 saved activations, on every plan", async () => {
  const g = await gpu();
  const rng = new Rng(82);
  const kinds: Act[] = g.hasF16 ? ["f32", "f16"] : ["f32"];
  await forEachPlan(async (plan) => {
    for (const [M, N, K] of SHAPES) {
      // dy (M, N) through a Linear (N, K) weight: the gradient of the MLP's input a, (M, K)
      const dy = rng.randn(M * N), w = rng.randn(N * K, 0.5);
      const da = linearBackwardInputRef(dy, w, M, N, K);
      for (const dt of kinds) {
        const what = `${plan} ${dt} ${M}x${N}x${K}`;
        const gate = uploadAs(g, rng.randn(M * K, 2), [M, K], dt);
        const up = uploadAs(g, rng.randn(M * K), [M, K], dt);
        const dg = poisoned(g, [M, K]), du = poisoned(g, [M, K]);
        record(g, (rec) =>
          linearBackwardInput(rec, dg, upload(g, dy, [M, N]), upload(g, w, [N, K]), {
            epilogue: { kind: "swigluBackward", g: gate.tensor, u: up.tensor, du },
          }));
        const ref = swigluBackwardRef(da, gate.values, up.values);
        assertClose(await download(g, dg), ref.dgate, TOL, `d gate ${what}`);
        assertClose(await download(g, du), ref.dup, TOL, `d up ${what}`);

        const h = uploadAs(g, rng.randn(M * K, 2), [M, K], dt);
        const dh = poisoned(g, [M, K]);
        record(g, (rec) =>
          linearBackwardInput(rec, dh, upload(g, dy, [M, N]), upload(g, w, [N, K]), {
            epilogue: { kind: "geluBackward", h: h.tensor },
          }));
        assertClose(await download(g, dh), geluBackwardRef(da, h.values), TOL, `d h ${what}`);
      }
    }
  });
});

Deno.test("an epilogue is refused with accumulate, a column offset, a wrong size or mixed activation types", async () => {
  const g = await gpu();
  const M = 4, N = 8, K = 12;
  const a = poisoned(g, [M, K]), w = poisoned(g, [N, K]), out = poisoned(g, [M, N]);
  const residual: MatmulEpilogue = { kind: "residual", x: poisoned(g, [M, N]) };
  const refuse = (body: (rec: Recorder) => void, re: RegExp) =>
    assert.throws(() => body(new Recorder(g)), (e: unknown) => e instanceof GpuError && re.test(e.message));
  refuse((rec) => linearForward(rec, out, a, w, null, { accumulate: true, epilogue: residual }), /plain/);
  refuse(
    (rec) =>
      linearForward(rec, poisoned(g, [M, 2 * N]), a, w, null, {
        ldOut: 2 * N,
        outColOffset: N,
        epilogue: residual,
      }),
    /plain/,
  );
  refuse(
    (rec) =>
      linearForward(rec, out, a, w, null, { epilogue: { kind: "residual", x: poisoned(g, [M, N + 1]) } }),
    /should have 32 elements/,
  );
  const dy = poisoned(g, [M, N]), dx = poisoned(g, [M, K]);
  const f32 = poisoned(g, [M, K]);
  if (g.hasF16) {
    refuse(
      (rec) =>
        linearBackwardInput(rec, dx, dy, w, {
          epilogue: {
            kind: "swigluBackward",
            g: f32,
            u: poisoned(g, [M, K], "f16"),
            du: poisoned(g, [M, K]),
          },
        }),
      /must be f32/,
    );
  }
  refuse(
    (rec) =>
      linearBackwardInput(rec, dx, dy, w, {
        epilogue: { kind: "swigluBackward", g: f32, u: f32, du: poisoned(g, [M, K], "i32") },
      }),
    /gradient .* must be f32/,
  );
});
