import assert from "node:assert/strict";
import {
  attentionBackward,
  attentionBackwardPlan,
  attentionForward,
  type AttentionOptions,
  attentionScoresScratch,
  attentionTuning,
  type DkdvTile,
  dkdvTileBytes,
  dkdvTileFor,
} from "../../kernels/attention.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { GpuError } from "../../src/errors.ts";
import type { Gpu } from "../../src/gpu/device.ts";
import type { Tensor } from "../../src/gpu/tensor.ts";
import { assertClose, download, downloadF16, gpu, poisoned, Rng, upload, uploadF16 } from "../_util.ts";
import {
  attentionBackwardRef,
  attentionForwardRef,
  type RefAttentionOptions,
} from "../reference/attention.ts";
import { adapterAttentionForwardRef } from "../reference/adapter_attention.ts";
import type { GateKind } from "../../kernels/adapter_attention.ts";

// f32 kernels against a float64 reference: forward ≤ 1e-5 (normwise), gradients ≤ 1e-4 (they sum
// products of recomputed probabilities over up to T·H/Hkv terms).
const FWD_TOL = 1e-5;
const BWD_TOL = 1e-4;
// f16 activations: the references use the f16-rounded inputs, so f32 results keep the tolerances above; an
// f16 out is the f32 result rounded once (2^-11 relative per element), so ≤ 2e-3 normwise.
const F16_OUT_TOL = 2e-3;
// dq and dk from an f16 saved out: Di = rowsum(dout·out) uses out rounded to f16 (2^-11 relative per
// element) while the reference uses the exact out; dv does not read Di and keeps BWD_TOL.
const F16_SAVED_OUT_TOL = 2e-3;

interface Case extends RefAttentionOptions {
  /** Left padding per batch row (number of leading masked keys), or null for no mask. */
  leftPad?: number[] | null;
}

function makeInputs(c: Case, seed: number) {
  const rng = new Rng(seed);
  const stride = c.kvStride ?? c.keyLen;
  const q = rng.randn(c.batch * c.queryLen * c.numHeads * c.headDim);
  const k = rng.randn(c.batch * stride * c.numKvHeads * c.headDim);
  const v = rng.randn(k.length);
  const dout = rng.randn(q.length);
  let mask: Int32Array | null = null;
  if (c.leftPad) {
    mask = new Int32Array(c.batch * stride);
    for (let b = 0; b < c.batch; b++) {
      for (let j = 0; j < stride; j++) mask[b * stride + j] = j >= c.leftPad[b]! ? 1 : 0;
    }
  }
  return { q, k, v, dout, mask };
}

function opts(c: Case): AttentionOptions {
  const o: AttentionOptions = {
    numHeads: c.numHeads,
    numKvHeads: c.numKvHeads,
    headDim: c.headDim,
    batch: c.batch,
    queryLen: c.queryLen,
    keyLen: c.keyLen,
    scale: c.scale,
    causal: c.causal,
  };
  if (c.kvStride !== undefined) o.kvStride = c.kvStride;
  if (c.queryOffset !== undefined) o.queryOffset = c.queryOffset;
  if (c.slidingWindow !== undefined) o.slidingWindow = c.slidingWindow;
  return o;
}

async function checkForward(c: Case, seed: number): Promise<void> {
  const g = await gpu();
  const x = makeInputs(c, seed);
  const ref = attentionForwardRef(x.q, x.k, x.v, x.mask, c);
  const out = poisoned(g, [c.batch, c.queryLen, c.numHeads, c.headDim]);
  const lse = poisoned(g, [c.batch, c.numHeads, c.queryLen]);
  const rec = new Recorder(g);
  const m = x.mask ? upload(g, x.mask) : null;
  attentionForward(rec, out, lse, upload(g, x.q), upload(g, x.k), upload(g, x.v), m, opts(c));
  rec.submit();
  const o = await download(g, out);
  assertClose(o, ref.out, FWD_TOL, "out");
  assertClose(await download(g, lse), ref.lse, FWD_TOL, "lse");
  assert.ok(o.every(Number.isFinite));
  // inference path (lse = null) gives the same output
  const out2 = poisoned(g, [c.batch, c.queryLen, c.numHeads, c.headDim]);
  attentionForward(rec, out2, null, upload(g, x.q), upload(g, x.k), upload(g, x.v), m, opts(c));
  rec.submit();
  assertClose(await download(g, out2), ref.out, FWD_TOL, "out (no lse)");
}

async function checkBackward(c: Case, seed: number, accumulate: boolean): Promise<void> {
  const g = await gpu();
  const x = makeInputs(c, seed);
  const f = attentionForwardRef(x.q, x.k, x.v, x.mask, c);
  const ref = attentionBackwardRef(x.dout, x.q, x.k, x.v, x.mask, c);
  const q = upload(g, x.q);
  const k = upload(g, x.k);
  const v = upload(g, x.v);
  const m = x.mask ? upload(g, x.mask) : null;
  const out = poisoned(g, [x.q.length]);
  const lse = poisoned(g, [c.batch * c.numHeads * c.queryLen]);
  const rng = new Rng(seed + 99);
  const base = { dq: rng.randn(x.q.length), dk: rng.randn(x.k.length), dv: rng.randn(x.k.length) };
  const dq = accumulate ? upload(g, base.dq) : poisoned(g, [x.q.length]);
  const dk = accumulate ? upload(g, base.dk) : poisoned(g, [x.k.length]);
  const dv = accumulate ? upload(g, base.dv) : poisoned(g, [x.k.length]);
  const rec = new Recorder(g);
  if (expectedDq) assert.equal(attentionBackwardPlan(rec, opts(c)).dq, expectedDq, "dq pass");
  attentionForward(rec, out, lse, q, k, v, m, opts(c));
  attentionBackward(rec, dq, dk, dv, upload(g, x.dout), out, lse, q, k, v, m, { ...opts(c), accumulate });
  poisonScoresScratch(g, rec, opts(c), dq);
  rec.submit();
  const stride = c.kvStride ?? c.keyLen;
  const validKv = c.batch * stride * c.numKvHeads * c.headDim;
  const want = (r: Float64Array, b0: Float32Array, keys: boolean) =>
    r.map((val, i) => {
      // positions ≥ keyLen of a cache are not written: they keep their old value (or NaN poison)
      if (keys && Math.floor(i / (c.numKvHeads * c.headDim)) % stride >= c.keyLen) {
        return accumulate ? b0[i]! : NaN;
      }
      return val + (accumulate ? b0[i]! : 0);
    });
  assertClose(await download(g, out), f.out, FWD_TOL, "out");
  assertClose(await download(g, dq), want(ref.dq, base.dq, false), BWD_TOL, "dq");
  const keep = (a: ArrayLike<number>) =>
    Array.from(a).filter((_, i) => Math.floor(i / (c.numKvHeads * c.headDim)) % stride < c.keyLen);
  assert.equal(want(ref.dk, base.dk, true).length, validKv);
  assertClose(keep(await download(g, dk)), keep(want(ref.dk, base.dk, true)), BWD_TOL, "dk");
  assertClose(keep(await download(g, dv)), keep(want(ref.dv, base.dv, true)), BWD_TOL, "dv");
}

const base = { scale: 0.35, causal: true };

const CASES: Record<string, Case> = {
  "causal GQA (H=4, Hkv=2), B=2, T=S=7, D=8": {
    ...base,
    numHeads: 4,
    numKvHeads: 2,
    headDim: 8,
    batch: 2,
    queryLen: 7,
    keyLen: 7,
  },
  "causal with left padding (fully masked rows give zeros), B=3, T=S=33, D=6": {
    ...base,
    numHeads: 2,
    numKvHeads: 1,
    headDim: 6,
    batch: 3,
    queryLen: 33,
    keyLen: 33,
    leftPad: [0, 5, 32],
  },
  "non-causal with a padding mask, T=S=70 (two query blocks), H=3, D=5": {
    ...base,
    causal: false,
    numHeads: 3,
    numKvHeads: 3,
    headDim: 5,
    batch: 2,
    queryLen: 70,
    keyLen: 70,
    leftPad: [3, 0],
  },
  "sliding window 5, GQA 6/2, T=S=41, D=8": {
    ...base,
    numHeads: 6,
    numKvHeads: 2,
    headDim: 8,
    batch: 1,
    queryLen: 41,
    keyLen: 41,
    slidingWindow: 5,
  },
  "sliding window 16 at T=S=130 (window smaller than the tiles, causal skip)": {
    ...base,
    numHeads: 2,
    numKvHeads: 1,
    headDim: 4,
    batch: 1,
    queryLen: 130,
    keyLen: 130,
    slidingWindow: 16,
  },
  "decode T=1 against a KV cache S=33 of Smax=40, GQA 4/1, mask": {
    ...base,
    numHeads: 4,
    numKvHeads: 1,
    headDim: 8,
    batch: 2,
    queryLen: 1,
    keyLen: 33,
    kvStride: 40,
    leftPad: [2, 0],
  },
  "chunked prefill T=3 at S=130 with a window, D=7": {
    ...base,
    numHeads: 2,
    numKvHeads: 2,
    headDim: 7,
    batch: 1,
    queryLen: 3,
    keyLen: 130,
    slidingWindow: 100,
  },
  "explicit queryOffset T=7 S=20 offset 5 (non-final chunk)": {
    ...base,
    numHeads: 2,
    numKvHeads: 1,
    headDim: 8,
    batch: 1,
    queryLen: 7,
    keyLen: 20,
    queryOffset: 5,
  },
};

/**
 * NaN into the whole dq-from-scores scratch before the recorded passes run (the write goes ahead of them on
 * the queue): the dk/dv pass writes only the visible (query, key) entries, so an entry the dq pass reads
 * without the dk/dv pass having written it shows as NaN.
 */
function poisonScoresScratch(g: Gpu, rec: Recorder, o: AttentionOptions, dq: Tensor): void {
  const scratch = attentionScoresScratch(dq);
  if (attentionBackwardPlan(rec, o).dq !== "scores" || !scratch) return;
  g.device.queue.writeBuffer(scratch.buffer, 0, new Float32Array(scratch.size).fill(NaN));
}

/**
 * The kernel families: lane kernels (the default, key blocks prefetched through registers, dq from the
 * scores the dk/dv pass writes), the same with the lane dq pass, with it and without the prefetch (and with
 * rows read and written one element at a time, `vecRows: false`), tiled kernels (dq from the scores; rows
 * one element at a time too), the first per-row kernels.
 */
type Kind =
  | "lane kernels"
  | "lane kernels, dq lane pass"
  | "lane kernels, not prefetched, scalar rows"
  | "tiled kernels, scalar rows"
  | "per-row kernels";
const KINDS: Kind[] = [
  "lane kernels",
  "lane kernels, dq lane pass",
  "lane kernels, not prefetched, scalar rows",
  "tiled kernels, scalar rows",
  "per-row kernels",
];

/** The dq pass each family must run (checked by {@link checkBackward}: never a silent fallback). */
const KIND_DQ: Record<Kind, "scores" | "lanes" | "rows"> = {
  "lane kernels": "scores",
  "lane kernels, dq lane pass": "lanes",
  "lane kernels, not prefetched, scalar rows": "lanes",
  "tiled kernels, scalar rows": "scores",
  "per-row kernels": "rows",
};
let expectedDq: "scores" | "lanes" | "rows" | null = null;

/** Runs `fn` with one kernel family (all are tested; the default is in kernels/attention.ts). */
function withKind(kind: Kind, fn: () => Promise<void>): () => Promise<void> {
  return async () => {
    const saved = { ...attentionTuning };
    attentionTuning.tiled = kind !== "per-row kernels";
    attentionTuning.lanes = kind.startsWith("lane kernels");
    attentionTuning.dqFromScores = KIND_DQ[kind] === "scores";
    expectedDq = KIND_DQ[kind];
    if (kind === "lane kernels, not prefetched, scalar rows") {
      attentionTuning.forwardShape = { ...saved.forwardShape, prefetch: false };
      attentionTuning.dqShape = { ...saved.dqShape, prefetch: false };
      attentionTuning.vecRows = false;
    }
    if (kind === "tiled kernels, scalar rows") attentionTuning.vecRows = false;
    try {
      await fn();
    } finally {
      Object.assign(attentionTuning, saved);
      expectedDq = null;
    }
  };
}

for (const kind of KINDS) {
  let seed = 10;
  for (const [name, c] of Object.entries(CASES)) {
    const s = seed++;
    Deno.test(
      `attentionForward matches the float64 reference (${kind}): ${name}`,
      withKind(kind, () => checkForward(c, s)),
    );
    Deno.test(
      `attentionBackward matches the float64 reference (${kind}): ${name}`,
      withKind(kind, () => checkBackward(c, s, false)),
    );
  }

  Deno.test(
    `attentionBackward with accumulate adds into dq, dk, dv (GQA, padding) (${kind})`,
    withKind(
      kind,
      () =>
        checkBackward({ ...CASES["causal GQA (H=4, Hkv=2), B=2, T=S=7, D=8"]!, leftPad: [2, 0] }, 77, true),
    ),
  );

  Deno.test(
    `attentionForward at D=64 (the model head size) matches the reference (${kind})`,
    withKind(kind, () =>
      checkForward({
        ...base,
        numHeads: 3,
        numKvHeads: 1,
        headDim: 64,
        batch: 1,
        queryLen: 50,
        keyLen: 50,
        leftPad: [4],
      }, 5)),
  );

  Deno.test(
    `attention forward and backward at D=64, GQA 4/2, T=S=150 (whole unmasked key blocks) (${kind})`,
    withKind(kind, async () => {
      const c: Case = {
        ...base,
        numHeads: 4,
        numKvHeads: 2,
        headDim: 64,
        batch: 1,
        queryLen: 150,
        keyLen: 150,
      };
      await checkForward(c, 8);
      await checkBackward(c, 9, false);
    }),
  );

  Deno.test(
    `attentionBackward at D=64 matches the reference (${kind})`,
    withKind(kind, () =>
      checkBackward(
        { ...base, numHeads: 3, numKvHeads: 1, headDim: 64, batch: 1, queryLen: 37, keyLen: 37 },
        6,
        false,
      )),
  );
}

// ---------------------------------------------------------------------------------------------------
// The tiled dk/dv pass at every per-thread tile and with the query block prefetched, on cases whose
// workgroup memory fits 32 KiB (lavapipe) for every tile: head sizes ≤ 32, odd ones, GQA, masks, windows,
// partial blocks and several key blocks. The model head size 64 runs the same generated code.

const DKDV_TILES: DkdvTile[] = [1, 2, 3, 4].flatMap((keys) =>
  [1, 2, 3, 4].filter((queries) => keys * queries <= 8).flatMap((queries) =>
    [false, true].map((prefetch) => ({ keys, queries, prefetch }))
  )
);
const DKDV_CASES: Record<string, Case> = {
  "causal GQA 4/2 with left padding, D=8": {
    ...CASES["causal GQA (H=4, Hkv=2), B=2, T=S=7, D=8"]!,
    leftPad: [2, 0],
  },
  "non-causal, padding mask, D=5":
    CASES["non-causal with a padding mask, T=S=70 (two query blocks), H=3, D=5"]!,
  "sliding window 16 at T=S=130, D=4":
    CASES["sliding window 16 at T=S=130 (window smaller than the tiles, causal skip)"]!,
  "chunked prefill T=3 at S=130, D=7": CASES["chunked prefill T=3 at S=130 with a window, D=7"]!,
  "GQA 4/1, T=S=150, D=32": {
    ...base,
    numHeads: 4,
    numKvHeads: 1,
    headDim: 32,
    batch: 1,
    queryLen: 150,
    keyLen: 150,
  },
};

/**
 * One step of {@link checkBackward} per case (seeds from `seed`, `check` first when given), then one with
 * accumulate on the GQA case with padding (seed `accumulateSeed`).
 */
async function backwardSteps(
  t: Deno.TestContext,
  cases: Record<string, Case>,
  seed: number,
  accumulateSeed: number,
  check?: (c: Case) => void,
): Promise<void> {
  for (const [label, c] of Object.entries(cases)) {
    check?.(c);
    const s = seed++;
    await t.step(label, () => checkBackward(c, s, false));
  }
  await t.step(
    "accumulate",
    () => checkBackward(DKDV_CASES["causal GQA 4/2 with left padding, D=8"]!, accumulateSeed, true),
  );
}

for (const tile of DKDV_TILES) {
  const name = `${tile.keys}x${tile.queries}${tile.prefetch ? " prefetched" : ""}`;
  Deno.test(`the tiled dk/dv pass matches the float64 reference with the ${name} tile`, async (t) => {
    const g = await gpu();
    const saved = { ...attentionTuning };
    attentionTuning.dkdvTiles = [tile];
    attentionTuning.lanes = false;
    try {
      await backwardSteps(t, DKDV_CASES, 300, 9, (c) => {
        // never a silent fallback to the default tile
        assert.deepEqual(dkdvTileFor(new Recorder(g), c.headDim), tile, `${name} must fit at D=${c.headDim}`);
        assert.equal(
          attentionBackwardPlan(new Recorder(g), opts(c)).dq,
          "scores",
          "ds written by every tile",
        );
      });
    } finally {
      Object.assign(attentionTuning, saved);
    }
  });
}

/** The sizes of a model-like attention: D = 64, GQA 4/2, batch 2, T = S = 150. */
const GQA_D64_T150 = { numHeads: 4, numKvHeads: 2, headDim: 64, batch: 2, queryLen: 150, keyLen: 150 };

// dq from the scores the dk/dv pass wrote, at every rows-per-thread choice (16, 32 and 64 query rows per
// workgroup): partial row and key blocks, GQA, masks, windows, a query offset, accumulate.
for (const rows of [1, 2, 4]) {
  Deno.test(`dq from the dk/dv pass's scores matches the float64 reference at ${rows} rows per thread`, async (t) => {
    const saved = { ...attentionTuning };
    attentionTuning.dqFromScores = true;
    attentionTuning.dqScoresRows = rows;
    expectedDq = "scores";
    try {
      const cases: Record<string, Case> = {
        ...DKDV_CASES,
        "explicit queryOffset T=7 S=20 offset 5":
          CASES["explicit queryOffset T=7 S=20 offset 5 (non-final chunk)"]!,
        "D=64, GQA 4/2, T=S=150, left padding": { ...base, ...GQA_D64_T150, leftPad: [3, 0] },
      };
      await backwardSteps(t, cases, 400, 19);
    } finally {
      Object.assign(attentionTuning, saved);
      expectedDq = null;
    }
  });
}

Deno.test("attentionBackwardPlan: dq from the scores while the scratch fits its budget, else the lane or per-row pass", async () => {
  const g = await gpu();
  const rec = new Recorder(g);
  const o: AttentionOptions = { ...GQA_D64_T150, scale: 0.125, causal: true };
  const saved = { ...attentionTuning };
  try {
    assert.equal(attentionBackwardPlan(rec, o).dq, "scores");
    // [lse | Di | ds] = 4 · (2·B·H·T + B·H·T·S4) bytes, ds rows padded to S4 = 152 keys (a multiple of 4)
    const bytes = 4 * (2 * 2 * 4 * 150 + 2 * 4 * 150 * 152);
    attentionTuning.scoresMaxBytes = bytes;
    assert.equal(attentionBackwardPlan(rec, o).dq, "scores");
    attentionTuning.scoresMaxBytes = bytes - 4;
    assert.equal(attentionBackwardPlan(rec, o).dq, "lanes");
    attentionTuning.lanes = false;
    assert.equal(attentionBackwardPlan(rec, o).dq, "rows");
    attentionTuning.tiled = false;
    assert.deepEqual(attentionBackwardPlan(rec, o), { dkdv: null, dq: "rows" });
  } finally {
    Object.assign(attentionTuning, saved);
  }
});

Deno.test("dkdvTileFor takes the first tile that fits the device's workgroup memory; with none the per-row kernels run", async () => {
  const g = await gpu();
  const rec = new Recorder(g);
  const limit = g.limits.maxComputeWorkgroupStorageSize;
  const saved = { ...attentionTuning };
  try {
    const big = { keys: 4, queries: 4 };
    assert.ok(dkdvTileBytes(64, big) > 65536, "the 4x4 tile at D=64 needs more than any device gives");
    attentionTuning.dkdvTiles = [big, { keys: 2, queries: 4, prefetch: true }];
    const want = dkdvTileBytes(64, { keys: 2, queries: 4 }) <= limit
      ? { keys: 2, queries: 4, prefetch: true }
      : null;
    assert.deepEqual(dkdvTileFor(rec, 64), want);
    assert.ok(dkdvTileBytes(8, big) <= 32768);
    assert.deepEqual(dkdvTileFor(rec, 8), big);
    attentionTuning.dkdvTiles = [big];
    assert.equal(dkdvTileFor(rec, 64), null);
    // no tile fits at D=64: the backward still matches the reference, through the per-row kernels
    await checkBackward(
      { ...base, numHeads: 4, numKvHeads: 2, headDim: 64, batch: 1, queryLen: 37, keyLen: 37 },
      31,
      false,
    );
  } finally {
    Object.assign(attentionTuning, saved);
  }
});

// ---------------------------------------------------------------------------------------------------
// f16 activations: q, k, v and out each f32 or f16; lse, dout and the gradients f32.

type ElemType = "f32" | "f16";
interface ActDtypes {
  q: ElemType;
  k: ElemType;
  v: ElemType;
  out: ElemType;
}
const ALL_F16: ActDtypes = { q: "f16", k: "f16", v: "f16", out: "f16" };

/** Uploads `data` as f32 or rounded to f16; `values` are what the reference must use. */
function uploadAs(g: Gpu, data: Float32Array, t: ElemType): { tensor: Tensor; values: Float32Array } {
  return t === "f16" ? uploadF16(g, data) : { tensor: upload(g, data), values: data };
}

function readAs(g: Gpu, t: Tensor): Promise<Float32Array> {
  return t.dtype === "f16" ? downloadF16(g, t) : download(g, t);
}

async function checkForwardF16(c: Case, seed: number, dt: ActDtypes): Promise<void> {
  const g = await gpu();
  const x = makeInputs(c, seed);
  const q = uploadAs(g, x.q, dt.q), k = uploadAs(g, x.k, dt.k), v = uploadAs(g, x.v, dt.v);
  const ref = attentionForwardRef(q.values, k.values, v.values, x.mask, c);
  const out = poisoned(g, [c.batch, c.queryLen, c.numHeads, c.headDim], dt.out);
  const lse = poisoned(g, [c.batch, c.numHeads, c.queryLen]);
  const m = x.mask ? upload(g, x.mask) : null;
  const rec = new Recorder(g);
  attentionForward(rec, out, lse, q.tensor, k.tensor, v.tensor, m, opts(c));
  rec.submit();
  const o = await readAs(g, out);
  assert.ok(o.every(Number.isFinite), "out has a non-finite value (an unwritten f16 NaN?)");
  assertClose(o, ref.out, dt.out === "f16" ? F16_OUT_TOL : FWD_TOL, `out (${dt.out})`);
  assertClose(await download(g, lse), ref.lse, FWD_TOL, "lse");
}

async function checkBackwardF16(c: Case, seed: number, dt: ActDtypes): Promise<void> {
  const g = await gpu();
  const x = makeInputs(c, seed);
  const q = uploadAs(g, x.q, dt.q), k = uploadAs(g, x.k, dt.k), v = uploadAs(g, x.v, dt.v);
  const ref = attentionBackwardRef(x.dout, q.values, k.values, v.values, x.mask, c);
  const m = x.mask ? upload(g, x.mask) : null;
  const out = poisoned(g, [x.q.length], dt.out);
  const lse = poisoned(g, [c.batch * c.numHeads * c.queryLen]);
  const dq = poisoned(g, [x.q.length]);
  const dk = poisoned(g, [x.k.length]);
  const dv = poisoned(g, [x.k.length]);
  const rec = new Recorder(g);
  attentionForward(rec, out, lse, q.tensor, k.tensor, v.tensor, m, opts(c));
  attentionBackward(rec, dq, dk, dv, upload(g, x.dout), out, lse, q.tensor, k.tensor, v.tensor, m, opts(c));
  rec.submit();
  const tol = dt.out === "f16" ? F16_SAVED_OUT_TOL : BWD_TOL;
  assertClose(await download(g, dq), ref.dq, tol, "dq");
  assertClose(await download(g, dk), ref.dk, tol, "dk");
  assertClose(await download(g, dv), ref.dv, BWD_TOL, "dv");
}

const F16_CASES: [string, Case, ActDtypes][] = [
  ["causal GQA 4/2, B=2, T=S=7, D=8, all f16", CASES["causal GQA (H=4, Hkv=2), B=2, T=S=7, D=8"]!, ALL_F16],
  [
    "causal, left padding with a fully masked row, B=3, T=S=33, D=6, all f16",
    CASES["causal with left padding (fully masked rows give zeros), B=3, T=S=33, D=6"]!,
    ALL_F16,
  ],
  [
    "decode T=1 against an f16 KV cache S=33 of Smax=40, GQA 4/1, mask, f16 q, f32 out",
    CASES["decode T=1 against a KV cache S=33 of Smax=40, GQA 4/1, mask"]!,
    { q: "f16", k: "f16", v: "f16", out: "f32" },
  ],
  [
    "T=S=50 (64-row query blocks), D=64, GQA 3/1, mask, f32 q/k/v, f16 out",
    { ...base, numHeads: 3, numKvHeads: 1, headDim: 64, batch: 1, queryLen: 50, keyLen: 50, leftPad: [4] },
    { q: "f32", k: "f32", v: "f32", out: "f16" },
  ],
  [
    "T=S=50 (64-row query blocks), odd D=7, GQA 2/1, sliding window 9, mask, all f16",
    {
      ...base,
      numHeads: 2,
      numKvHeads: 1,
      headDim: 7,
      batch: 2,
      queryLen: 50,
      keyLen: 50,
      slidingWindow: 9,
      leftPad: [0, 3],
    },
    ALL_F16,
  ],
];

const F16_BWD_CASES: [string, Case, ActDtypes][] = [
  [
    "GQA 4/2, B=2, T=S=7, D=8, left padding, saved q/k/v/out f16",
    { ...CASES["causal GQA (H=4, Hkv=2), B=2, T=S=7, D=8"]!, leftPad: [2, 0] },
    ALL_F16,
  ],
  [
    "H=Hkv=3, B=1, T=S=33, odd D=5, sliding window 9, saved q/k/v f16, out f32",
    { ...base, numHeads: 3, numKvHeads: 3, headDim: 5, batch: 1, queryLen: 33, keyLen: 33, slidingWindow: 9 },
    { q: "f16", k: "f16", v: "f16", out: "f32" },
  ],
];

for (const kind of KINDS) {
  let seed = 40;
  for (const [name, c, dt] of F16_CASES) {
    const s = seed++;
    Deno.test(
      `attentionForward with f16 activations matches the reference on the rounded inputs (${kind}): ${name}`,
      withKind(kind, () => checkForwardF16(c, s, dt)),
    );
  }
  for (const [name, c, dt] of F16_BWD_CASES) {
    const s = seed++;
    Deno.test(
      `attentionBackward reading f16 saved activations gives f32 gradients matching the reference (${kind}): ${name}`,
      withKind(kind, () => checkBackwardF16(c, s, dt)),
    );
  }
}

Deno.test("attention rejects f16 gradients and lse with GpuError", async () => {
  const g = await gpu();
  const c = CASES["causal GQA (H=4, Hkv=2), B=2, T=S=7, D=8"]!;
  const nq = c.batch * c.queryLen * c.numHeads * c.headDim;
  const nk = c.batch * c.keyLen * c.numKvHeads * c.headDim;
  const f = (n: number) => poisoned(g, [n]);
  const h = (n: number) => poisoned(g, [n], "f16");
  const lse = f(c.batch * c.numHeads * c.queryLen);
  const rec = new Recorder(g);
  assert.throws(
    () => attentionForward(rec, f(nq), h(lse.size), f(nq), f(nk), f(nk), null, opts(c)),
    (e: unknown) => e instanceof GpuError && /lse/.test(e.message),
  );
  assert.throws(
    () => attentionBackward(rec, h(nq), f(nk), f(nk), f(nq), f(nq), lse, f(nq), f(nk), f(nk), null, opts(c)),
    (e: unknown) => e instanceof GpuError && /dq/.test(e.message),
  );
  assert.equal(rec.ops.length, 0);
});

Deno.test("the reference attention gradient matches central finite differences", () => {
  const c: Case = {
    ...base,
    numHeads: 4,
    numKvHeads: 2,
    headDim: 3,
    batch: 2,
    queryLen: 4,
    keyLen: 5,
    slidingWindow: 3,
    leftPad: [1, 0],
  };
  const x = makeInputs(c, 3);
  const q = Float64Array.from(x.q);
  const k = Float64Array.from(x.k);
  const v = Float64Array.from(x.v);
  const loss = () => attentionForwardRef(q, k, v, x.mask, c).out.reduce((s, o, i) => s + o * x.dout[i]!, 0);
  const grad = attentionBackwardRef(x.dout, q, k, v, x.mask, c);
  const eps = 1e-6;
  for (const [name, arr, gr] of [["q", q, grad.dq], ["k", k, grad.dk], ["v", v, grad.dv]] as const) {
    const fd = new Float64Array(arr.length);
    for (let i = 0; i < arr.length; i++) {
      const x0 = arr[i]!;
      arr[i] = x0 + eps;
      const lp = loss();
      arr[i] = x0 - eps;
      const lm = loss();
      arr[i] = x0;
      fd[i] = (lp - lm) / (2 * eps);
    }
    assertClose(gr, fd, 1e-7, `d${name} vs finite differences`);
  }
});

// ---------------------------------------------------------------------------------------------------
// The adapter attention folded into the forward (the lane kernels; the other kinds and L > 16 run it as a
// second dispatch): `out` is the main attention, `adapter.out` = gate · adapter attention (+ out).

interface FusedCase {
  c: Case;
  L: number;
  gateKind: GateKind;
  withMain: boolean;
  /** Element type of q, k, v, out and the adapter output. */
  dt: ElemType;
  adapterScale: number;
}

const FUSED_CASES: [string, FusedCase][] = [
  [
    "D=64, GQA 4/2, T=S=150, L=10, per-head tanh gate, with the main output",
    {
      c: { ...base, numHeads: 4, numKvHeads: 2, headDim: 64, batch: 1, queryLen: 150, keyLen: 150 },
      L: 10,
      gateKind: "per-head-tanh",
      withMain: true,
      dt: "f32",
      adapterScale: 0.125,
    },
  ],
  [
    "odd D=7, B=2, T=S=50, left padding, sliding window 9, L=16 (the largest fused), scalar gate, adapter only",
    {
      c: {
        ...base,
        numHeads: 2,
        numKvHeads: 1,
        headDim: 7,
        batch: 2,
        queryLen: 50,
        keyLen: 50,
        slidingWindow: 9,
        leftPad: [3, 0],
      },
      L: 16,
      gateKind: "scalar",
      withMain: false,
      dt: "f32",
      adapterScale: 0.4,
    },
  ],
  [
    "D=12 (3 vec4s: a row's lanes store 2 and 1), GQA 3/1, B=2, T=S=60, left padding, L=5, per-head gate, adapter only",
    {
      c: {
        ...base,
        numHeads: 3,
        numKvHeads: 1,
        headDim: 12,
        batch: 2,
        queryLen: 60,
        keyLen: 60,
        leftPad: [0, 5],
      },
      L: 5,
      gateKind: "per-head",
      withMain: false,
      dt: "f32",
      adapterScale: 0.3,
    },
  ],
  [
    "D=64, H=Hkv=3, T=S=64, L=17 (beyond the fused size: a second dispatch), per-head gate, with the main output",
    {
      c: { ...base, numHeads: 3, numKvHeads: 3, headDim: 64, batch: 1, queryLen: 64, keyLen: 64 },
      L: 17,
      gateKind: "per-head",
      withMain: true,
      dt: "f32",
      adapterScale: 0.125,
    },
  ],
  [
    "f16 q/k/v/out and adapter output, D=32, GQA 4/1, B=2, T=S=70, L=10, per-head tanh, with the main output",
    {
      c: { ...base, numHeads: 4, numKvHeads: 1, headDim: 32, batch: 2, queryLen: 70, keyLen: 70 },
      L: 10,
      gateKind: "per-head-tanh",
      withMain: true,
      dt: "f16",
      adapterScale: 1 / Math.sqrt(32),
    },
  ],
];

async function checkFused(f: FusedCase, seed: number): Promise<void> {
  const g = await gpu();
  const { c } = f;
  if (f.dt === "f16" && !g.hasF16) return;
  const x = makeInputs(c, seed);
  const rng = new Rng(seed + 1000);
  const kvN = f.L * c.numKvHeads * c.headDim;
  const ka = rng.randn(kvN);
  const va = rng.randn(kvN);
  const gate = rng.randn(f.gateKind === "scalar" ? 1 : c.numHeads, 0.8);
  const q = uploadAs(g, x.q, f.dt);
  const k = uploadAs(g, x.k, f.dt);
  const v = uploadAs(g, x.v, f.dt);
  const shape = [c.batch, c.queryLen, c.numHeads, c.headDim];
  const out = poisoned(g, shape, f.dt);
  const aout = poisoned(g, shape, f.dt);
  const lse = poisoned(g, [c.batch, c.numHeads, c.queryLen]);
  const rec = new Recorder(g);
  const m = x.mask ? upload(g, x.mask) : null;
  attentionForward(rec, out, lse, q.tensor, k.tensor, v.tensor, m, opts(c), {
    ka: upload(g, ka),
    va: upload(g, va),
    gate: upload(g, gate),
    adapterLen: f.L,
    gateKind: f.gateKind,
    scale: f.adapterScale,
    out: aout,
    withMain: f.withMain,
  });
  rec.submit();
  const ref = attentionForwardRef(q.values, k.values, v.values, x.mask, c);
  const rows = c.batch * c.queryLen;
  const adp = adapterAttentionForwardRef(q.values, ka, va, gate, {
    numHeads: c.numHeads,
    numKvHeads: c.numKvHeads,
    headDim: c.headDim,
    adapterLen: f.L,
    rows,
    scale: f.adapterScale,
    gateKind: f.gateKind,
  });
  const want = adp.map((a, i) => a + (f.withMain ? ref.out[i]! : 0));
  const tol = f.dt === "f16" ? F16_OUT_TOL : FWD_TOL;
  assertClose(await readAs(g, out), ref.out, tol, "out");
  assertClose(await download(g, lse), ref.lse, FWD_TOL, "lse");
  assertClose(await readAs(g, aout), want, tol, "adapter out");
}

for (const kind of KINDS) {
  let seed = 60;
  for (const [name, f] of FUSED_CASES) {
    const s = seed++;
    Deno.test(
      `attentionForward with the adapter attention folded in matches the references (${kind}): ${name}`,
      withKind(kind, () => checkFused(f, s)),
    );
  }
}
