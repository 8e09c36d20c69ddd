import assert from "node:assert/strict";
import { type DecodeAttentionAdapter, decodeAttentionForward } from "../../kernels/decode_attention.ts";
import { attentionForward, type AttentionOptions } from "../../kernels/attention.ts";
import { adapterAttentionForward, type GateKind } from "../../kernels/adapter_attention.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import type { Gpu } from "../../src/gpu/device.ts";
import { GpuError } from "../../src/errors.ts";
import { f16ArrayToF32, f32ArrayToF16 } from "../../src/io/dtype.ts";
import type { Tensor } from "../../src/gpu/tensor.ts";
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
import { attentionForwardRef, type RefAttentionOptions } from "../reference/attention.ts";
import { adapterAttentionForwardRef } from "../reference/adapter_attention.ts";

// f32 kernel against the float64 references: ≤ 1e-5 normwise, as the attention forward tests.
const TOL = 1e-5;
// f16 activations: the references use the f16-rounded inputs, so f32 results keep TOL; an f16 out or into
// is the f32 result rounded once (2^-11 relative per element), so ≤ 2e-3 normwise.
const F16_OUT_TOL = 2e-3;

type ElemType = "f32" | "f16";
/** Element types of the activation tensors (the adapter's ka, va, gate are always f32). */
interface Dtypes {
  q: ElemType;
  k: ElemType;
  v: ElemType;
  out: ElemType;
  into: ElemType;
}
const F32: Dtypes = { q: "f32", k: "f32", v: "f32", out: "f32", into: "f32" };

function uploadAs(g: Gpu, data: Float32Array, t: ElemType, shape?: readonly number[]): Tensor {
  return t === "f16" ? uploadF16(g, data, shape).tensor : upload(g, data, shape);
}

function readAs(g: Gpu, t: Tensor): Promise<Float32Array> {
  return t.dtype === "f16" ? downloadF16(g, t) : download(g, t);
}

interface AdapterCase {
  L: number;
  gateKind: GateKind;
  /** Add the adapter output into a separate (B, H*D) tensor instead of `out`. */
  into: boolean;
}

interface Case {
  B: number;
  H: number;
  Hkv: number;
  D: number;
  /** keyLen. */
  S: number;
  kvStride?: number;
  queryOffset?: number;
  window?: number;
  /** Default true. */
  causal?: boolean;
  /** Random zeros in the padding mask (probability 0.3); null = no mask. */
  mask?: boolean;
  /** A batch row whose mask hides every key. */
  maskedRow?: number;
  /** NaN in k and v wherever a key is hidden (masked, after the query, past keyLen): it must not leak. */
  nanHidden?: boolean;
  adapter?: AdapterCase | null;
}

function refOptions(c: Case): RefAttentionOptions {
  const o: RefAttentionOptions = {
    numHeads: c.H,
    numKvHeads: c.Hkv,
    headDim: c.D,
    batch: c.B,
    queryLen: 1,
    keyLen: c.S,
    kvStride: c.kvStride ?? c.S,
    scale: 1 / Math.sqrt(c.D),
    causal: c.causal ?? true,
  };
  if (c.queryOffset !== undefined) o.queryOffset = c.queryOffset;
  if (c.window !== undefined) o.slidingWindow = c.window;
  return o;
}

function attnOptions(c: Case): AttentionOptions {
  return { ...refOptions(c) };
}

/** Adapter scale differs from the main scale so that mixing them up fails. */
function adapterScale(c: Case): number {
  return 0.9 / Math.sqrt(c.D);
}

function inputs(c: Case, seed: number) {
  const rng = new Rng(seed);
  const stride = c.kvStride ?? c.S;
  const n = c.B * c.H * c.D;
  const q = rng.randn(n);
  const k = rng.randn(c.B * stride * c.Hkv * c.D);
  const v = rng.randn(k.length);
  let mask: Int32Array | null = null;
  if (c.mask) {
    mask = new Int32Array(c.B * stride);
    for (let i = 0; i < mask.length; i++) {
      const b = Math.floor(i / stride);
      mask[i] = b === c.maskedRow || rng.next() < 0.3 ? 0 : 1;
    }
  }
  if (c.nanHidden) {
    const qOff = c.queryOffset ?? c.S - 1;
    const row = c.Hkv * c.D;
    for (let b = 0; b < c.B; b++) {
      for (let j = 0; j < stride; j++) {
        if (j < c.S && j <= qOff && (!mask || mask[b * stride + j] !== 0)) continue;
        k.fill(NaN, (b * stride + j) * row, (b * stride + j + 1) * row);
        v.fill(NaN, (b * stride + j) * row, (b * stride + j + 1) * row);
      }
    }
  }
  const L = c.adapter?.L ?? 1;
  const ka = rng.randn(L * c.Hkv * c.D);
  const va = rng.randn(ka.length);
  const gate = rng.randn(c.adapter?.gateKind === "scalar" ? 1 : c.H, 0.8);
  const prior = rng.randn(n);
  return { q, k, v, mask, ka, va, gate, prior };
}

type Inputs = ReturnType<typeof inputs>;

/** Expected `out` and `into` from the float64 references. */
function expected(c: Case, x: Inputs): { out: Float64Array; into: Float64Array | null } {
  const main = attentionForwardRef(x.q, x.k, x.v, x.mask, refOptions(c)).out;
  const a = c.adapter;
  if (!a) return { out: main, into: null };
  const ad = adapterAttentionForwardRef(x.q, x.ka, x.va, x.gate, {
    numHeads: c.H,
    numKvHeads: c.Hkv,
    headDim: c.D,
    adapterLen: a.L,
    rows: c.B,
    scale: adapterScale(c),
    gateKind: a.gateKind,
  });
  if (a.into) return { out: main, into: ad.map((val, i) => val + x.prior[i]!) };
  return { out: main.map((val, i) => val + ad[i]!), into: null };
}

/** Runs the kernel on `x` (activations of the types `dt`); returns `out` and `into` (when the case has one). */
async function run(
  g: Gpu,
  c: Case,
  x: Inputs,
  gateOverride?: Float32Array,
  recGpu: Gpu = g,
  dt: Dtypes = F32,
): Promise<{ out: Float32Array; into: Float32Array | null; dispatches: number }> {
  const out = poisoned(g, [c.B, 1, c.H, c.D], dt.out);
  const a = c.adapter;
  const into = a?.into ? uploadAs(g, x.prior, dt.into, [c.B, c.H * c.D]) : null;
  const adapter: DecodeAttentionAdapter | null = a
    ? {
      ka: upload(g, x.ka),
      va: upload(g, x.va),
      gate: upload(g, gateOverride ?? x.gate),
      adapterLen: a.L,
      scale: adapterScale(c),
      gateKind: a.gateKind,
      into,
    }
    : null;
  const rec = new Recorder(recGpu);
  const mask = x.mask ? upload(g, x.mask) : null;
  decodeAttentionForward(
    rec,
    out,
    uploadAs(g, x.q, dt.q),
    uploadAs(g, x.k, dt.k),
    uploadAs(g, x.v, dt.v),
    mask,
    attnOptions(c),
    adapter,
  );
  const dispatches = rec.ops.length;
  rec.submit();
  return { out: await readAs(g, out), into: into ? await readAs(g, into) : null, dispatches };
}

async function check(c: Case, seed: number): Promise<void> {
  const g = await gpu();
  const x = inputs(c, seed);
  const want = expected(c, x);
  const got = await run(g, c, x);
  assert.equal(got.dispatches, 1);
  assert.ok(got.out.every(Number.isFinite), "out has a non-finite value");
  assertClose(got.out, want.out, TOL, "out");
  if (want.into) assertClose(got.into!, want.into, TOL, "into");
  if (c.maskedRow !== undefined && !(c.adapter && !c.adapter.into)) {
    const row = got.out.subarray(c.maskedRow * c.H * c.D, (c.maskedRow + 1) * c.H * c.D);
    assert.ok(row.every((val) => val === 0), "a row whose keys are all masked must be exactly 0");
  }
}

const CASES: Record<string, Case> = {
  "B=1, H=Hkv=4, D=64, keyLen 1, no mask, no adapter": { B: 1, H: 4, Hkv: 4, D: 64, S: 1 },
  "B=3, GQA 8/2, D=16, keyLen 33 of kvStride 40, mask with a fully masked row, scalar gate L=10": {
    B: 3,
    H: 8,
    Hkv: 2,
    D: 16,
    S: 33,
    kvStride: 40,
    mask: true,
    maskedRow: 1,
    adapter: { L: 10, gateKind: "scalar", into: false },
  },
  "B=3, GQA 9/3, odd D=7, keyLen 130 of kvStride 137, mask, per-head-tanh L=64 into a tensor": {
    B: 3,
    H: 9,
    Hkv: 3,
    D: 7,
    S: 130,
    kvStride: 137,
    mask: true,
    maskedRow: 2,
    adapter: { L: 64, gateKind: "per-head-tanh", into: true },
  },
  "B=3, GQA 9/3, D=12, keyLen 33, per-head gate L=1": {
    B: 3,
    H: 9,
    Hkv: 3,
    D: 12,
    S: 33,
    adapter: { L: 1, gateKind: "per-head", into: false },
  },
  "B=1, H=2/Hkv=1, D=7, keyLen 1100 (two chunks), mask, per-head L=10": {
    B: 1,
    H: 2,
    Hkv: 1,
    D: 7,
    S: 1100,
    kvStride: 1103,
    mask: true,
    adapter: { L: 10, gateKind: "per-head", into: false },
  },
  "B=1, H=Hkv=1, D=64, keyLen 1100, sliding window 1050 (chunks start mid-cache), scalar L=64 into": {
    B: 1,
    H: 1,
    Hkv: 1,
    D: 64,
    S: 1100,
    window: 1050,
    adapter: { L: 64, gateKind: "scalar", into: true },
  },
  "B=3, H=Hkv=4, D=64, keyLen 130, sliding window 100, mask, per-head L=10 into a tensor": {
    B: 3,
    H: 4,
    Hkv: 4,
    D: 64,
    S: 130,
    kvStride: 131,
    window: 100,
    mask: true,
    adapter: { L: 10, gateKind: "per-head", into: true },
  },
  "causality hides keys: queryOffset 40 of keyLen 130 of kvStride 133, GQA 8/2, D=16, B=3, mask, NaN in every hidden key, scalar L=10":
    {
      B: 3,
      H: 8,
      Hkv: 2,
      D: 16,
      S: 130,
      kvStride: 133,
      queryOffset: 40,
      nanHidden: true,
      mask: true,
      maskedRow: 0,
      adapter: { L: 10, gateKind: "scalar", into: false },
    },
  "queryOffset 20 of keyLen 33 with sliding window 7, D=12, GQA 9/3, fully masked row, no adapter": {
    B: 3,
    H: 9,
    Hkv: 3,
    D: 12,
    S: 33,
    kvStride: 36,
    queryOffset: 20,
    window: 7,
    mask: true,
    maskedRow: 2,
  },
  "keyLen 1 with a mask (some rows see no key), B=3, GQA 8/2, D=16, per-head-tanh L=64": {
    B: 3,
    H: 8,
    Hkv: 2,
    D: 16,
    S: 1,
    kvStride: 4,
    mask: true,
    maskedRow: 1,
    adapter: { L: 64, gateKind: "per-head-tanh", into: false },
  },
  "non-causal with a window: keys after the query are visible, D=16, B=1, H=4/Hkv=2": {
    B: 1,
    H: 4,
    Hkv: 2,
    D: 16,
    S: 70,
    causal: false,
    queryOffset: 30,
    window: 12,
    adapter: { L: 10, gateKind: "scalar", into: true },
  },
  "no visible key at all (non-causal, window behind the cache): main 0 plus the adapter": {
    B: 3,
    H: 4,
    Hkv: 4,
    D: 16,
    S: 20,
    causal: false,
    queryOffset: 40,
    window: 5,
    adapter: { L: 10, gateKind: "per-head", into: false },
  },
  "D=132 (33 vec4 columns, 7 key groups), B=1, H=2/Hkv=1, keyLen 70, scalar L=10": {
    B: 1,
    H: 2,
    Hkv: 1,
    D: 132,
    S: 70,
    adapter: { L: 10, gateKind: "scalar", into: false },
  },
  "D=516 (one key group), B=1, H=Hkv=1, keyLen 9, mask, per-head L=64 into a tensor": {
    B: 1,
    H: 1,
    Hkv: 1,
    D: 516,
    S: 9,
    mask: true,
    adapter: { L: 64, gateKind: "per-head", into: true },
  },
};

let seed = 300;
for (const [name, c] of Object.entries(CASES)) {
  const s = seed++;
  Deno.test(`decodeAttentionForward matches attention + adapter references: ${name}`, () => check(c, s));
}

Deno.test("decodeAttentionForward with a zero gate gives exactly the plain attention (every gate kind)", async () => {
  const g = await gpu();
  const base: Case = { B: 3, H: 8, Hkv: 2, D: 16, S: 33, kvStride: 40, mask: true, maskedRow: 1 };
  const x = inputs({ ...base, adapter: { L: 10, gateKind: "per-head", into: false } }, 7);
  const plain = await run(g, base, x);
  for (const gateKind of ["scalar", "per-head", "per-head-tanh"] as const) {
    for (const into of [false, true]) {
      const c: Case = { ...base, adapter: { L: 10, gateKind, into } };
      const zeros = new Float32Array(gateKind === "scalar" ? 1 : c.H);
      const got = await run(g, c, x, zeros);
      assert.deepEqual(got.out, plain.out, `${gateKind}, into=${into}: out`);
      if (into) assert.deepEqual(got.into, x.prior, `${gateKind}: into must be unchanged`);
    }
  }
});

Deno.test("decodeAttentionForward agrees with attentionForward (T=1) + adapterAttentionForward on the GPU", async () => {
  const g = await gpu();
  const c: Case = {
    B: 3,
    H: 9,
    Hkv: 3,
    D: 64,
    S: 130,
    kvStride: 140,
    queryOffset: 100,
    window: 60,
    mask: true,
    maskedRow: 2,
    adapter: { L: 10, gateKind: "per-head-tanh", into: false },
  };
  const x = inputs(c, 8);
  const fused = await run(g, c, x);
  const out = poisoned(g, [c.B, 1, c.H, c.D]);
  const q = upload(g, x.q);
  const rec = new Recorder(g);
  attentionForward(rec, out, null, q, upload(g, x.k), upload(g, x.v), upload(g, x.mask!), attnOptions(c));
  adapterAttentionForward(rec, out, q, upload(g, x.ka), upload(g, x.va), upload(g, x.gate), {
    numHeads: c.H,
    numKvHeads: c.Hkv,
    headDim: c.D,
    adapterLen: 10,
    rows: c.B,
    scale: adapterScale(c),
    gateKind: "per-head-tanh",
    accumulate: true,
  });
  rec.submit();
  assertClose(fused.out, await download(g, out), 1e-6, "fused vs three dispatches");
});

Deno.test("decodeAttentionForward with `into` on a device of 8 storage buffers per stage falls back to two dispatches", async () => {
  const g = await gpu();
  const small = withStorageBufferLimit(g, 8);
  const c: Case = {
    B: 3,
    H: 8,
    Hkv: 2,
    D: 16,
    S: 33,
    mask: true,
    adapter: { L: 10, gateKind: "per-head", into: true },
  };
  const x = inputs(c, 9);
  const want = expected(c, x);
  const got = await run(g, c, x, undefined, small);
  assert.equal(got.dispatches, 2);
  assert.equal((await run(g, c, x)).dispatches, 1);
  assertClose(got.out, want.out, TOL, "out");
  assertClose(got.into!, want.into!, TOL, "into");
});

/** The inputs as the kernel sees them: each f16 activation rounded to f16 (exact in f32). */
function rounded(x: Inputs, dt: Dtypes): Inputs {
  const r = (a: Float32Array, t: ElemType) => (t === "f16" ? f16ArrayToF32(f32ArrayToF16(a)) : a);
  return { ...x, q: r(x.q, dt.q), k: r(x.k, dt.k), v: r(x.v, dt.v), prior: r(x.prior, dt.into) };
}

async function checkF16(c: Case, seed: number, dt: Dtypes, recGpu?: Gpu): Promise<number> {
  const g = await gpu();
  const x = rounded(inputs(c, seed), dt);
  const want = expected(c, x);
  const got = await run(g, c, x, undefined, recGpu ?? g, dt);
  assert.ok(got.out.every(Number.isFinite), "out has a non-finite value (an unwritten f16 NaN?)");
  assertClose(got.out, want.out, dt.out === "f16" ? F16_OUT_TOL : TOL, `out (${dt.out})`);
  if (want.into) {
    assertClose(got.into!, want.into, dt.into === "f16" ? F16_OUT_TOL : TOL, `into (${dt.into})`);
  }
  if (c.maskedRow !== undefined && !(c.adapter && !c.adapter.into)) {
    const row = got.out.subarray(c.maskedRow * c.H * c.D, (c.maskedRow + 1) * c.H * c.D);
    assert.ok(row.every((val) => val === 0), "a row whose keys are all masked must be exactly 0");
  }
  return got.dispatches;
}

const ALL_F16: Dtypes = { q: "f16", k: "f16", v: "f16", out: "f16", into: "f16" };

const F16_CASES: [string, Case, Dtypes][] = [
  [
    "f16 q, cache, out and into (gpt2): B=3, GQA 9/3, odd D=7, keyLen 33 of kvStride 37, mask, per-head-tanh L=10",
    {
      B: 3,
      H: 9,
      Hkv: 3,
      D: 7,
      S: 33,
      kvStride: 37,
      mask: true,
      maskedRow: 2,
      adapter: { L: 10, gateKind: "per-head-tanh", into: true },
    },
    ALL_F16,
  ],
  [
    "f16 q, cache and out (llama, vec4<f16> rows): B=3, GQA 8/2, D=16, keyLen 33 of 40, mask, scalar L=10",
    {
      B: 3,
      H: 8,
      Hkv: 2,
      D: 16,
      S: 33,
      kvStride: 40,
      mask: true,
      maskedRow: 1,
      adapter: { L: 10, gateKind: "scalar", into: false },
    },
    ALL_F16,
  ],
  [
    "f16 cache with f32 q and out, f16 into: B=1, H=4/Hkv=2, D=12, keyLen 70, window 12, per-head L=1",
    { B: 1, H: 4, Hkv: 2, D: 12, S: 70, window: 12, adapter: { L: 1, gateKind: "per-head", into: true } },
    { q: "f32", k: "f16", v: "f16", out: "f32", into: "f16" },
  ],
  [
    "f16 q and out with an f32 cache, f32 into: B=2, H=Hkv=2, D=64, keyLen 7, per-head L=3",
    { B: 2, H: 2, Hkv: 2, D: 64, S: 7, adapter: { L: 3, gateKind: "per-head", into: true } },
    { q: "f16", k: "f32", v: "f32", out: "f16", into: "f32" },
  ],
  [
    "an f16 q of one vec4 (8 bytes), no adapter, no mask: B=1, H=Hkv=1, D=4, keyLen 5",
    { B: 1, H: 1, Hkv: 1, D: 4, S: 5 },
    ALL_F16,
  ],
];

let f16Seed = 400;
for (const [name, c, dt] of F16_CASES) {
  const s = f16Seed++;
  Deno.test(`decodeAttentionForward with f16 activations matches the references on the rounded inputs: ${name}`, async () => {
    assert.equal(await checkF16(c, s, dt), 1);
  });
}

Deno.test("decodeAttentionForward with an f16 `into` on a device of 8 storage buffers per stage: two dispatches, same result", async () => {
  const g = await gpu();
  const small = withStorageBufferLimit(g, 8);
  const c: Case = {
    B: 3,
    H: 8,
    Hkv: 2,
    D: 16,
    S: 33,
    mask: true,
    adapter: { L: 10, gateKind: "per-head", into: true },
  };
  assert.equal(await checkF16(c, 410, ALL_F16, small), 2);
});

Deno.test("decodeAttentionForward rejects bad arguments with GpuError", async () => {
  const g = await gpu();
  const c: Case = { B: 1, H: 4, Hkv: 2, D: 8, S: 5 };
  const t = (n: number) => upload(g, new Float32Array(n).fill(1));
  const q = t(32), k = t(80), v = t(80), out = t(32);
  const rec = new Recorder(g);
  const adapter = (over: Partial<DecodeAttentionAdapter>): DecodeAttentionAdapter => ({
    ka: t(16),
    va: t(16),
    gate: t(4),
    adapterLen: 1,
    scale: 0.3,
    gateKind: "per-head",
    into: null,
    ...over,
  });
  const bad: [string, () => void, RegExp][] = [
    [
      "queryLen 2",
      () => decodeAttentionForward(rec, out, q, k, v, null, { ...attnOptions(c), queryLen: 2 }, null),
      /queryLen/,
    ],
    [
      "H % Hkv",
      () => decodeAttentionForward(rec, out, q, k, v, null, { ...attnOptions(c), numKvHeads: 3 }, null),
      /numKvHeads/,
    ],
    ["k too small", () => decodeAttentionForward(rec, out, q, t(79), v, null, attnOptions(c), null), /k \[/],
    [
      "kvStride < keyLen",
      () => decodeAttentionForward(rec, out, q, k, v, null, { ...attnOptions(c), kvStride: 4 }, null),
      /kvStride/,
    ],
    [
      "adapterLen 65",
      () => decodeAttentionForward(rec, out, q, k, v, null, attnOptions(c), adapter({ adapterLen: 65 })),
      /adapterLen/,
    ],
    [
      "per-head gate of 1",
      () => decodeAttentionForward(rec, out, q, k, v, null, attnOptions(c), adapter({ gate: t(1) })),
      /gate/,
    ],
    [
      "into too small",
      () => decodeAttentionForward(rec, out, q, k, v, null, attnOptions(c), adapter({ into: t(31) })),
      /into/,
    ],
    [
      "into = out",
      () => decodeAttentionForward(rec, out, q, k, v, null, attnOptions(c), adapter({ into: out })),
      /overlaps/,
    ],
  ];
  for (const [what, f, msg] of bad) {
    assert.throws(f, (e: unknown) => e instanceof GpuError && msg.test(e.message), what);
  }
  assert.equal(rec.ops.length, 0);
});
