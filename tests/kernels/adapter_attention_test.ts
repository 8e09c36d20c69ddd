import assert from "node:assert/strict";
import {
  adapterAttentionBackward,
  adapterAttentionForward,
  type AdapterAttentionOptions,
  adapterAttentionTuning,
  adapterSubChunks,
  type GateKind,
} from "../../kernels/adapter_attention.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { GpuError } from "../../src/errors.ts";
import { assertClose, download, downloadF16, gpu, poisoned, Rng, upload, uploadF16 } from "../_util.ts";
import { adapterAttentionBackwardRef, adapterAttentionForwardRef } from "../reference/adapter_attention.ts";

// f32 kernel against float64: forward ≤ 1e-5; gradients ≤ 1e-4 (dka/dva/dgate sum over all rows).
const FWD_TOL = 1e-5;
const BWD_TOL = 1e-4;
// f16 q / out: the references use the f16-rounded inputs, so f32 results keep the tolerances above; an f16
// out is the f32 result rounded once (2^-11 relative per element), so ≤ 2e-3 normwise.
const F16_OUT_TOL = 2e-3;

function inputs(o: AdapterAttentionOptions, seed: number) {
  const rng = new Rng(seed);
  const n = o.rows * o.numHeads * o.headDim;
  const kv = o.numKvHeads * o.adapterLen * o.headDim;
  return {
    q: rng.randn(n),
    ka: rng.randn(kv),
    va: rng.randn(kv),
    gate: rng.randn(o.gateKind === "scalar" ? 1 : o.numHeads, 0.8),
    dout: rng.randn(n),
    prior: rng.randn(n),
  };
}

function opts(
  H: number,
  Hkv: number,
  D: number,
  L: number,
  rows: number,
  gateKind: GateKind,
  accumulate: boolean,
): AdapterAttentionOptions {
  return {
    numHeads: H,
    numKvHeads: Hkv,
    headDim: D,
    adapterLen: L,
    rows,
    scale: 1 / Math.sqrt(D),
    gateKind,
    accumulate,
  };
}

async function check(o: AdapterAttentionOptions, seed: number): Promise<void> {
  const g = await gpu();
  const x = inputs(o, seed);
  const acc = o.accumulate ?? false;
  const q = upload(g, x.q);
  const ka = upload(g, x.ka);
  const va = upload(g, x.va);
  const gate = upload(g, x.gate);
  const out = acc ? upload(g, x.prior) : poisoned(g, [x.q.length]);
  const dq = acc ? upload(g, x.prior) : poisoned(g, [x.q.length]);
  const dka = poisoned(g, [x.ka.length]);
  const dva = poisoned(g, [x.ka.length]);
  const dgate = poisoned(g, [x.gate.length]);
  const rec = new Recorder(g);
  adapterAttentionForward(rec, out, q, ka, va, gate, o);
  adapterAttentionBackward(rec, dq, dka, dva, dgate, upload(g, x.dout), q, ka, va, gate, o);
  rec.submit();
  const f = adapterAttentionForwardRef(x.q, x.ka, x.va, x.gate, o);
  const r = adapterAttentionBackwardRef(x.dout, x.q, x.ka, x.va, x.gate, o);
  const plus = (a: Float64Array) => (acc ? a.map((v, i) => v + x.prior[i]!) : a);
  assertClose(await download(g, out), plus(f), FWD_TOL, "out");
  assertClose(await download(g, dq), plus(r.dq), BWD_TOL, "dq");
  assertClose(await download(g, dka), r.dka, BWD_TOL, "dka");
  assertClose(await download(g, dva), r.dva, BWD_TOL, "dva");
  assertClose(await download(g, dgate), r.dgate, BWD_TOL, "dgate");
}

const KINDS: GateKind[] = ["scalar", "per-head", "per-head-tanh"];
let seed = 100;
for (const kind of KINDS) {
  for (const L of [1, 3, 10]) {
    for (const acc of [false, true]) {
      const s = seed++;
      Deno.test(`adapter attention matches the reference: GQA H=4 Hkv=2, B=2 T=7, L=${L}, ${kind}, accumulate=${acc}`, () =>
        check(opts(4, 2, 8, L, 2 * 7, kind, acc), s));
    }
  }
}

for (
  const [pairs, rowBatch, vec4] of [[true, 8, true], [true, 1, true], [true, 8, false], [
    false,
    8,
    true,
  ]] as const
) {
  for (const subChunks of [1, 4]) {
    const kernel = pairs
      ? `paired partials, ${rowBatch} rows per load batch, ${vec4 ? "vec4" : "scalar"} loads`
      : "first partials";
    Deno.test(`adapter attention at D=64, L=10, 300 rows (several row groups, ${subChunks} row blocks each, ${kernel}), H=3/Hkv=1, odd D path D=6`, async () => {
      const saved = { ...adapterAttentionTuning };
      adapterAttentionTuning.subChunks = subChunks;
      adapterAttentionTuning.pairs = pairs;
      adapterAttentionTuning.rowBatch = rowBatch;
      adapterAttentionTuning.vec4 = vec4;
      try {
        await check(opts(3, 1, 64, 10, 300, "per-head-tanh", true), 7);
        await check(opts(3, 3, 6, 33, 131, "scalar", false), 8);
        await check(opts(4, 2, 7, 16, 70, "per-head", true), 9);
      } finally {
        Object.assign(adapterAttentionTuning, saved);
      }
    });
  }
}

// the final reduction with 1 (one thread per output), 2 and 8 threads per output over 10 slots (300 rows,
// one row block per workgroup): slices of one, two and ten slots, a part-filled last workgroup, every gate
Deno.test("adapter attention backward: the slot sums at 1, 2 and 8 threads per output match the reference", async () => {
  const saved = { ...adapterAttentionTuning };
  try {
    for (const slices of [1, 2, 8] as const) {
      adapterAttentionTuning.subChunks = 1;
      adapterAttentionTuning.reduceSlices = slices;
      await check(opts(3, 1, 64, 10, 300, "per-head-tanh", true), 40 + slices);
      await check(opts(3, 3, 6, 33, 300, "scalar", false), 50 + slices);
      await check(opts(4, 2, 7, 16, 300, "per-head", true), 60 + slices);
    }
  } finally {
    Object.assign(adapterAttentionTuning, saved);
  }
});

// D a multiple of 16 takes the forward that splits each (row, head) over 4 threads; 16 pairs a
// workgroup, so rows * H = 7 * 3 = 21 and 33 * 4 = 132 leave a part-filled last workgroup
Deno.test("adapter attention, split forward (D % 16 == 0): D=16/32/64, L=1/64 (the largest), part-filled workgroups", async () => {
  await check(opts(3, 1, 16, 1, 7, "scalar", false), 31);
  await check(opts(4, 2, 32, 64, 33, "per-head", true), 32);
  await check(opts(4, 4, 64, 17, 33, "per-head-tanh", false), 33);
});

/** Forward and backward with q and/or out in f16 (adapter keys, values, gate, dout, gradients f32). */
async function checkF16(o: AdapterAttentionOptions, seed: number, qt: "f32" | "f16", ot: "f32" | "f16") {
  const g = await gpu();
  const x = inputs(o, seed);
  const acc = o.accumulate ?? false;
  const q = qt === "f16" ? uploadF16(g, x.q) : { tensor: upload(g, x.q), values: x.q };
  const prior = ot === "f16" ? uploadF16(g, x.prior) : { tensor: upload(g, x.prior), values: x.prior };
  const out = acc ? prior.tensor : poisoned(g, [x.q.length], ot);
  const ka = upload(g, x.ka);
  const va = upload(g, x.va);
  const gate = upload(g, x.gate);
  const dq = poisoned(g, [x.q.length]);
  const dka = poisoned(g, [x.ka.length]);
  const dva = poisoned(g, [x.ka.length]);
  const dgate = poisoned(g, [x.gate.length]);
  const rec = new Recorder(g);
  adapterAttentionForward(rec, out, q.tensor, ka, va, gate, o);
  adapterAttentionBackward(rec, dq, dka, dva, dgate, upload(g, x.dout), q.tensor, ka, va, gate, {
    ...o,
    accumulate: false,
  });
  rec.submit();
  const f = adapterAttentionForwardRef(q.values, x.ka, x.va, x.gate, o);
  const r = adapterAttentionBackwardRef(x.dout, q.values, x.ka, x.va, x.gate, o);
  const want = acc ? f.map((v, i) => v + prior.values[i]!) : f;
  const got = ot === "f16" ? await downloadF16(g, out) : await download(g, out);
  assert.ok(got.every(Number.isFinite), "out has a non-finite value");
  assertClose(got, want, ot === "f16" ? F16_OUT_TOL : FWD_TOL, `out (${ot})`);
  assertClose(await download(g, dq), r.dq, BWD_TOL, "dq");
  assertClose(await download(g, dka), r.dka, BWD_TOL, "dka");
  assertClose(await download(g, dva), r.dva, BWD_TOL, "dva");
  assertClose(await download(g, dgate), r.dgate, BWD_TOL, "dgate");
}

Deno.test("adapter attention with f16 q and f16 out (overwritten) matches the reference: GQA 4/2, D=7, L=10, 33 rows", () =>
  checkF16(opts(4, 2, 7, 10, 33, "per-head-tanh", false), 21, "f16", "f16"));

Deno.test("adapter attention, split forward with f16 q and f16 out (overwritten, then accumulated): D=32, L=10, 33 rows", async () => {
  await checkF16(opts(4, 2, 32, 10, 33, "scalar", false), 24, "f16", "f16");
  await checkF16(opts(4, 2, 32, 10, 33, "per-head", true), 25, "f16", "f16");
});

Deno.test("adapter attention adding into an f16 out (read, add in f32, round once): H=3/Hkv=1, D=8, L=1, 7 rows", () =>
  checkF16(opts(3, 1, 8, 1, 7, "scalar", true), 22, "f16", "f16"));

Deno.test("adapter attention with f16 q adding into an f32 out, and f32 q into an f16 out: D=6, L=3", async () => {
  await checkF16(opts(4, 4, 6, 3, 13, "per-head", true), 23, "f16", "f32");
  await checkF16(opts(4, 2, 6, 3, 13, "per-head", false), 24, "f32", "f16");
});

Deno.test("adapter attention rejects f16 adapter keys and gradients with GpuError", async () => {
  const g = await gpu();
  const o = opts(4, 2, 8, 3, 7, "scalar", false);
  const x = inputs(o, 25);
  const f = (a: Float32Array) => upload(g, a);
  const h = (a: Float32Array) => uploadF16(g, a).tensor;
  const rec = new Recorder(g);
  const isGpuError = (re: RegExp) => (e: unknown) => e instanceof GpuError && re.test(e.message);
  assert.throws(
    () => adapterAttentionForward(rec, f(x.q), f(x.q), h(x.ka), f(x.va), f(x.gate), o),
    isGpuError(/ka/),
  );
  assert.throws(
    () =>
      adapterAttentionBackward(
        rec,
        h(x.q),
        f(x.ka),
        f(x.va),
        f(x.gate),
        f(x.dout),
        f(x.q),
        f(x.ka),
        f(x.va),
        f(x.gate),
        o,
      ),
    isGpuError(/dq/),
  );
  assert.equal(rec.ops.length, 0);
});

Deno.test("a zero gate adds exactly nothing to out (PEFT zero-init)", async () => {
  const g = await gpu();
  const o = opts(4, 2, 8, 10, 7, "scalar", true);
  const x = inputs(o, 9);
  const out = upload(g, x.prior);
  const rec = new Recorder(g);
  adapterAttentionForward(
    rec,
    out,
    upload(g, x.q),
    upload(g, x.ka),
    upload(g, x.va),
    upload(g, new Float32Array([0])),
    o,
  );
  rec.submit();
  assert.deepEqual(await download(g, out), x.prior);
});

Deno.test("the reference adapter gradients (incl. dgate) match central finite differences", () => {
  for (const kind of KINDS) {
    const o = opts(4, 2, 3, 3, 5, kind, false);
    const x = inputs(o, 11);
    const arrs = {
      q: Float64Array.from(x.q),
      ka: Float64Array.from(x.ka),
      va: Float64Array.from(x.va),
      gate: Float64Array.from(x.gate),
    };
    const loss = () =>
      adapterAttentionForwardRef(arrs.q, arrs.ka, arrs.va, arrs.gate, o).reduce(
        (s, v, i) => s + v * x.dout[i]!,
        0,
      );
    const r = adapterAttentionBackwardRef(x.dout, arrs.q, arrs.ka, arrs.va, arrs.gate, o);
    const grads = { q: r.dq, ka: r.dka, va: r.dva, gate: r.dgate };
    for (const name of ["q", "ka", "va", "gate"] as const) {
      const a = arrs[name];
      const fd = new Float64Array(a.length);
      for (let i = 0; i < a.length; i++) {
        const a0 = a[i]!;
        a[i] = a0 + 1e-6;
        const lp = loss();
        a[i] = a0 - 1e-6;
        const lm = loss();
        a[i] = a0;
        fd[i] = (lp - lm) / 2e-6;
      }
      assertClose(grads[name], fd, 1e-7, `${kind}: d${name} vs finite differences`);
    }
  }
});

Deno.test("the adapter backward's row blocks per workgroup aim at about 320 workgroups, unless set", () => {
  const saved = adapterAttentionTuning.subChunks;
  try {
    adapterAttentionTuning.subChunks = null;
    // B*T = 2048 rows in blocks of 32: gpt2 (H 12) and SmolLM2 (H 9) take 2, TinyLlama (H 32) takes 8
    assert.deepEqual([12, 9, 32].map((H) => adapterSubChunks(2048, H, 32)), [2, 2, 8]);
    assert.equal(adapterSubChunks(7, 4, 32), 1, "one block of rows: one workgroup per head");
    adapterAttentionTuning.subChunks = 4;
    assert.equal(adapterSubChunks(2048, 32, 32), 4);
  } finally {
    adapterAttentionTuning.subChunks = saved;
  }
});
