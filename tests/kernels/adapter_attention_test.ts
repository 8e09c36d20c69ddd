import assert from "node:assert/strict";
import {
  adapterAttentionBackward,
  adapterAttentionForward,
  type AdapterAttentionOptions,
  type GateKind,
} from "../../kernels/adapter_attention.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { assertClose, download, gpu, poisoned, Rng, upload } from "../_util.ts";
import { adapterAttentionBackwardRef, adapterAttentionForwardRef } from "../reference/adapter_attention.ts";

// f32 kernel against float64: forward ≤ 1e-5; gradients ≤ 1e-4 (dka/dva/dgate sum over all rows).
const FWD_TOL = 1e-5;
const BWD_TOL = 1e-4;

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

Deno.test("adapter attention at D=64, L=10, 300 rows (several row groups), H=3/Hkv=1, odd D path D=6", async () => {
  await check(opts(3, 1, 64, 10, 300, "per-head-tanh", true), 7);
  await check(opts(3, 3, 6, 33, 131, "scalar", false), 8);
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
