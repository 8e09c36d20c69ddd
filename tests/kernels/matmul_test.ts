import assert from "node:assert/strict";
import {
  type ColumnGroups,
  conv1dBackwardInput,
  conv1dForward,
  linearBackwardInput,
  linearForward,
  type MatmulKernelChoice,
  matmulTuning,
} from "../../kernels/matmul.ts";
import { Recorder, runOps } from "../../src/gpu/recorder.ts";
import { createTensor, splitRows, Tensor, tensorFrom } from "../../src/gpu/tensor.ts";
import type { Gpu } from "../../src/gpu/device.ts";
import { GpuError } from "../../src/errors.ts";
import {
  assertClose,
  download,
  downloadAny,
  downloadF16,
  gpu,
  poisoned,
  relError,
  Rng,
  upload,
  uploadAs,
  uploadF16,
} from "../_util.ts";
import {
  conv1dBackwardInputRef,
  conv1dForwardRef,
  linearBackwardInputRef,
  linearForwardRef,
} from "../reference/matmul.ts";

// Forward and input-gradient products are single f32 dot products of length ≤ 140 here: 1e-5 normwise.
const TOL = 1e-5;
// f16 weights: the reference uses the same f16-rounded weights, so only f32 accumulation differs and the
// f32 tolerance applies; the 2e-3 bound below is against the unrounded f32 weights (f16 has 11 bits).
const TOL_F16_VS_F32 = 2e-3;
// f16 outputs: the f32 result rounded once to f16 (2^-11 relative per element) against the float64
// reference of the same f16-rounded inputs: 2e-3 normwise. f32 outputs of f16 inputs keep TOL.
const TOL_F16_OUT = 2e-3;

const CHOICES: (MatmulKernelChoice | null)[] = [
  null,
  "128x128",
  "128x64",
  "64x128",
  "64x64",
  "32x32",
  "128x64-8x8",
  "64x128-8x8",
  "64x64-8x8",
  "128x128-16x8",
  "matvec",
];
// (M, N, K): odd sizes, sizes that are and are not multiples of 4 (vec4 and scalar loads), one row;
// (2, 36, 20) and (2, 12, 520) take the matrix-vector kernel in both layouts (520 runs its unrolled loop);
// (10, 36, 20) and (16, 12, 260) too, with several rounds of the "kn" kernel's reduction (4 rows each).
const SHAPES: [number, number, number][] = [
  [1, 7, 5],
  [3, 33, 64],
  [4, 130, 36],
  [2, 36, 20],
  [2, 12, 520],
  [10, 36, 20],
  [16, 12, 260],
  [7, 130, 33],
  [33, 65, 132],
  [130, 36, 20],
  [128, 128, 24], // whole 128x128 / 64x64 tiles and K steps of 8: the unguarded ("exact") kernel
  [128, 128, 48], // the same with whole K steps of 16 (the default where workgroup memory allows)
];

/**
 * Kernel variants beyond the tile choice: split-K (partial sums plus a reduction), single-buffered tiles and
 * the other K step.
 */
const VARIANTS: {
  label: string;
  force: MatmulKernelChoice;
  splitK?: number;
  doubleBuffer?: boolean;
  matvecPacked?: boolean;
  kStep?: 8 | 16;
}[] = [
  { label: "32x32 split-K 3", force: "32x32", splitK: 3 },
  { label: "128x128 split-K 2", force: "128x128", splitK: 2 },
  { label: "64x64 single-buffered", force: "64x64", doubleBuffer: false },
  { label: "matvec with 8 packed halves per weight load", force: "matvec", matvecPacked: true },
  { label: "128x128 K step 8", force: "128x128", kStep: 8 },
  {
    label: "64x64 K step 8 split-K 2 single-buffered",
    force: "64x64",
    kStep: 8,
    splitK: 2,
    doubleBuffer: false,
  },
  { label: "64x128-8x8 (its K step 8) split-K 2", force: "64x128-8x8", splitK: 2 },
  { label: "64x64-8x8 (K step 16) split-K 3", force: "64x64-8x8", splitK: 3 },
  { label: "128x64-8x8 (its K step 8) split-K 6", force: "128x64-8x8", splitK: 6 },
];

/**
 * Runs `body` with every kernel forced in turn (null = the heuristic), then every variant, restoring the
 * heuristic after.
 */
async function forEachKernel(body: (choice: string) => Promise<void>): Promise<void> {
  try {
    for (const c of CHOICES) {
      matmulTuning.force = c;
      await body(String(c));
    }
    for (const v of VARIANTS) {
      matmulTuning.force = v.force;
      matmulTuning.splitK = v.splitK ?? null;
      matmulTuning.doubleBuffer = v.doubleBuffer ?? null;
      matmulTuning.matvecPacked = v.matvecPacked ?? null;
      matmulTuning.kStep = v.kStep ?? null;
      await body(v.label);
    }
  } finally {
    matmulTuning.force = null;
    matmulTuning.splitK = null;
    matmulTuning.doubleBuffer = null;
    matmulTuning.matvecPacked = null;
    matmulTuning.kStep = null;
  }
}

function f16Round(a: Float32Array): { bits: Uint16Array; values: Float32Array } {
  const h = new Float16Array(a);
  return { bits: new Uint16Array(h.buffer), values: Float32Array.from(h) };
}

async function run(g: Gpu, out: Tensor, record: (rec: Recorder) => void): Promise<Float32Array> {
  const rec = new Recorder(g);
  record(rec);
  rec.submit();
  return await read(g, out);
}

Deno.test("linearForward matches the float64 reference for every kernel, odd sizes, with and without bias", async () => {
  const g = await gpu();
  const rng = new Rng(11);
  await forEachKernel(async (choice) => {
    for (const [M, N, K] of SHAPES) {
      const x = rng.randn(M * K);
      const w = rng.randn(N * K, 0.5);
      const b = rng.randn(N);
      for (const withBias of [true, false]) {
        const out = poisoned(g, [M, N]);
        const got = await run(
          g,
          out,
          (rec) =>
            linearForward(
              rec,
              out,
              upload(g, x, [M, K]),
              upload(g, w, [N, K]),
              withBias ? upload(g, b) : null,
            ),
        );
        assertClose(
          got,
          linearForwardRef(x, w, withBias ? b : null, M, N, K),
          TOL,
          `linear ${choice} ${M}x${N}x${K}`,
        );
      }
    }
  });
});

Deno.test("linearForward writes its column slice of a wider output and accumulates", async () => {
  const g = await gpu();
  const rng = new Rng(12);
  await forEachKernel(async (choice) => {
    for (const [M, N, K] of [[2, 9, 12], [7, 33, 17], [66, 40, 8]] as const) {
      const ld = N + 13;
      const off = 5;
      const x = rng.randn(M * K);
      const w = rng.randn(N * K);
      const b = rng.randn(N);
      const init = rng.randn(M * ld);
      const prod = linearForwardRef(x, w, b, M, N, K);
      for (const accumulate of [false, true]) {
        const out = upload(g, init, [M, ld]);
        const got = await run(
          g,
          out,
          (rec) =>
            linearForward(rec, out, upload(g, x), upload(g, w, [N, K]), upload(g, b), {
              accumulate,
              outColOffset: off,
              ldOut: ld,
            }),
        );
        const want = Float64Array.from(init);
        for (let m = 0; m < M; m++) {
          for (let n = 0; n < N; n++) {
            want[m * ld + off + n] = (accumulate ? init[m * ld + off + n]! : 0) + prod[m * N + n]!;
          }
        }
        assertClose(got, want, TOL, `linear slice ${choice} acc=${accumulate} ${M}x${N}x${K}`);
      }
    }
  });
});

Deno.test("the analytic input gradients of Linear and Conv1D match central finite differences", () => {
  const rng = new Rng(13);
  const [M, N, K] = [3, 4, 5];
  const x = Float64Array.from(rng.randn(M * K));
  const w = Float64Array.from(rng.randn(N * K));
  const dy = Float64Array.from(rng.randn(M * N));
  const h = 1e-6;
  for (
    const [name, fwd, bwd] of [
      ["linear", linearForwardRef, linearBackwardInputRef],
      ["conv1d", conv1dForwardRef, conv1dBackwardInputRef],
    ] as const
  ) {
    // loss = sum(dy * f(x)); its gradient with respect to x is the backward of dy
    const loss = (xx: Float64Array) => fwd(xx, w, null, M, N, K).reduce((s, v, i) => s + v * dy[i]!, 0);
    const analytic = bwd(dy, w, M, N, K);
    const numeric = new Float64Array(M * K);
    for (let i = 0; i < M * K; i++) {
      const xp = Float64Array.from(x);
      const xm = Float64Array.from(x);
      xp[i] = xp[i]! + h;
      xm[i] = xm[i]! - h;
      numeric[i] = (loss(xp) - loss(xm)) / (2 * h);
    }
    assert.ok(relError(analytic, numeric) < 1e-7, `${name}: ${relError(analytic, numeric)}`);
  }
});

/** (M, N) row-major → its column groups [g1, g2] as consecutive row-major blocks (see `ColumnGroups`). */
function toGroups(a: ArrayLike<number>, M: number, N: number, [g1, g2]: ColumnGroups): Float64Array {
  const out = new Float64Array(M * N);
  let at = 0;
  for (const [c0, c1] of [[0, g1], [g1, g2], [g2, N]] as const) {
    for (let m = 0; m < M; m++) for (let n = c0; n < c1; n++) out[at++] = a[m * N + n]!;
  }
  return out;
}

// (M, K, column groups, N): three blocks, an empty middle block, two blocks (g2 = N); whole and partial tiles
const GROUPED: [number, number, ColumnGroups, number][] = [
  [37, 36, [16, 28], 40],
  [128, 48, [64, 96], 128],
  [5, 20, [12, 12], 24],
  [10, 36, [8, 16], 24], // the matrix-vector kernels (M ≤ 16): an adapter's keys and values in one product
  [70, 12, [8, 24], 24],
];

Deno.test("linearForward writes column groups (q, k, v in one product) with bias, accumulate and f16 out", async () => {
  const g = await gpu();
  const rng = new Rng(21);
  await forEachKernel(async (choice) => {
    for (const [M, K, groups, N] of GROUPED) {
      const x = rng.randn(M * K);
      const w = rng.randn(N * K, 0.5);
      const b = rng.randn(N);
      const want = toGroups(linearForwardRef(x, w, b, M, N, K), M, N, groups);
      const out = poisoned(g, [M * N]);
      const got = await run(
        g,
        out,
        (rec) =>
          linearForward(rec, out, upload(g, x, [M, K]), upload(g, w, [N, K]), upload(g, b), {
            outGroups: groups,
          }),
      );
      assertClose(got, want, TOL, `grouped ${choice} ${M}x${N}x${K} [${groups}]`);
      const init = rng.randn(M * N);
      const acc = upload(g, init);
      const gotAcc = await run(
        g,
        acc,
        (rec) =>
          linearForward(rec, acc, upload(g, x, [M, K]), upload(g, w, [N, K]), null, {
            outGroups: groups,
            accumulate: true,
          }),
      );
      const plain = toGroups(linearForwardRef(x, w, null, M, N, K), M, N, groups);
      assertClose(gotAcc, plain.map((v, i) => v + init[i]!), TOL, `grouped accumulate ${choice}`);
      if (g.hasF16) {
        const out16 = poisoned(g, [M * N], "f16");
        const got16 = await run(
          g,
          out16,
          (rec) =>
            linearForward(rec, out16, upload(g, x, [M, K]), upload(g, w, [N, K]), upload(g, b), {
              outGroups: groups,
            }),
        );
        assertClose(got16, want, TOL_F16_OUT, `grouped f16 out ${choice}`);
      }
    }
  });
});

Deno.test("linearBackwardInput reads dy in column groups (the q, k, v gradients in one product)", async () => {
  const g = await gpu();
  const rng = new Rng(22);
  await forEachKernel(async (choice) => {
    for (const [M, K, groups, N] of GROUPED) {
      const dy = rng.randn(M * N);
      const w = rng.randn(N * K, 0.5);
      const want = linearBackwardInputRef(dy, w, M, N, K);
      const dyGrouped = Float32Array.from(toGroups(dy, M, N, groups));
      const dx = poisoned(g, [M, K]);
      const got = await run(
        g,
        dx,
        (rec) =>
          linearBackwardInput(rec, dx, upload(g, dyGrouped), upload(g, w, [N, K]), { dyGroups: groups }),
      );
      assertClose(got, want, TOL, `grouped dy ${choice} ${M}x${N}x${K} [${groups}]`);
      const init = rng.randn(M * K);
      const acc = upload(g, init, [M, K]);
      const gotAcc = await run(
        g,
        acc,
        (rec) =>
          linearBackwardInput(rec, acc, upload(g, dyGrouped), upload(g, w, [N, K]), {
            dyGroups: groups,
            accumulate: true,
          }),
      );
      assertClose(gotAcc, want.map((v, i) => v + init[i]!), TOL, `grouped dy accumulate ${choice}`);
    }
  });
});

Deno.test("column groups that are not multiples of 4, or come with an offset, are refused", async () => {
  const g = await gpu();
  const x = upload(g, new Float32Array(4 * 8), [4, 8]);
  const w = upload(g, new Float32Array(12 * 8), [12, 8]);
  const out = createTensor(g, [4 * 12]);
  const rec = new Recorder(g);
  assert.throws(() => linearForward(rec, out, x, w, null, { outGroups: [6, 8] }), GpuError);
  assert.throws(() => linearForward(rec, out, x, w, null, { outGroups: [8, 16] }), GpuError);
  assert.throws(() => linearForward(rec, out, x, w, null, { outGroups: [0, 8] }), GpuError);
  assert.throws(
    () => linearForward(rec, createTensor(g, [4 * 16]), x, w, null, { outGroups: [4, 8], ldOut: 16 }),
    GpuError,
  );
  assert.throws(() => linearBackwardInput(rec, x, out, w, { dyGroups: [4, 10] }), GpuError);
  // grouped dy needs its row length (the weight's rows) a multiple of 4
  const w13 = upload(g, new Float32Array(13 * 8), [13, 8]);
  assert.throws(
    () => linearBackwardInput(rec, x, createTensor(g, [4 * 13]), w13, { dyGroups: [4, 8] }),
    GpuError,
  );
});

Deno.test("linearBackwardInput matches the reference, including dy column slices and accumulate", async () => {
  const g = await gpu();
  const rng = new Rng(14);
  await forEachKernel(async (choice) => {
    for (const [M, N, K] of SHAPES) {
      const w = rng.randn(N * K, 0.5);
      for (const [off, ld] of [[0, N], [3, N + 7], [4, N + 8]]) {
        const dyWide = rng.randn(M * ld!);
        const dy = new Float32Array(M * N);
        for (let m = 0; m < M; m++) for (let n = 0; n < N; n++) dy[m * N + n] = dyWide[m * ld! + off! + n]!;
        const want = linearBackwardInputRef(dy, w, M, N, K);
        const dx = poisoned(g, [M, K]);
        const got = await run(
          g,
          dx,
          (rec) =>
            linearBackwardInput(rec, dx, upload(g, dyWide, [M, ld!]), upload(g, w, [N, K]), {
              dyColOffset: off!,
              ldDy: ld!,
            }),
        );
        assertClose(got, want, TOL, `linear backward ${choice} ${M}x${N}x${K} off=${off} ld=${ld}`);
        const init = rng.randn(M * K);
        const dxAcc = upload(g, init, [M, K]);
        const gotAcc = await run(
          g,
          dxAcc,
          (rec) =>
            linearBackwardInput(rec, dxAcc, upload(g, dyWide, [M, ld!]), upload(g, w, [N, K]), {
              dyColOffset: off!,
              ldDy: ld!,
              accumulate: true,
            }),
        );
        assertClose(
          gotAcc,
          want.map((v, i) => v + init[i]!),
          TOL,
          `linear backward acc ${choice} ${M}x${N}x${K}`,
        );
      }
    }
  });
});

Deno.test("conv1dForward and conv1dBackwardInput match the reference for every kernel", async () => {
  const g = await gpu();
  const rng = new Rng(15);
  await forEachKernel(async (choice) => {
    for (const [M, N, K] of SHAPES) {
      const x = rng.randn(M * K);
      const w = rng.randn(K * N, 0.5); // (K, N)
      const b = rng.randn(N);
      const out = poisoned(g, [M, N]);
      const got = await run(
        g,
        out,
        (rec) => conv1dForward(rec, out, upload(g, x, [M, K]), upload(g, w, [K, N]), upload(g, b)),
      );
      assertClose(got, conv1dForwardRef(x, w, b, M, N, K), TOL, `conv1d ${choice} ${M}x${N}x${K}`);
      const init = rng.randn(M * N);
      const acc = upload(g, init, [M, N]);
      const gotAcc = await run(
        g,
        acc,
        (rec) =>
          conv1dForward(rec, acc, upload(g, x, [M, K]), upload(g, w, [K, N]), null, { accumulate: true }),
      );
      assertClose(
        gotAcc,
        conv1dForwardRef(x, w, null, M, N, K).map((v, i) => v + init[i]!),
        TOL,
        `conv1d acc ${choice}`,
      );

      const dy = rng.randn(M * N);
      const dx = poisoned(g, [M, K]);
      const gotDx = await run(
        g,
        dx,
        (rec) => conv1dBackwardInput(rec, dx, upload(g, dy, [M, N]), upload(g, w, [K, N])),
      );
      const wantDx = conv1dBackwardInputRef(dy, w, M, N, K);
      assertClose(gotDx, wantDx, TOL, `conv1d backward ${choice} ${M}x${N}x${K}`);
      const initDx = rng.randn(M * K);
      const dxAcc = upload(g, initDx, [M, K]);
      const gotDxAcc = await run(
        g,
        dxAcc,
        (rec) =>
          conv1dBackwardInput(rec, dxAcc, upload(g, dy, [M, N]), upload(g, w, [K, N]), { accumulate: true }),
      );
      assertClose(gotDxAcc, wantDx.map((v, i) => v + initDx[i]!), TOL, `conv1d backward acc ${choice}`);
    }
  });
});

/** f16 weights in all four products, every kernel, at `shapes` (see the two tests below). */
async function checkF16Weights(shapes: [number, number, number][], label: string): Promise<void> {
  const g = await gpu();
  if (!g.hasF16) return; // the f16 path is only compiled where shader-f16 exists
  const rng = new Rng(16);
  await forEachKernel(async (kernel) => {
    const choice = `${label}${kernel}`;
    for (const [M, N, K] of shapes) {
      const x = rng.randn(M * K);
      const dy = rng.randn(M * N);
      const b = rng.randn(N);
      const w32 = rng.randn(N * K, 0.5); // (N, K) for Linear, read as (K, N) for Conv1D
      const { bits, values: w } = f16Round(w32);
      const wNK = () => tensorFrom(g, bits, [N, K]);
      const wKN = () => tensorFrom(g, bits, [K, N]);

      const out = poisoned(g, [M, N]);
      const got = await run(g, out, (rec) => linearForward(rec, out, upload(g, x), wNK(), upload(g, b)));
      assertClose(got, linearForwardRef(x, w, b, M, N, K), TOL, `f16 linear ${choice} ${M}x${N}x${K}`);
      assertClose(got, linearForwardRef(x, w32, b, M, N, K), TOL_F16_VS_F32, `f16 vs f32 linear ${choice}`);

      const dx = poisoned(g, [M, K]);
      const gotDx = await run(g, dx, (rec) => linearBackwardInput(rec, dx, upload(g, dy), wNK()));
      assertClose(
        gotDx,
        linearBackwardInputRef(dy, w, M, N, K),
        TOL,
        `f16 linear backward ${choice} ${M}x${N}x${K}`,
      );

      const out2 = poisoned(g, [M, N]);
      const got2 = await run(g, out2, (rec) => conv1dForward(rec, out2, upload(g, x), wKN(), upload(g, b)));
      assertClose(got2, conv1dForwardRef(x, w, b, M, N, K), TOL, `f16 conv1d ${choice} ${M}x${N}x${K}`);

      const dx2 = poisoned(g, [M, K]);
      const gotDx2 = await run(g, dx2, (rec) => conv1dBackwardInput(rec, dx2, upload(g, dy), wKN()));
      assertClose(
        gotDx2,
        conv1dBackwardInputRef(dy, w, M, N, K),
        TOL,
        `f16 conv1d backward ${choice} ${M}x${N}x${K}`,
      );
    }
  });
}

Deno.test("f16 weights give the f32 result of the f16-rounded weights in all four products", async () => {
  await withF16Loads(false, (label) => checkF16Weights(SHAPES, label));
});

Deno.test("more than 65535 workgroups are folded into y (matvec and tiled)", async () => {
  const g = await gpu();
  const rng = new Rng(17);
  // matvec with 256 threads per output: 1 row per workgroup -> 65537 workgroups; tiled 32x32: 32
  // columns per workgroup -> 65537
  for (const [choice, M, N, K] of [["matvec", 2, 65537, 4], ["32x32", 1, 32 * 65537 - 5, 1]] as const) {
    matmulTuning.force = choice;
    matmulTuning.matvecThreads = 256;
    try {
      const x = rng.randn(M * K);
      const w = rng.randn(N * K);
      const out = poisoned(g, [M, N]);
      const got = await run(
        g,
        out,
        (rec) => linearForward(rec, out, upload(g, x), upload(g, w, [N, K]), null),
      );
      assertClose(got, linearForwardRef(x, w, null, M, N, K), TOL, `fold ${choice}`);
    } finally {
      matmulTuning.force = null;
      matmulTuning.matvecThreads = null;
    }
  }
});

Deno.test("mismatched shapes are refused with a message naming the tensor", async () => {
  const g = await gpu();
  const rec = new Recorder(g);
  const x = poisoned(g, [3, 5]);
  const w = poisoned(g, [4, 6]);
  assert.throws(() => linearForward(rec, poisoned(g, [3, 4]), x, w, null), /not a whole number of rows of 6/);
  assert.throws(
    () => linearForward(rec, poisoned(g, [3, 4]), poisoned(g, [3, 6]), w, null, { outColOffset: 1 }),
    /exceed ldOut/,
  );
});

type Act = "f32" | "f16";

const activation = uploadAs;
const read = downloadAny;

/** The tolerance of an output of dtype `dt` (see TOL and TOL_F16_OUT). */
const tolOf = (dt: Act) => dt === "f16" ? TOL_F16_OUT : TOL;

/** f16 and f32 x, weight and out in any mix, linear and conv1d with bias, at `shapes`. */
async function checkActivationKinds(shapes: [number, number, number][], label: string): Promise<void> {
  const g = await gpu();
  if (!g.hasF16) return; // f16 activations need shader-f16
  const rng = new Rng(18);
  // (x, weight, out): f16 x with either weight and either output (projections of an f16 model, its LM
  // head's f32 logits), and f32 x into an f16 output
  const kinds: [Act, Act, Act][] = [
    ["f16", "f32", "f16"],
    ["f16", "f32", "f32"],
    ["f16", "f16", "f16"],
    ["f16", "f16", "f32"],
    ["f32", "f32", "f16"],
  ];
  for (const [M, N, K] of shapes) {
    for (const [xt, wt, ot] of kinds) {
      const x = activation(g, rng.randn(M * K), [M, K], xt);
      const w = activation(g, rng.randn(N * K, 0.5), [N * K], wt); // (N, K) Linear, (K, N) Conv1D
      const b = rng.randn(N);
      const what = `${label}x ${xt} w ${wt} out ${ot} ${M}x${N}x${K}`;
      const out = poisoned(g, [M, N], ot);
      const got = await run(
        g,
        out,
        (rec) => linearForward(rec, out, x.tensor, w.tensor.reshape([N, K]), upload(g, b)),
      );
      assertClose(
        got,
        linearForwardRef(x.values, w.values, b, M, N, K),
        tolOf(ot),
        `linear ${what}`,
      );
      const out2 = poisoned(g, [M, N], ot);
      const got2 = await run(
        g,
        out2,
        (rec) => conv1dForward(rec, out2, x.tensor, w.tensor.reshape([K, N]), upload(g, b)),
      );
      assertClose(
        got2,
        conv1dForwardRef(x.values, w.values, b, M, N, K),
        tolOf(ot),
        `conv1d ${what}`,
      );
    }
  }
}

Deno.test("f16 activations: x and out f16 or f32 independently, with f32 or f16 weights and bias, on the tiled and matrix-vector paths", async () => {
  // (M, N, K): tiled with vec4 A loads, tiled with scalar A loads (K odd), matrix-vector (M ≤ 4, vec4)
  await withF16Loads(false, (label) => checkActivationKinds([[33, 7, 20], [7, 33, 33], [3, 36, 20]], label));
});

/**
 * f16 x, f16 weight and an f16 out accumulated into, linear and conv1d, through every kernel variant:
 * `mv` on the matrix-vector kernels, `tiled` on the tiles (with the heuristic: both), `exact` on 64x64.
 */
async function checkF16Variants(
  mv: [number, number, number],
  tiled: [number, number, number],
  exact: [number, number, number],
  label: string,
): Promise<void> {
  const g = await gpu();
  if (!g.hasF16) return;
  const rng = new Rng(19);
  await forEachKernel(async (kernel) => {
    const choice = `${label}${kernel}`;
    const shapes: [number, number, number][] = kernel.startsWith("matvec")
      ? [mv]
      : kernel === "null"
      ? [mv, tiled]
      : kernel === "64x64"
      ? [tiled, exact]
      : [tiled];
    for (const [M, N, K] of shapes) {
      const x = uploadF16(g, rng.randn(M * K), [M, K]);
      const w = uploadF16(g, rng.randn(N * K, 0.5), [N * K]);
      const b = rng.randn(N);
      for (
        const [name, fwd, ref] of [
          ["linear", linearForward, linearForwardRef],
          ["conv1d", conv1dForward, conv1dForwardRef],
        ] as const
      ) {
        // out += x w + b on an f16 output: read as f32, added in f32, rounded once
        const init = uploadF16(g, rng.randn(M * N), [M, N]);
        const wShape = name === "linear" ? [N, K] : [K, N];
        await run(
          g,
          init.tensor,
          (rec) =>
            fwd(rec, init.tensor, x.tensor, w.tensor.reshape(wShape), upload(g, b), { accumulate: true }),
        );
        const prod = ref(x.values, w.values, b, M, N, K);
        assertClose(
          await downloadF16(g, init.tensor),
          prod.map((v, i) => v + init.values[i]!),
          TOL_F16_OUT,
          `f16 ${name} accumulate ${choice} ${M}x${N}x${K}`,
        );
      }
    }
  });
}

Deno.test("f16 x and f16 out through every kernel variant (tiles, exact, split-K, single-buffered, matrix-vector), accumulating into f16", async () => {
  // (M, N, K): matrix-vector in both layouts (K % 8 == 0: also 8 packed halves per weight load); tiled
  // with K long enough for 3 splits; whole tiles (the "exact" kernel). One pipeline per dtype combination
  // costs 0.3-1 s to compile on a CPU device, so each variant runs the shapes it applies to.
  await withF16Loads(false, (label) => checkF16Variants([3, 36, 24], [33, 65, 36], [128, 128, 24], label));
});

/** f16 x and out in row ranges, and an f16 weight in row ranges, with K input features. */
async function checkF16RowRanges(K: number, label: string): Promise<void> {
  const g = await gpu();
  if (!g.hasF16) return;
  const rng = new Rng(20);
  // a weight in row ranges (an LM head) of at most 100 rows: each range writes its column slice (K = 36,
  // rows of 72 bytes, a 256-byte offset alignment: ranges of 96 rows, 96, 96, 96, 12)
  const N = 300;
  const w = uploadF16(g, rng.randn(N * K, 0.5), [N, K]);
  const ranges = splitRows(g, w.tensor, K * 2 * 100);
  assert.ok(ranges.length >= 3);
  for (const M of [3, 33]) { // matrix-vector and tiled
    const x = uploadF16(g, rng.randn(M * K), [M, K]);
    const b = rng.randn(N);
    for (const ot of ["f32", "f16"] as const) {
      const out = poisoned(g, [M, N], ot);
      await run(g, out, (rec) => {
        for (const { rowStart, tensor } of ranges) {
          const bias = upload(g, b.subarray(rowStart, rowStart + tensor.shape[0]!));
          linearForward(rec, out, x.tensor, tensor, bias, { outColOffset: rowStart, ldOut: N });
        }
      });
      assertClose(
        await read(g, out),
        linearForwardRef(x.values, w.values, b, M, N, K),
        tolOf(ot),
        `${label}weight ranges M=${M} out ${ot}`,
      );
    }
  }
  // x and out in row ranges of 64 rows, as splitRows makes them: views at byte offsets 64 * 2K and
  // 64 * 48 (multiples of 256)
  const [M, N2] = [70, 24];
  const x = uploadF16(g, rng.randn(M * K), [M, K]);
  const w2 = uploadF16(g, rng.randn(N2 * K, 0.5), [N2, K]);
  const out = poisoned(g, [M, N2], "f16");
  const view = (t: Tensor, r0: number, r1: number, cols: number) =>
    new Tensor(t.buffer, [r1 - r0, cols], "f16", t.offset + r0 * cols * 2, `${t.label}[${r0}:${r1}]`);
  await run(g, out, (rec) => {
    for (const [r0, r1] of [[0, 64], [64, M]] as const) {
      linearForward(rec, view(out, r0, r1, N2), view(x.tensor, r0, r1, K), w2.tensor, null);
    }
  });
  assertClose(
    await downloadF16(g, out),
    linearForwardRef(x.values, w2.values, null, M, N2, K),
    TOL_F16_OUT,
    `${label}x and out row ranges`,
  );
}

Deno.test("f16 x and out in row ranges (splitRows): f16 views at byte offsets, weight ranges writing column slices", async () => {
  await withF16Loads(false, (label) => checkF16RowRanges(36, label));
});

/**
 * Runs `body` with packed f16 loads (8 halves per 16-byte load, the default) at K step 16 and at 8, or
 * with them off (vec4<f16> loads), restoring the default after; `body` gets a label for its messages.
 */
async function withF16Loads(packed: boolean, body: (label: string) => Promise<void>): Promise<void> {
  try {
    for (const k of packed ? [16, 8] as const : [null]) {
      matmulTuning.f16Packed = packed;
      matmulTuning.f16PackedK = k;
      await body(packed ? `packed K step ${k} ` : "vec4<f16> loads ");
    }
  } finally {
    matmulTuning.f16Packed = null;
    matmulTuning.f16PackedK = null;
  }
}

// Packed f16 loads (matmulTuning.f16Packed) apply where the f16 operand's contiguous dimension is a
// multiple of 8: K for x and an "nk" weight, N for a "kn" weight. Each shape list mixes sizes that pack
// (K 40, 64, 520, 136 = 8 * 17, a tail of 8 past the last step of 16; N 72, 128) with sizes that fall
// back to vec4<f16> or scalar loads (N 33, 130, K 33), so that every product checks one or both; the
// shapes that pack nothing are left to the tests above (each pipeline costs a compile on a CPU device).

Deno.test("packed f16 loads: f16 weights give the f32 result of the f16-rounded weights in all four products", async () => {
  await withF16Loads(true, (label) =>
    checkF16Weights(
      [[3, 33, 64], [2, 12, 520], [7, 130, 33], [128, 128, 24], [33, 72, 40], [130, 64, 136]],
      label,
    ));
});

Deno.test("packed f16 loads: x and out f16 or f32 independently, with f32 or f16 weights and bias", async () => {
  await withF16Loads(
    true,
    (label) => checkActivationKinds([[33, 16, 24], [9, 40, 64], [66, 72, 136]], label),
  );
});

Deno.test("packed f16 loads: f16 x and f16 out through every kernel variant, accumulating into f16", async () => {
  await withF16Loads(true, (label) => checkF16Variants([3, 40, 24], [33, 72, 40], [128, 128, 32], label));
});

Deno.test("packed f16 loads: f16 x and out in row ranges, weight ranges writing column slices", async () => {
  await withF16Loads(true, (label) => checkF16RowRanges(40, label));
});

Deno.test("activations may be f32 or f16, gradients only f32; f16 on a GPU without shader-f16 is refused", async () => {
  const g = await gpu();
  const rec = new Recorder(g);
  const t = (shape: number[], dtype: "f32" | "f16" | "i32" = "f32") => createTensor(g, shape, dtype, "t");
  const refuses = (f: () => void, re: RegExp) =>
    assert.throws(f, (e: unknown) => e instanceof GpuError && re.test(e.message));
  refuses(() => linearForward(rec, t([3, 4]), t([3, 6], "i32"), t([4, 6]), null), /x: t must be f32 or f16/);
  refuses(
    () => conv1dForward(rec, t([3, 4], "i32"), t([3, 6]), t([6, 4]), null),
    /out: t must be f32 or f16/,
  );
  refuses(() => linearBackwardInput(rec, t([3, 6]), t([3, 4], "f16"), t([4, 6])), /gradient t must be f32/);
  refuses(() => linearBackwardInput(rec, t([3, 6], "f16"), t([3, 4]), t([4, 6])), /gradient t must be f32/);
  refuses(() => conv1dBackwardInput(rec, t([3, 6]), t([3, 4], "f16"), t([6, 4])), /gradient t must be f32/);
  const noF16 = new Recorder({ ...g, hasF16: false });
  refuses(() => linearForward(noF16, t([3, 4]), t([3, 6], "f16"), t([4, 6]), null), /lacks shader-f16/);
  refuses(() => conv1dForward(noF16, t([3, 4], "f16"), t([3, 6]), t([6, 4]), null), /lacks shader-f16/);
  assert.equal(rec.ops.length, 0);
});

for (const [C, narrowTall] of [[40, true], [192, true], [192, false]] as const) {
  const rule = narrowTall ? "" : ", narrowTall off";
  Deno.test(`linearBackwardInput over a very long reduction (the LM head's dHidden, K = V = 17000, N = ${C}${rule}) splits K and matches float64`, async () => {
    const g = await gpu();
    const rng = new Rng(77 + C);
    // dy (M, V) with a padded row stride, w (V, C): M = 130 rows > 128 and few output tiles, so the planner
    // splits the V = 17000 reduction into 16 chunks and sums the partials (N = 192: 128x64-8x8 tiles, or
    // 64x64 ones with narrowTall off)
    const M = 130, V = 17000, ld = 17004;
    const dy = rng.randn(M * ld), w = rng.randn(V * C, 0.1);
    const dx = poisoned(g, [M, C]);
    const rec = new Recorder(g);
    matmulTuning.narrowTall = narrowTall;
    try {
      linearBackwardInput(rec, dx, upload(g, dy, [M, ld]), upload(g, w, [V, C]), { ldDy: ld });
    } finally {
      matmulTuning.narrowTall = true;
    }
    const ops = rec.take();
    const labels = ops.map((op) => op.label);
    runOps(g, ops);
    const packed = new Float32Array(M * V);
    for (let m = 0; m < M; m++) packed.set(dy.subarray(m * ld, m * ld + V), m * V);
    assertClose(await download(g, dx), linearBackwardInputRef(packed, w, M, V, C), 1e-5, "dx");
    assert.ok(labels.some((l) => l.startsWith("matmul_splitk_reduce")), `split-K expected, got ${labels}`);
    if (C === 192) {
      const tile = narrowTall ? "tile=128x64-8x8|" : "tile=64x64|";
      assert.ok(labels.some((l) => l.includes(tile)), `${tile} expected, got ${labels}`);
    }
  });
}

Deno.test("the planner takes 128x64-8x8 tiles from 1.8 waves of them (SmolLM2's stacked q/k/v), and split over K below", async () => {
  const g = await gpu();
  /** The tile and the split (1 when no reduction follows) the planner gives a (2048, N, K) Linear forward. */
  const planOf = (N: number, K: number) => {
    const rec = new Recorder(g);
    const x = createTensor(g, [2048, K], "f32", "x"), w = createTensor(g, [N, K], "f32", "w");
    const out = createTensor(g, [2048, N], "f32", "out");
    linearForward(rec, out, x, w, null);
    const ops = rec.take();
    for (const t of [x, w, out]) t.buffer.destroy();
    const op = ops[0]!;
    const [tile, bm, bn] = op.label.match(/tile=(\d+)x(\d+)/) ?? [];
    assert.ok(op.kind === "dispatch" && tile, op.label);
    // the workgroups are the output tiles times the split (a reduction follows when it is over 1)
    const split = op.groups[0] * op.groups[1] * op.groups[2] / (Math.ceil(2048 / +bm!) * Math.ceil(N / +bn!));
    assert.equal(ops.some((o) => o.label.startsWith("matmul_splitk_reduce")), split > 1, op.label);
    return `${op.label.match(/tile=([0-9x-]+)/)?.[1]}/${split}`;
  };
  assert.equal(planOf(960, 576), "128x64-8x8/1"); // 240 tiles of 128x64: 1.8 waves
  // 144 tiles of 128x64 with K in 4 (SmolLM2 q/o), 6 (down) and 8 (a K of 3072)
  assert.equal(planOf(576, 576), "128x64-8x8/4");
  assert.equal(planOf(576, 1536), "128x64-8x8/6");
  assert.equal(planOf(576, 3072), "128x64-8x8/8");
  assert.equal(planOf(768, 768), "64x64-8x8/1"); // 192 tiles of 128x64: the 384 of 64x64 instead
  matmulTuning.splitTall = false;
  try {
    assert.equal(planOf(576, 576), "64x64-8x8/3");
  } finally {
    matmulTuning.splitTall = true;
  }
  matmulTuning.tallTiles = false;
  try {
    assert.equal(planOf(960, 576), "64x64-8x8/1");
  } finally {
    matmulTuning.tallTiles = true;
  }
});

Deno.test("the planner takes 128x128-16x8 tiles for big f32 Linear forwards only", async () => {
  const g = await gpu();
  const tileOf = (M: number, N: number, K: number, op: "forward" | "dx", wt: "f32" | "f16" = "f32") => {
    const rec = new Recorder(g);
    const x = createTensor(g, [M, op === "forward" ? K : N], "f32", "x");
    const w = createTensor(g, [N, K], wt, "w");
    const out = createTensor(g, [M, op === "forward" ? N : K], "f32", "out");
    if (op === "forward") linearForward(rec, out, x, w, null);
    else linearBackwardInput(rec, out, x, w);
    const label = rec.take()[0]!.label;
    for (const t of [x, w, out]) t.buffer.destroy();
    return label.match(/tile=([0-9x-]+)/)?.[1];
  };
  assert.equal(tileOf(2048, 5632, 2048, "forward"), "128x128-16x8"); // TinyLlama gate_proj
  assert.equal(tileOf(2048, 2048, 2048, "dx"), "128x128"); // its q_proj input gradient
  if (g.hasF16) assert.equal(tileOf(2048, 5632, 2048, "forward", "f16"), "128x128");
  matmulTuning.tallThreads = false;
  try {
    assert.equal(tileOf(2048, 5632, 2048, "forward"), "128x128");
  } finally {
    matmulTuning.tallThreads = true;
  }
});
