/**
 * Tests of kernels/decode_matvec.ts: the fused decode products against float64 references composed from
 * tests/reference (norm, then the Linear product, then the activation), and against the unfused sequence
 * of the existing kernels. Inputs are fresh random draws whose rows have a nonzero mean (so LayerNorm's
 * mean matters); overwritten outputs start as NaN, accumulated ones as random values.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  decodeLinearForward,
  decodeMatvecApplies,
  decodeMatvecTuning,
  decodeQkvForward,
  decodeSwigluForward,
  type MatvecEpilogue,
  type MatvecPrologue,
  type QkvRope,
} from "../../kernels/decode_matvec.ts";
import { kvCacheAppendRope } from "../../kernels/kv_cache.ts";
import { layernormForward, rmsnormForward } from "../../kernels/norm.ts";
import { linearForward } from "../../kernels/matmul.ts";
import { geluForward, swigluForward } from "../../kernels/activation.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { createTensor, readTensor, type Tensor, tensorFrom } from "../../src/gpu/tensor.ts";
import type { Gpu } from "../../src/gpu/device.ts";
import { GpuError } from "../../src/errors.ts";
import {
  assertClose,
  download,
  downloadF16,
  gpu,
  poisoned,
  Rng,
  upload,
  uploadF16,
  withStorageBufferLimit,
} from "../_util.ts";
import { linearForwardRef } from "../reference/matmul.ts";
import { layernormRef, rmsnormRef } from "../reference/norm.ts";
import { geluRef, swigluRef } from "../reference/activation.ts";
import { invFreqRef, ropeRef } from "../reference/rope.ts";

// Every output is one f32 dot product of length ≤ 2056 (plus f32 norm statistics of the same length),
// compared normwise with the float64 reference: 1e-5. f16 weights are compared with the reference on the
// same f16-rounded weights (accumulation is f32 either way), so the same tolerance holds.
const TOL = 1e-5;
const EPS = 1e-5;
// f16 outputs: the f32 result rounded once to f16 (2^-11 relative per element), against the float64
// reference of the same f16-rounded inputs: 2e-3 normwise. f32 outputs of f16 x keep TOL.
const TOL_F16_OUT = 2e-3;

/**
 * Asserts `got` ≈ `want` within TOL, normwise relative to the larger of the output and `pre`, the
 * pre-activation. gelu_new evaluates `1 + tanh(u)` in f32 (here as in kernels/activation.ts), which for
 * u ≪ 0 keeps few digits of the tiny output: its absolute error is ~1e-7·|pre-activation| whatever the
 * product's accuracy, so a case whose outputs all lie in that tail (N = 1) is judged on the scale of the
 * product. Without an activation, `pre` is the output itself and this is `assertClose`.
 */
function assertCloseAct(
  got: Float32Array,
  want: ArrayLike<number>,
  pre: ArrayLike<number>,
  what: string,
  tol = TOL,
): void {
  // the appended pre-activations add nothing to the difference, only to the scale
  assertClose([...got, ...Array.from(pre)], [...Array.from(want), ...Array.from(pre)], tol, what);
}

const MS = [1, 2, 3, 4];
const NS = [1, 7, 33, 130];
// 4, 12, 64: fewer vec4 loads than threads; 520 (130 loads, 32 threads): one unrolled iteration of 4
// loads per thread and a remainder; 2056 (514 loads, 128 threads for these small N): an unrolled iteration
// and a remainder of 2 loads. (The thread-count test below runs 2056 with 32 threads: 4 iterations.)
const KS = [4, 12, 64, 520, 2056];
/**
 * Rows of x for which K = 2056 runs: each (M, K's thread count, prologue) is another pipeline, and a
 * CPU device compiles each in 1-3 s, so the big K takes the two ends of M.
 */
const big = (M: number, K: number) => K < 2056 || M === 1 || M === 4;
const NORMS = ["none", "rms", "layer"] as const;
type Norm = (typeof NORMS)[number];
const EPILOGUES: MatvecEpilogue[] = ["none", "gelu_new"];

/** Random (M, K) rows with mean 1 + m/2: LayerNorm's mean and RMSNorm's mean square both matter. */
function rows(rng: Rng, M: number, K: number, mean = 1): Float32Array {
  const x = rng.randn(M * K);
  for (let i = 0; i < x.length; i++) x[i] = x[i]! + mean + 0.5 * Math.floor(i / K);
  return x;
}

/** Norm parameters around (1, 0), as trained models have them. */
function normParams(rng: Rng, K: number): { nw: Float32Array; nb: Float32Array } {
  const nw = rng.randn(K, 0.2).map((v) => 1 + v);
  return { nw, nb: rng.randn(K, 0.2) };
}

function normRef(
  norm: Norm,
  x: Float32Array,
  nw: Float32Array,
  nb: Float32Array,
  M: number,
  K: number,
  eps: number,
): ArrayLike<number> {
  if (norm === "rms") return rmsnormRef(x, nw, M, K, eps).out;
  if (norm === "layer") return layernormRef(x, nw, nb, M, K, eps).out;
  return x;
}

function prologueOf(
  g: Gpu,
  norm: Norm,
  nw: Float32Array,
  nb: Float32Array,
  eps: number,
): MatvecPrologue | undefined {
  if (norm === "rms") return { kind: "rms", weight: upload(g, nw), eps };
  if (norm === "layer") return { kind: "layer", weight: upload(g, nw), bias: upload(g, nb), eps };
  return undefined;
}

/** `opts` plus `prologue` when there is one (exactOptionalPropertyTypes: no `prologue: undefined`). */
function withPrologue<T extends object>(
  prologue: MatvecPrologue | undefined,
  opts: T,
): T & { prologue?: MatvecPrologue } {
  return prologue ? { ...opts, prologue } : opts;
}

function f16Round(a: Float32Array): { bits: Uint16Array; values: Float32Array } {
  const h = new Float16Array(a);
  return { bits: new Uint16Array(h.buffer), values: Float32Array.from(h) };
}

/** Output rows per thread group, forced as an upper bound (null: the plan's choice, 1 at these sizes). */
type Nr = 1 | 2 | 4 | null;

/** Records with `decodeMatvecTuning.rowsPerGroup = nr`, restoring it after. */
function withNr(nr: Nr | undefined, record: (rec: Recorder) => void): (rec: Recorder) => void {
  return (rec) => {
    decodeMatvecTuning.rowsPerGroup = nr ?? null;
    try {
      record(rec);
    } finally {
      decodeMatvecTuning.rowsPerGroup = null;
    }
  };
}

async function run(g: Gpu, out: Tensor, record: (rec: Recorder) => void): Promise<Float32Array> {
  const rec = new Recorder(g);
  record(rec);
  rec.submit();
  return out.dtype === "f16" ? await downloadF16(g, out) : await download(g, out);
}

type Act = "f32" | "f16";

/** Rows of x as an f32 or f16 tensor, and the values a reference should use (f16-rounded for f16). */
function input(
  g: Gpu,
  x: Float32Array,
  M: number,
  K: number,
  dt: Act = "f32",
): { t: Tensor; x: Float32Array } {
  if (dt === "f32") return { t: upload(g, x, [M, K]), x };
  const { tensor, values } = uploadF16(g, x, [M, K]);
  return { t: tensor, x: values };
}

/** One Linear case: the kernel's output and the float64 reference. */
async function linearCase(
  g: Gpu,
  rng: Rng,
  c: {
    M: number;
    N: number;
    K: number;
    norm: Norm;
    epilogue: MatvecEpilogue;
    bias: boolean;
    f16?: boolean;
    nr?: Nr;
    /** dtypes of x and out (default f32). */
    xt?: Act;
    ot?: Act;
  },
): Promise<{ got: Float32Array; want: Float64Array; pre: Float64Array }> {
  const { M, N, K, norm, epilogue } = c;
  const { t: xT, x } = input(g, rows(rng, M, K), M, K, c.xt);
  const { nw, nb } = normParams(rng, K);
  const w32 = rng.randn(N * K, 1 / Math.sqrt(K));
  const { bits, values } = f16Round(w32);
  const w = c.f16 ? values : w32;
  const b = c.bias ? rng.randn(N) : null;
  const out = poisoned(g, [M, N], c.ot);
  const got = await run(
    g,
    out,
    withNr(c.nr, (rec) =>
      decodeLinearForward(
        rec,
        out,
        xT,
        c.f16 ? tensorFrom(g, bits, [N, K]) : upload(g, w32, [N, K]),
        b ? upload(g, b) : null,
        withPrologue(prologueOf(g, norm, nw, nb, EPS), { epilogue }),
      )),
  );
  const y = linearForwardRef(normRef(norm, x, nw, nb, M, K, EPS), w, b, M, N, K);
  return { got, want: epilogue === "gelu_new" ? geluRef(y) : y, pre: y };
}

/** One SwiGLU case: the kernel's output and the float64 reference. */
async function swigluCase(
  g: Gpu,
  rng: Rng,
  c: {
    M: number;
    I: number;
    K: number;
    norm: Norm;
    gateBias: boolean;
    upBias: boolean;
    f16?: boolean;
    nr?: Nr;
    /** dtypes of x and out (default f32). */
    xt?: Act;
    ot?: Act;
  },
): Promise<{ got: Float32Array; want: Float64Array }> {
  const { M, I, K, norm } = c;
  const { t: xT, x } = input(g, rows(rng, M, K), M, K, c.xt);
  const { nw, nb } = normParams(rng, K);
  // gate scaled up so silu sees both its negative and positive side
  const gate32 = rng.randn(I * K, 2 / Math.sqrt(K));
  const up32 = rng.randn(I * K, 1 / Math.sqrt(K));
  const gate = f16Round(gate32);
  const up = f16Round(up32);
  const bg = c.gateBias ? rng.randn(I) : null;
  const bu = c.upBias ? rng.randn(I) : null;
  const out = poisoned(g, [M, I], c.ot);
  const wt = (w32: Float32Array, h: { bits: Uint16Array }) =>
    c.f16 ? tensorFrom(g, h.bits, [I, K]) : upload(g, w32, [I, K]);
  const got = await run(
    g,
    out,
    withNr(c.nr, (rec) =>
      decodeSwigluForward(
        rec,
        out,
        xT,
        wt(gate32, gate),
        wt(up32, up),
        withPrologue(prologueOf(g, norm, nw, nb, EPS), {
          gateBias: bg ? upload(g, bg) : null,
          upBias: bu ? upload(g, bu) : null,
        }),
      )),
  );
  const xn = normRef(norm, x, nw, nb, M, K, EPS);
  const want = swigluRef(
    linearForwardRef(xn, c.f16 ? gate.values : gate32, bg, M, I, K),
    linearForwardRef(xn, c.f16 ? up.values : up32, bu, M, I, K),
  );
  return { got, want };
}

Deno.test("decodeLinearForward equals norm → Linear → gelu_new in float64 for M = 1-4, odd N and K, with or without bias", async () => {
  const g = await gpu();
  const rng = new Rng(21);
  for (const M of MS) {
    for (const N of NS) {
      for (const K of KS.filter((K) => big(M, K))) {
        for (const norm of NORMS) {
          for (const epilogue of EPILOGUES) {
            // bias alternates, so each (norm, epilogue) pair runs with and without it at every M
            const bias = (N + K + M + (epilogue === "none" ? 0 : 1)) % 2 === 0;
            const { got, want, pre } = await linearCase(g, rng, { M, N, K, norm, epilogue, bias });
            assertCloseAct(got, want, pre, `linear M=${M} N=${N} K=${K} ${norm} ${epilogue} bias=${bias}`);
          }
        }
      }
    }
  }
});

Deno.test("decodeLinearForward adds act(...) into a random prior and writes only its column slice of a wider output", async () => {
  const g = await gpu();
  const rng = new Rng(22);
  for (const M of MS) {
    for (const [N, K] of [[7, 12], [33, 520]] as const) {
      for (const norm of NORMS) {
        for (const epilogue of EPILOGUES) {
          for (const accumulate of [false, true]) {
            const ld = N + 13;
            const off = 5;
            const x = rows(rng, M, K);
            const { nw, nb } = normParams(rng, K);
            const w = rng.randn(N * K, 1 / Math.sqrt(K));
            const b = rng.randn(N);
            const init = rng.randn(M * ld);
            const out = upload(g, init, [M, ld]);
            const got = await run(
              g,
              out,
              (rec) =>
                decodeLinearForward(
                  rec,
                  out,
                  upload(g, x, [M, K]),
                  upload(g, w, [N, K]),
                  upload(g, b),
                  withPrologue(prologueOf(g, norm, nw, nb, EPS), {
                    epilogue,
                    accumulate,
                    outColOffset: off,
                    ldOut: ld,
                  }),
                ),
            );
            const y = linearForwardRef(normRef(norm, x, nw, nb, M, K, EPS), w, b, M, N, K);
            const act = epilogue === "gelu_new" ? geluRef(y) : y;
            // columns outside [off, off + N) keep the prior
            const want = Float64Array.from(init);
            for (let m = 0; m < M; m++) {
              for (let n = 0; n < N; n++) {
                want[m * ld + off + n] = (accumulate ? init[m * ld + off + n]! : 0) + act[m * N + n]!;
              }
            }
            assertCloseAct(got, want, y, `slice M=${M} N=${N} K=${K} ${norm} ${epilogue} acc=${accumulate}`);
          }
        }
      }
    }
  }
});

Deno.test("decodeSwigluForward equals norm → gate, up → silu(gate) * up in float64, with each prologue and bias", async () => {
  const g = await gpu();
  const rng = new Rng(23);
  for (const M of MS) {
    for (const I of NS) {
      for (const K of KS.filter((K) => big(M, K))) {
        for (const norm of NORMS) {
          // llama has no MLP biases; the fused kernel takes either, both or none
          const biases = [[false, false], [true, true], [true, false], [false, true]] as const;
          const [gateBias, upBias] = biases[(I + K + M) % 4]!;
          const { got, want } = await swigluCase(g, rng, { M, I, K, norm, gateBias, upBias });
          assertClose(got, want, TOL, `swiglu M=${M} I=${I} K=${K} ${norm} bias=${gateBias},${upBias}`);
        }
      }
    }
  }
});

Deno.test("f16 weights give the float64 result of the f16-rounded weights (Linear and SwiGLU)", async () => {
  const g = await gpu();
  if (!g.hasF16) {
    console.log("skipped: this device lacks shader-f16, so f16 weights cannot be used on it");
    return;
  }
  const rng = new Rng(24);
  for (const M of MS) {
    for (const [N, K] of [[1, 4], [7, 12], [33, 64], [130, 520], [7, 2056]] as const) {
      if (!big(M, K)) continue;
      for (const norm of NORMS) {
        for (const epilogue of EPILOGUES) {
          const bias = (N + M) % 2 === 0;
          const { got, want, pre } = await linearCase(g, rng, { M, N, K, norm, epilogue, bias, f16: true });
          assertCloseAct(got, want, pre, `f16 linear M=${M} N=${N} K=${K} ${norm} ${epilogue}`);
        }
        if (M !== 1 && M !== 4) continue; // SwiGLU: the two ends of M (pipelines, see `big`)
        const biased = (N + M) % 2 === 0;
        const s = await swigluCase(g, rng, { M, I: N, K, norm, gateBias: biased, upBias: biased, f16: true });
        assertClose(s.got, s.want, TOL, `f16 swiglu M=${M} I=${N} K=${K} ${norm}`);
      }
    }
  }
});

Deno.test("f16 x and out (each alone or both, f32 or f16 weights) give the float64 result of the f16-rounded x, with each prologue (Linear and SwiGLU)", async () => {
  const g = await gpu();
  if (!g.hasF16) {
    console.log("skipped: this device lacks shader-f16, so f16 activations cannot be used on it");
    return;
  }
  const rng = new Rng(29);
  // (x, f16 weights, out): an f16 model's projections; f16 x into f32 out; f32 x into f16 out
  const kinds: [Act, boolean, Act][] = [["f16", true, "f16"], ["f16", false, "f32"], ["f32", false, "f16"]];
  // each (M, dtypes, prologue) is a pipeline (see `big`): M alternates between the two ends, one (N, K)
  // each, so every (prologue, dtypes) pair runs once and each M sees every prologue and dtype
  let i = 0;
  for (const norm of NORMS) {
    for (const [xt, f16, ot] of kinds) {
      const [M, N, K] = i++ % 2 === 0 ? [1, 7, 12] : [4, 33, 520];
      const tol = ot === "f16" ? TOL_F16_OUT : TOL;
      const what = `M=${M} N=${N} K=${K} ${norm} x ${xt} w ${f16 ? "f16" : "f32"} out ${ot}`;
      for (const epilogue of EPILOGUES) {
        const l = await linearCase(g, rng, {
          M,
          N,
          K,
          norm,
          epilogue,
          bias: epilogue === "none",
          f16,
          xt,
          ot,
        });
        assertCloseAct(l.got, l.want, l.pre, `linear ${epilogue} ${what}`, tol);
      }
      if (xt === "f32") continue; // SwiGLU reads the f16 residual stream of an f16 model
      const s = await swigluCase(g, rng, { M, I: N, K, norm, gateBias: true, upBias: false, f16, xt, ot });
      assertClose(s.got, s.want, tol, `swiglu ${what}`);
    }
  }
});

Deno.test("accumulate into an f16 residual stream: read f16, add in f32, round once, only its column slice (also 4 output rows per group)", async () => {
  const g = await gpu();
  if (!g.hasF16) return;
  const rng = new Rng(30);
  for (const [M, N, K, nr] of [[1, 7, 12, null], [4, 33, 520, null], [3, 33, 64, 4]] as const) {
    for (const norm of NORMS) {
      for (const epilogue of EPILOGUES) {
        const ld = N + 13;
        const off = 5;
        const x = uploadF16(g, rows(rng, M, K), [M, K]);
        const { nw, nb } = normParams(rng, K);
        const w = uploadF16(g, rng.randn(N * K, 1 / Math.sqrt(K)), [N, K]);
        const b = rng.randn(N);
        const init = uploadF16(g, rng.randn(M * ld), [M, ld]);
        const got = await run(
          g,
          init.tensor,
          withNr(nr, (rec) =>
            decodeLinearForward(
              rec,
              init.tensor,
              x.tensor,
              w.tensor,
              upload(g, b),
              withPrologue(prologueOf(g, norm, nw, nb, EPS), {
                epilogue,
                accumulate: true,
                outColOffset: off,
                ldOut: ld,
              }),
            )),
        );
        const y = linearForwardRef(normRef(norm, x.values, nw, nb, M, K, EPS), w.values, b, M, N, K);
        const act = epilogue === "gelu_new" ? geluRef(y) : y;
        // columns outside [off, off + N) keep the prior (exactly: f16 in, f16 out)
        const want = Float64Array.from(init.values);
        for (let m = 0; m < M; m++) {
          for (let n = 0; n < N; n++) {
            want[m * ld + off + n] = init.values[m * ld + off + n]! + act[m * N + n]!;
          }
        }
        for (let i = 0; i < want.length; i++) {
          const col = i % ld;
          if (col < off || col >= off + N) assert.equal(got[i], want[i], `prior kept at ${i}`);
        }
        assertCloseAct(got, want, y, `f16 += M=${M} N=${N} K=${K} nr=${nr} ${norm} ${epilogue}`, TOL_F16_OUT);
      }
    }
  }
});

Deno.test("every thread count per output (32-256) gives the reference products", async () => {
  const g = await gpu();
  const rng = new Rng(25);
  try {
    // K = 2056 with 32 threads: 4 unrolled iterations and a remainder; each prologue once; N not a
    // multiple of the rows of a workgroup
    const cases = [
      [32, 1, 33, 2056, "rms"],
      [64, 4, 7, 520, "layer"],
      [128, 3, 130, 12, "none"],
      [256, 2, 33, 2056, "layer"],
    ] as const;
    for (const [threads, M, N, K, norm] of cases) {
      decodeMatvecTuning.threads = threads;
      const what = `threads=${threads} M=${M} N=${N} K=${K} ${norm}`;
      const l = await linearCase(g, rng, { M, N, K, norm, epilogue: "gelu_new", bias: true });
      assertCloseAct(l.got, l.want, l.pre, `linear ${what}`);
      const s = await swigluCase(g, rng, { M, I: N, K, norm, gateBias: false, upBias: true });
      assertClose(s.got, s.want, TOL, `swiglu ${what}`);
    }
  } finally {
    decodeMatvecTuning.threads = null;
  }
});

Deno.test("2 and 4 output rows per thread group give the reference products, also for a column slice and accumulate", async () => {
  const g = await gpu();
  const rng = new Rng(28);
  let i = 0;
  for (const nr of [2, 4] as const) {
    for (const norm of NORMS) {
      // M cycles through 1-4 and N through sizes that are and are not multiples of the group's rows
      // (M = 4 SwiGLU keeps 2 rows: 16 accumulators)
      const M = MS[i % 4]!;
      const N = NS[i % 4]!;
      const K = [12, 520, 64][i % 3]!;
      i++;
      const what = `nr≤${nr} M=${M} N=${N} K=${K} ${norm}`;
      const l = await linearCase(g, rng, { M, N, K, norm, epilogue: "gelu_new", bias: true, nr });
      assertCloseAct(l.got, l.want, l.pre, `linear ${what}`);
      const s = await swigluCase(g, rng, { M, I: N, K, norm, gateBias: true, upBias: false, nr });
      assertClose(s.got, s.want, TOL, `swiglu ${what}`);
      // a column slice of a wider output, added into a random prior
      const ld = N + 9;
      const off = 3;
      const x = rows(rng, M, K);
      const { nw, nb } = normParams(rng, K);
      const w = rng.randn(N * K, 1 / Math.sqrt(K));
      const init = rng.randn(M * ld);
      const out = upload(g, init, [M, ld]);
      const got = await run(
        g,
        out,
        withNr(nr, (rec) =>
          decodeLinearForward(
            rec,
            out,
            upload(g, x, [M, K]),
            upload(g, w, [N, K]),
            null,
            withPrologue(prologueOf(g, norm, nw, nb, EPS), {
              accumulate: true,
              outColOffset: off,
              ldOut: ld,
            }),
          )),
      );
      const y = linearForwardRef(normRef(norm, x, nw, nb, M, K, EPS), w, null, M, N, K);
      const want = Float64Array.from(init);
      for (let m = 0; m < M; m++) {
        for (let n = 0; n < N; n++) want[m * ld + off + n] = init[m * ld + off + n]! + y[m * N + n]!;
      }
      assertClose(got, want, TOL, `slice accumulate ${what}`);
    }
  }
});

Deno.test("the fused products equal the unfused kernels (norm, linearForward, geluForward / swigluForward), also with a large eps and a large row mean", async () => {
  const g = await gpu();
  const rng = new Rng(26);
  // eps 0.5: an eps added in the wrong place (to the sum, after the sqrt) changes the result well past
  // the tolerance; mean 50: the one-pass variance E[x²] - mean² would lose ~3 digits
  for (const [eps, mean] of [[0.5, 1], [1e-5, 50]] as const) {
    for (const norm of ["rms", "layer"] as const) {
      const [M, N, K] = [3, 33, 520];
      const x = upload(g, rows(rng, M, K, mean), [M, K]);
      const { nw: nwH, nb: nbH } = normParams(rng, K);
      const nw = upload(g, nwH);
      const nb = upload(g, nbH);
      const w = upload(g, rng.randn(N * K, 1 / Math.sqrt(K)), [N, K]);
      const wu = upload(g, rng.randn(N * K, 1 / Math.sqrt(K)), [N, K]);
      const b = upload(g, rng.randn(N));
      const prologue: MatvecPrologue = norm === "rms"
        ? { kind: "rms", weight: nw, eps }
        : { kind: "layer", weight: nw, bias: nb, eps };
      // unfused: norm into xn, then the products, then the activations
      const xn = poisoned(g, [M, K]);
      const y = poisoned(g, [M, N]);
      const yu = poisoned(g, [M, N]);
      const gelu = poisoned(g, [M, N]);
      const swiglu = poisoned(g, [M, N]);
      const rec = new Recorder(g);
      if (norm === "rms") rmsnormForward(rec, xn, createTensor(g, [M]), x, nw, eps);
      else layernormForward(rec, xn, createTensor(g, [M]), createTensor(g, [M]), x, nw, nb, eps);
      linearForward(rec, y, xn, w, b);
      linearForward(rec, yu, xn, wu, null);
      geluForward(rec, gelu, y);
      swigluForward(rec, swiglu, y, yu);
      rec.submit();
      const fusedGelu = poisoned(g, [M, N]);
      const fusedSwiglu = poisoned(g, [M, N]);
      const got = await run(g, fusedGelu, (r) => {
        decodeLinearForward(r, fusedGelu, x, w, b, { prologue, epilogue: "gelu_new" });
        decodeSwigluForward(r, fusedSwiglu, x, w, wu, { prologue, gateBias: b });
      });
      const what = `${norm} eps=${eps} mean=${mean}`;
      assertCloseAct(got, await download(g, gelu), await download(g, y), `gelu ${what}`);
      assertClose(await download(g, fusedSwiglu), await download(g, swiglu), TOL, `swiglu ${what}`);
      // and both against float64
      const xH = await download(g, x);
      const ref = linearForwardRef(
        normRef(norm, xH, nwH, nbH, M, K, eps),
        await download(g, w),
        await download(g, b),
        M,
        N,
        K,
      );
      assertCloseAct(got, geluRef(ref), ref, `gelu vs float64 ${what}`);
    }
  }
});

Deno.test("more than 65535 workgroups are folded into y", async () => {
  const g = await gpu();
  const rng = new Rng(27);
  decodeMatvecTuning.threads = 256; // one output row per workgroup
  try {
    const [M, N, K] = [2, 65537, 4];
    const x = rows(rng, M, K);
    const w = rng.randn(N * K);
    const { nw, nb } = normParams(rng, K);
    const out = poisoned(g, [M, N]);
    const got = await run(
      g,
      out,
      (rec) =>
        decodeLinearForward(rec, out, upload(g, x, [M, K]), upload(g, w, [N, K]), null, {
          prologue: { kind: "layer", weight: upload(g, nw), bias: upload(g, nb), eps: EPS },
        }),
    );
    assertClose(got, linearForwardRef(normRef("layer", x, nw, nb, M, K, EPS), w, null, M, N, K), TOL, "fold");
  } finally {
    decodeMatvecTuning.threads = null;
  }
});

Deno.test("decodeMatvecApplies says which products fit, and the kernels refuse the others with a GpuError that says why", async () => {
  const g = await gpu();
  const rec = new Recorder(g);
  const t = (shape: number[], dtype: "f32" | "f16" | "i32" = "f32") => createTensor(g, shape, dtype, "t");
  const w = t([8, 12]);
  assert.equal(decodeMatvecApplies(1, 12, w), true);
  assert.equal(decodeMatvecApplies(4, 12, t([8, 12], "f16")), true);
  assert.equal(decodeMatvecApplies(5, 12, w), false);
  assert.equal(decodeMatvecApplies(0, 12, w), false);
  assert.equal(decodeMatvecApplies(1, 10, t([8, 10])), false);
  assert.equal(decodeMatvecApplies(1, 12, t([8, 12], "i32")), false);
  assert.equal(decodeMatvecApplies(1, 12, t([2, 8, 12])), false);
  assert.equal(decodeMatvecApplies(1, 16, w), false);

  const refuses = (f: () => void, re: RegExp) =>
    assert.throws(f, (e: unknown) => e instanceof GpuError && re.test(e.message));
  refuses(
    () => decodeLinearForward(rec, t([5, 8]), t([5, 12]), w, null),
    /5 rows; the fused kernels take 1 to 4/,
  );
  refuses(() => decodeLinearForward(rec, t([1, 8]), t([1, 10]), t([8, 10]), null), /multiple of 4/);
  refuses(
    () => decodeLinearForward(rec, t([1, 8]), t([1, 12]), t([8, 12], "i32"), null),
    /must be f32 or f16/,
  );
  refuses(() => decodeLinearForward(rec, t([1, 8]), t([1, 13]), w, null), /not a whole number of rows of 12/);
  refuses(() => decodeLinearForward(rec, t([1, 8]), t([1, 12], "i32"), w, null), /x: t must be f32 or f16/);
  refuses(
    () => decodeLinearForward(rec, t([1, 9]), t([1, 12]), w, null),
    /output t must be f32 or f16 of 1x8/,
  );
  refuses(
    () => decodeSwigluForward(rec, t([1, 8], "i32"), t([1, 12]), w, w),
    /output t must be f32 or f16 of 1x8/,
  );
  refuses(() => decodeLinearForward(rec, t([1, 8]), t([1, 12]), w, t([7])), /bias t must be f32 of 8/);
  refuses(
    () => decodeLinearForward(rec, t([1, 10]), t([1, 12]), w, null, { outColOffset: 3, ldOut: 10 }),
    /columns 3..11 exceed ldOut 10/,
  );
  refuses(
    () =>
      decodeLinearForward(rec, t([1, 8]), t([1, 12]), w, null, {
        prologue: { kind: "rms", weight: t([8]), eps: EPS },
      }),
    /norm weight t must be f32 of 12/,
  );
  refuses(
    () =>
      decodeLinearForward(rec, t([1, 8]), t([1, 12]), w, null, {
        prologue: { kind: "layer", weight: t([12]), bias: t([12], "f16"), eps: EPS },
      }),
    /norm bias t must be f32 of 12/,
  );
  refuses(
    () => decodeLinearForward(rec, t([1, 8]), t([1, 12]), w, null, { epilogue: "relu" as MatvecEpilogue }),
    /unknown epilogue relu/,
  );
  const x = t([1, 12]);
  refuses(
    () => decodeLinearForward(rec, x.reshape([12]).reshape([1, 12]), x, t([12, 12]), null),
    /overlaps input/,
  );
  refuses(() => decodeSwigluForward(rec, t([1, 8]), t([1, 12]), w, t([8, 16])), /must match gate weight/);
  refuses(
    () => decodeSwigluForward(rec, t([1, 8]), t([1, 12]), w, t([8, 12], "f16")),
    /must match gate weight/,
  );
  refuses(
    () => decodeSwigluForward(rec, t([1, 8]), t([1, 12]), w, w, { upBias: t([9]) }),
    /up bias t must be f32 of 8/,
  );
  // a GPU without shader-f16 (the same device, its feature flag cleared)
  const noF16 = new Recorder({ ...g, hasF16: false });
  refuses(
    () => decodeLinearForward(noF16, t([1, 8]), t([1, 12]), t([8, 12], "f16"), null),
    /lacks shader-f16/,
  );
  refuses(
    () => decodeLinearForward(noF16, t([1, 8]), t([1, 12], "f16"), w, null),
    /x: t is f16 .* lacks shader-f16/,
  );
  refuses(
    () => decodeSwigluForward(noF16, t([1, 8], "f16"), t([1, 12]), w, w),
    /out: t is f16 .* lacks shader-f16/,
  );
  assert.equal(rec.ops.length, 0);
});

/** A q, k or v product of {@link qkvCase}: rows, weight dtype, bias, output dtype. */
interface QkvPart {
  N: number;
  f16: boolean;
  bias: boolean;
  ot: Act;
}

/**
 * One q/k/v case: `decodeQkvForward` into poisoned outputs, the same three products by
 * `decodeLinearForward`, and the float64 references; returns the dispatches the fused call recorded.
 */
async function qkvCase(
  g: Gpu,
  rng: Rng,
  c: { M: number; K: number; norm: Norm; xt: Act; parts: [QkvPart, QkvPart, QkvPart]; nr?: Nr },
  what: string,
): Promise<number> {
  const { M, K, norm } = c;
  const { t: xT, x } = input(g, rows(rng, M, K), M, K, c.xt);
  const { nw, nb } = normParams(rng, K);
  const pro = prologueOf(g, norm, nw, nb, EPS);
  const parts = c.parts.map((p) => {
    const w32 = rng.randn(p.N * K, 1 / Math.sqrt(K));
    const h = f16Round(w32);
    const b = p.bias ? rng.randn(p.N) : null;
    return {
      ...p,
      w: p.f16 ? tensorFrom(g, h.bits, [p.N, K]) : upload(g, w32, [p.N, K]),
      wValues: p.f16 ? h.values : w32,
      b,
      bT: b ? upload(g, b) : null,
      fused: poisoned(g, [M, p.N], p.ot),
      single: poisoned(g, [M, p.N], p.ot),
    };
  });
  const [q, k, v] = parts as [typeof parts[0], typeof parts[0], typeof parts[0]];
  const rec = new Recorder(g);
  withNr(
    c.nr,
    (r) =>
      decodeQkvForward(
        r,
        q.fused,
        k.fused,
        v.fused,
        xT,
        q.w,
        k.w,
        v.w,
        q.bT,
        k.bT,
        v.bT,
        withPrologue(pro, {}),
      ),
  )(
    rec,
  );
  const dispatches = rec.ops.length;
  for (const p of parts) decodeLinearForward(rec, p.single, xT, p.w, p.bT, withPrologue(pro, {}));
  rec.submit();
  const xn = normRef(norm, x, nw, nb, M, K, EPS);
  for (const [i, p] of parts.entries()) {
    const read = (t: Tensor) => t.dtype === "f16" ? downloadF16(g, t) : download(g, t);
    const got = await read(p.fused);
    const tol = p.ot === "f16" ? TOL_F16_OUT : TOL;
    const name = `${"qkv"[i]} (N=${p.N} w ${p.f16 ? "f16" : "f32"} bias=${p.bias} out ${p.ot}) ${what}`;
    assertClose(got, linearForwardRef(xn, p.wValues, p.b, M, p.N, K), tol, `${name} vs float64`);
    // the same f32 sums in another order (the plans differ): within f32 rounding, or one f16 rounding step
    assertClose(got, await read(p.single), tol, `${name} vs decodeLinearForward`);
  }
  return dispatches;
}

Deno.test("decodeQkvForward equals norm → q, k, v Linear in float64 and three decodeLinearForward calls, in one dispatch: M = 1 and 4, each prologue, with and without biases, f32 and f16 weights and activations, odd sizes", async () => {
  const g = await gpu();
  const rng = new Rng(31);
  const part = (N: number, f16: boolean, bias: boolean, ot: Act): QkvPart => ({ N, f16, bias, ot });
  // (Nq, Nk, Nv, K): odd row counts, q's last workgroup partly empty; a k or v of one row; GQA shapes
  const shapes = [[33, 7, 9, 520], [7, 1, 4, 12], [130, 33, 33, 64], [64, 16, 16, 2056]] as const;
  let i = 0;
  for (const M of [1, 4]) {
    for (const norm of NORMS) {
      for (const f16 of g.hasF16 ? [false, true] : [false]) {
        // activations: an f16 model's (f16 x and outputs), else f32; one case mixes them
        const acts: [Act, Act, Act][] = f16
          ? [["f16", "f16", "f16"], ["f16", "f32", "f16"]]
          : [["f32", "f32", "f32"]];
        for (const [xt, qt, kvt] of acts) {
          const [Nq, Nk, Nv, K] = shapes[i % shapes.length]!;
          // biases: none (llama), all three (qwen2, gpt2), or only k's (an absent one's binding is a stand-in)
          const bias = [[false, false, false], [true, true, true], [false, true, false]][i % 3]!;
          i++;
          const what = `M=${M} K=${K} ${norm} x ${xt}`;
          const parts: [QkvPart, QkvPart, QkvPart] = [
            part(Nq, f16, bias[0]!, qt),
            part(Nk, f16, bias[1]!, kvt),
            part(Nv, f16, bias[2]!, kvt),
          ];
          const dispatches = await qkvCase(g, rng, { M, K, norm, xt, parts }, what);
          assert.equal(dispatches, 1, `one dispatch on this device (storage buffers ≤ 12 fit) ${what}`);
        }
      }
    }
  }
});

Deno.test("decodeQkvForward with 2 and 4 output rows per thread group and every thread count: each workgroup stays within one of q, k, v", async () => {
  const g = await gpu();
  const rng = new Rng(32);
  const parts = (Nq: number, Nk: number, Nv: number): [QkvPart, QkvPart, QkvPart] =>
    [Nq, Nk, Nv].map((N) => ({ N, f16: false, bias: true, ot: "f32" as const })) as [
      QkvPart,
      QkvPart,
      QkvPart,
    ];
  for (const [nr, M, norm] of [[2, 3, "rms"], [4, 2, "layer"], [4, 1, "none"]] as const) {
    await qkvCase(
      g,
      rng,
      { M, K: 64, norm, xt: "f32", parts: parts(37, 5, 11), nr },
      `nr≤${nr} M=${M} ${norm}`,
    );
  }
  try {
    for (const threads of [32, 64, 128, 256] as const) {
      decodeMatvecTuning.threads = threads;
      await qkvCase(
        g,
        rng,
        { M: 2, K: 520, norm: "rms", xt: "f32", parts: parts(9, 3, 3) },
        `threads=${threads}`,
      );
    }
  } finally {
    decodeMatvecTuning.threads = null;
  }
});

Deno.test("decodeQkvForward records three decodeLinearForward dispatches where its bindings exceed maxStorageBuffersPerShaderStage (8 here) or the weight dtypes differ", async () => {
  const g = await gpu();
  const rng = new Rng(33);
  const g8 = withStorageBufferLimit(g, 8); // WebGPU's default limit on the same device
  const f32Parts = (bias: boolean): [QkvPart, QkvPart, QkvPart] =>
    [20, 4, 4].map((N) => ({ N, f16: false, bias, ot: "f32" as const })) as [QkvPart, QkvPart, QkvPart];
  // llama: q, k, v, x, 3 weights and the RMSNorm weight = 8 bindings, one dispatch; with biases 11, with
  // a LayerNorm 9 (+3 with biases): three
  const cases: [Norm, boolean, number][] = [
    ["rms", false, 1],
    ["none", false, 1],
    ["rms", true, 3],
    ["layer", false, 3],
    ["layer", true, 3],
  ];
  for (const [norm, bias, want] of cases) {
    const what = `limit 8, ${norm} bias=${bias}`;
    const got = await qkvCase(g8, rng, { M: 2, K: 12, norm, xt: "f32", parts: f32Parts(bias) }, what);
    assert.equal(got, want, `dispatches with ${what}`);
  }
  if (!g.hasF16) return;
  const mixed: [QkvPart, QkvPart, QkvPart] = [
    { N: 20, f16: true, bias: false, ot: "f32" },
    { N: 4, f16: false, bias: false, ot: "f32" },
    { N: 4, f16: true, bias: false, ot: "f32" },
  ];
  const got = await qkvCase(g, rng, { M: 1, K: 12, norm: "rms", xt: "f32", parts: mixed }, "mixed weights");
  assert.equal(got, 3, "mixed weight dtypes: three dispatches");
});

Deno.test("decodeQkvForward refuses mismatched K, wrong output sizes, bad biases and overlapping outputs with a GpuError", async () => {
  const g = await gpu();
  const rec = new Recorder(g);
  const t = (shape: number[], dtype: "f32" | "f16" | "i32" = "f32") => createTensor(g, shape, dtype, "t");
  const x = t([1, 12]);
  const wq = t([8, 12]), wk = t([4, 12]), wv = t([4, 12]);
  const refuses = (f: () => void, re: RegExp) =>
    assert.throws(f, (e: unknown) => e instanceof GpuError && re.test(e.message));
  refuses(
    () => decodeQkvForward(rec, t([1, 8]), t([1, 4]), t([1, 4]), x, wq, t([4, 8]), wv, null, null, null),
    /decodeQkvForward: .*(K = 12|whole number of rows)/,
  );
  refuses(
    () => decodeQkvForward(rec, t([1, 8]), t([1, 5]), t([1, 4]), x, wq, wk, wv, null, null, null),
    /output t must be f32 or f16 of 1x4/,
  );
  refuses(
    () => decodeQkvForward(rec, t([1, 8]), t([1, 4]), t([1, 4]), x, wq, wk, wv, null, t([5]), null),
    /bias t must be f32 of 4/,
  );
  const k = t([1, 4]);
  refuses(() => decodeQkvForward(rec, t([1, 8]), k, k, x, wq, wk, wv, null, null, null), /overlaps input/);
  refuses(
    () =>
      decodeQkvForward(rec, t([1, 8]), t([1, 4]), t([1, 4]), x, wq, wk, t([4, 12], "i32"), null, null, null),
    /must be f32 or f16/,
  );
  assert.equal(rec.ops.length, 0);
});

/** A q/k/v + RoPE + cache-append case of {@link ropeCase}. */
interface RopeCase {
  /** Rows of x, T tokens per batch row (B = M / T). */
  M: number;
  T: number;
  H: number;
  Hkv: number;
  D: number;
  K: number;
  norm: Norm;
  /** Weights f16. */
  wf16: boolean;
  /** Element types of x, q and the caches (the plain k/v scratch take the caches'). */
  xt: Act;
  qt: Act;
  ct: Act;
  /** state[0], the cache position of the first token, and the cache length. */
  pos: number;
  maxLen: number;
  biases?: boolean;
  nr?: Nr;
}

/** The cache elements of appended rows (row m of x at batch row m / T, position pos + m % T) and the rest. */
function cacheRows(
  cache: ArrayLike<number>,
  c: RopeCase,
  width: number,
): { written: number[]; src: number[]; rest: number[] } {
  const written: number[] = [], src: number[] = [], rest: number[] = [];
  const B = c.M / c.T;
  for (let b = 0; b < B; b++) {
    for (let j = 0; j < c.maxLen; j++) {
      const t = j - c.pos;
      for (let e = 0; e < width; e++) {
        const x = cache[(b * c.maxLen + j) * width + e]!;
        if (t >= 0 && t < c.T) {
          written.push(x);
          src.push((b * c.T + t) * width + e);
        } else rest.push(x);
      }
    }
  }
  return { written, src, rest };
}

/**
 * One case of `decodeQkvForward` with `rope`: into NaN-poisoned q, k/v scratch and caches (mask 7), beside
 * the two-dispatch path (`decodeQkvForward` then `kvCacheAppendRope`) into caches of their own, both
 * against the float64 reference norm → q/k/v → RoPE → cache rows. Returns the dispatches of the call.
 */
async function ropeCase(g: Gpu, rng: Rng, c: RopeCase, gl: Gpu = g): Promise<number> {
  const { M, T, H, Hkv, D, K, norm } = c;
  const B = M / T, Nq = H * D, width = Hkv * D;
  const what =
    `M=${M} T=${T} H=${H} Hkv=${Hkv} D=${D} K=${K} ${norm} w ${c.wf16 ? "f16" : "f32"} x ${c.xt} ` +
    `q ${c.qt} cache ${c.ct} pos=${c.pos} maxLen=${c.maxLen}${c.biases ? " biases" : ""}${
      c.nr ? ` nr≤${c.nr}` : ""
    }`;
  const { t: xT, x } = input(g, rows(rng, M, K), M, K, c.xt);
  const { nw, nb } = normParams(rng, K);
  const pro = prologueOf(g, norm, nw, nb, EPS);
  const weight = (N: number) => {
    const w32 = rng.randn(N * K, 1 / Math.sqrt(K));
    const h = f16Round(w32);
    return {
      t: c.wf16 ? tensorFrom(g, h.bits, [N, K]) : upload(g, w32, [N, K]),
      values: c.wf16 ? h.values : w32,
    };
  };
  const [wq, wk, wv] = [weight(Nq), weight(width), weight(width)];
  const bias = (N: number) => c.biases ? rng.randn(N) : null;
  const [bq, bk, bv] = [bias(Nq), bias(width), bias(width)];
  const bT = (b: Float32Array | null) => b ? upload(g, b) : null;
  const invFreq = invFreqRef(D, 10000);
  // every row its own position (below 100: the RoPE tests' tolerance), batch rows far apart
  const positions = Int32Array.from({ length: M }, (_, m) => c.pos + (m % T) + 17 * Math.floor(m / T));
  const shared = {
    invFreq: tensorFrom(g, invFreq),
    positions: tensorFrom(g, positions),
    state: tensorFrom(g, new Uint32Array([c.pos, 0, 0, 0])),
  };
  const fresh = () => ({
    q: poisoned(g, [M, Nq], c.qt),
    k: poisoned(g, [M, width], c.ct),
    v: poisoned(g, [M, width], c.ct),
    kCache: poisoned(g, [B, c.maxLen, width], c.ct),
    vCache: poisoned(g, [B, c.maxLen, width], c.ct),
    mask: tensorFrom(g, new Int32Array(B * c.maxLen).fill(7)),
  });
  const fused = fresh(), two = fresh();
  const ropeOf = (o: typeof fused): QkvRope => ({
    ...shared,
    kCache: o.kCache,
    vCache: o.vCache,
    mask: o.mask,
    numHeads: H,
    numKvHeads: Hkv,
    maxLen: c.maxLen,
    tokens: T,
  });
  const rec = new Recorder(gl);
  withNr(c.nr, (r) =>
    decodeQkvForward(
      r,
      fused.q,
      fused.k,
      fused.v,
      xT,
      wq.t,
      wk.t,
      wv.t,
      bT(bq),
      bT(bk),
      bT(bv),
      withPrologue(pro, { rope: ropeOf(fused) }),
    ))(rec);
  const dispatches = rec.ops.length;
  const rec2 = new Recorder(g);
  decodeQkvForward(
    rec2,
    two.q,
    two.k,
    two.v,
    xT,
    wq.t,
    wk.t,
    wv.t,
    bT(bq),
    bT(bk),
    bT(bv),
    withPrologue(pro, {}),
  );
  kvCacheAppendRope(
    rec2,
    two.kCache,
    two.vCache,
    two.mask,
    two.q,
    two.k,
    two.v,
    shared.invFreq,
    shared.positions,
    shared.state,
    {
      batch: B,
      tokens: T,
      numHeads: H,
      numKvHeads: Hkv,
      maxLen: c.maxLen,
    },
  );
  rec.submit();
  rec2.submit();

  const xn = normRef(norm, x, nw, nb, M, K, EPS);
  const qRot = ropeRef(linearForwardRef(xn, wq.values, bq, M, Nq, K), invFreq, positions, H);
  const kRot = ropeRef(linearForwardRef(xn, wk.values, bk, M, width, K), invFreq, positions, Hkv);
  const vRef = linearForwardRef(xn, wv.values, bv, M, width, K);
  const read = (t: Tensor) => t.dtype === "f16" ? downloadF16(g, t) : download(g, t);
  // one f32 dot product (TOL) then f32 cos/sin (1e-5, the RoPE tests' tolerance): 2e-5; an f16 store
  // rounds once more (TOL_F16_OUT); the two-dispatch path rounds f16 k before rotating it: one step more
  const tolOf = (t: Act) => t === "f16" ? TOL_F16_OUT : 2e-5;
  const gotQ = await read(fused.q);
  assertClose(gotQ, qRot, tolOf(c.qt), `rotated q vs float64 ${what}`);
  assertClose(gotQ, await read(two.q), tolOf(c.qt), `rotated q vs two dispatches ${what}`);
  for (
    const [name, want, cache, cache2] of [
      ["keys", kRot, fused.kCache, two.kCache],
      ["values", vRef, fused.vCache, two.vCache],
    ] as const
  ) {
    const rows = cacheRows(await read(cache), c, width);
    const rows2 = cacheRows(await read(cache2), c, width);
    const tol = tolOf(c.ct) * (name === "keys" && c.ct === "f16" ? 2 : 1);
    assertClose(rows.written, rows.src.map((i) => want[i]!), tolOf(c.ct), `${name} vs float64 ${what}`);
    assertClose(rows.written, rows2.written, tol, `${name} vs two dispatches ${what}`);
    assert.ok(rows.rest.every(Number.isNaN), `${name}: cache rows not appended stay NaN ${what}`);
  }
  const wantMask = new Int32Array(B * c.maxLen).fill(7);
  for (let m = 0; m < M; m++) {
    const j = c.pos + (m % T);
    if (j < c.maxLen) wantMask[Math.floor(m / T) * c.maxLen + j] = 1;
  }
  assert.deepEqual(await readTensor(g, fused.mask), wantMask, `mask ${what}`);
  assert.deepEqual(await readTensor(g, two.mask), wantMask, `two-dispatch mask ${what}`);
  if (dispatches === 1) {
    for (const t of [fused.k, fused.v]) {
      assert.ok((await read(t)).every(Number.isNaN), `the fused dispatch leaves the plain k/v alone ${what}`);
    }
  }
  return dispatches;
}

Deno.test("decodeQkvForward with rope equals norm → q, k, v → RoPE → cache rows in float64 and the two-dispatch path, in one dispatch: M = 1 and 4, GQA, odd head sizes, f32 and f16, rows past maxLen dropped", async () => {
  const g = await gpu();
  const rng = new Rng(41);
  const base = { norm: "rms", wf16: false, xt: "f32", qt: "f32", ct: "f32" } as const;
  const cases: RopeCase[] = [
    // one token, GQA (2 query heads per kv head), first position
    { ...base, M: 1, T: 1, H: 4, Hkv: 2, D: 8, K: 64, pos: 0, maxLen: 5 },
    // four sequences with their own positions; D/2 = 5 odd, q's pairs end inside a workgroup
    { ...base, M: 4, T: 1, H: 6, Hkv: 2, D: 10, K: 520, pos: 3, maxLen: 7 },
    // two batch rows of two tokens; the second token of each falls past maxLen; LayerNorm
    { ...base, norm: "layer", M: 4, T: 2, H: 3, Hkv: 1, D: 6, K: 12, pos: 4, maxLen: 5 },
    // no norm, MHA (Hkv = H), D = 2, last cache position
    { ...base, norm: "none", M: 2, T: 1, H: 5, Hkv: 5, D: 2, K: 2056, pos: 8, maxLen: 9 },
    // TinyLlama's attention shape (32 heads, 4 kv heads, D = 64, C = 2048)
    { ...base, M: 1, T: 1, H: 32, Hkv: 4, D: 64, K: 2048, pos: 37, maxLen: 64 },
  ];
  if (g.hasF16) {
    const f16 = { wf16: true, xt: "f16", qt: "f16", ct: "f16" } as const;
    cases.push(
      { ...base, ...f16, M: 1, T: 1, H: 4, Hkv: 1, D: 16, K: 64, pos: 6, maxLen: 7 },
      { ...base, ...f16, M: 4, T: 1, H: 6, Hkv: 3, D: 10, K: 520, pos: 2, maxLen: 8 },
      // mixed: f16 weights and x, f32 q, f16 caches; f32 weights into f16 caches
      { ...base, ...f16, qt: "f32", M: 3, T: 1, H: 2, Hkv: 1, D: 12, K: 12, pos: 1, maxLen: 3 },
      { ...base, ct: "f16", M: 4, T: 2, H: 4, Hkv: 2, D: 4, K: 64, pos: 0, maxLen: 4 },
    );
  }
  for (const c of cases) {
    assert.equal(await ropeCase(g, rng, c), 1, `one dispatch on this device (12 storage buffers fit)`);
  }
});

Deno.test("decodeQkvForward with rope keeps RoPE pairs within a workgroup for 2 and 4 output rows per group and every thread count (256 runs as 128)", async () => {
  const g = await gpu();
  const rng = new Rng(42);
  const base = { T: 1, wf16: false, xt: "f32", qt: "f32", ct: "f32", pos: 2, maxLen: 3 } as const;
  for (const [nr, M, norm] of [[2, 3, "rms"], [4, 2, "layer"], [4, 1, "none"]] as const) {
    await ropeCase(g, rng, { ...base, M, norm, nr, H: 7, Hkv: 3, D: 6, K: 64 });
  }
  try {
    for (const threads of [32, 64, 128, 256] as const) {
      decodeMatvecTuning.threads = threads;
      await ropeCase(g, rng, { ...base, M: 2, norm: "rms", H: 3, Hkv: 1, D: 10, K: 520 });
    }
  } finally {
    decodeMatvecTuning.threads = null;
  }
});

Deno.test("decodeQkvForward with rope falls back to the products and kvCacheAppendRope with biases, mixed weight dtypes, or bindings over maxStorageBuffersPerShaderStage", async () => {
  const g = await gpu();
  const rng = new Rng(43);
  const withLimit = (n: number): Gpu => withStorageBufferLimit(g, n);
  const base = {
    M: 2,
    T: 1,
    H: 4,
    Hkv: 2,
    D: 6,
    K: 12,
    norm: "rms",
    wf16: false,
    xt: "f32",
    qt: "f32",
    ct: "f32",
    pos: 1,
    maxLen: 4,
  } as const;
  // RMSNorm: 12 bindings fused; at 11 the q/k/v dispatch (8) and the append; at 8 with a LayerNorm
  // (9 for the plain products) three products and the append; biases (qwen2): products and append
  assert.equal(await ropeCase(g, rng, base, withLimit(12)), 1, "limit 12, rms");
  assert.equal(await ropeCase(g, rng, { ...base, norm: "none" }, withLimit(11)), 1, "limit 11, no norm");
  assert.equal(await ropeCase(g, rng, base, withLimit(11)), 2, "limit 11, rms");
  assert.equal(await ropeCase(g, rng, { ...base, norm: "layer" }, withLimit(8)), 4, "limit 8, layer");
  assert.equal(await ropeCase(g, rng, { ...base, biases: true }), 2, "biases");
});

Deno.test("decodeQkvForward refuses RoPE shapes that do not match q, k, v and undersized caches, mask, positions or state", async () => {
  const g = await gpu();
  const rec = new Recorder(g);
  const t = (shape: number[], dtype: "f32" | "i32" | "u32" = "f32") => createTensor(g, shape, dtype, "t");
  const x = t([2, 12]);
  const wq = t([8, 12]), wk = t([4, 12]), wv = t([4, 12]);
  const good: QkvRope = {
    invFreq: t([2]),
    positions: t([2], "i32"),
    state: t([4], "u32"),
    kCache: t([2, 3, 4]),
    vCache: t([2, 3, 4]),
    mask: t([2, 3], "i32"),
    numHeads: 2,
    numKvHeads: 1,
    maxLen: 3,
  };
  const call = (r: Partial<QkvRope>) => () =>
    decodeQkvForward(rec, t([2, 8]), t([2, 4]), t([2, 4]), x, wq, wk, wv, null, null, null, {
      rope: { ...good, ...r },
    });
  const refuses = (f: () => void, re: RegExp) =>
    assert.throws(f, (e: unknown) => e instanceof GpuError && re.test(e.message));
  refuses(call({ numHeads: 4 }), /must be H\*D, Hkv\*D, Hkv\*D with H = 4/);
  refuses(call({ invFreq: t([3]) }), /D = 6/);
  refuses(call({ tokens: 3 }), /rope.tokens 3 must divide the 2 rows/);
  refuses(call({ kCache: t([2, 2, 4]) }), /kCache t .* smaller than \(B, maxLen, Hkv\*D\)/);
  refuses(call({ mask: t([2, 3]) }), /mask t must be i32/);
  refuses(call({ positions: t([1], "i32") }), /positions t must be i32 of 2 rows/);
  refuses(call({ state: t([4]) }), /state t must be u32/);
  const kc = t([2, 3, 4]);
  refuses(call({ kCache: kc, vCache: kc }), /overlaps input/);
  assert.equal(rec.ops.length, 0);
});
