import assert from "node:assert/strict";
import {
  createCrossEntropyScratch,
  crossEntropyLmHead,
  crossEntropyTuning,
  logitsForward,
} from "../../kernels/cross_entropy.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { splitRows, tensorFrom } from "../../src/gpu/tensor.ts";
import { assertClose, download, gpu, poisoned, Rng, upload, uploadF16 } from "../_util.ts";
import { crossEntropyRef } from "../reference/cross_entropy.ts";
import { finiteDifference } from "../reference/norm.ts";

function labelsFor(rng: Rng, N: number, V: number): Int32Array {
  const y = rng.ints(N, V);
  if (N > 2) {
    y[1] = -100; // ignored tokens
    y[N - 1] = -100;
    y[0] = V - 1; // the last vocabulary row (in the last, partial chunk)
  }
  return y;
}

/** f32 → f16 bits (round to nearest even) and back, for the f16-weight case. */
function toF16(x: Float32Array): { bits: Uint16Array; values: Float32Array } {
  const bits = new Uint16Array(x.length);
  const values = new Float32Array(x.length);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < x.length; i++) {
    f[0] = x[i]!;
    const s = (u[0]! >>> 16) & 0x8000;
    const e = ((u[0]! >>> 23) & 0xff) - 127 + 15;
    let m = u[0]! & 0x7fffff;
    let h: number;
    if (e <= 0) h = s; // tiny values flush to zero (none at this scale)
    else {
      const round = (m & 0x1fff) > 0x1000 || ((m & 0x1fff) === 0x1000 && (m & 0x2000) !== 0) ? 1 : 0;
      m >>>= 13;
      h = (s | (e << 10) | m) + round;
    }
    bits[i] = h;
    const he = (h >>> 10) & 0x1f, hm = h & 0x3ff;
    values[i] = (h & 0x8000 ? -1 : 1) * 2 ** (he - 15) * (1 + hm / 1024);
  }
  return { bits, values };
}

Deno.test("the float64 cross-entropy gradient matches central finite differences", () => {
  const rng = new Rng(50);
  const N = 4, C = 5, V = 9;
  const h = rng.randn(N * C), w = rng.randn(V * C), y = labelsFor(rng, N, V);
  const fd = finiteDifference((hh) => [crossEntropyRef(hh, w, y, N, C, V).loss], h, [1]);
  assertClose(crossEntropyRef(h, w, y, N, C, V).dHidden, fd, 1e-7, "dHidden vs finite differences");
});

Deno.test("crossEntropyLmHead matches float64 loss (1e-5) and dHidden (1e-4) across vocabulary chunks", async () => {
  const g = await gpu();
  const rng = new Rng(51);
  for (const [N, C, V] of [[1, 7, 5], [13, 33, 300], [33, 20, 130]] as const) {
    const h = rng.randn(N * C), w = rng.randn(V * C, 0.5), y = labelsFor(rng, N, V);
    const scratch = createCrossEntropyScratch(g, N + 3, V, C, 128); // chunks of 128 rows
    const loss = poisoned(g, [1]), dHidden = poisoned(g, [N, C]);
    const rec = new Recorder(g);
    crossEntropyLmHead(rec, {
      loss,
      dHidden,
      hidden: upload(g, h, [N, C]),
      weight: upload(g, w, [V, C]),
      labels: tensorFrom(g, y),
      scratch,
    });
    rec.submit();
    const ref = crossEntropyRef(h, w, y, N, C, V);
    assertClose(await download(g, loss), [ref.loss], 1e-5, `loss N=${N} C=${C} V=${V}`);
    assertClose(await download(g, dHidden), ref.dHidden, 1e-4, `dHidden N=${N} C=${C} V=${V}`);
  }
});

Deno.test("crossEntropyLmHead accepts the weight as row ranges, and logitsForward writes all logits", async () => {
  const g = await gpu();
  const rng = new Rng(52);
  const N = 13, C = 33, V = 300;
  const h = rng.randn(N * C), w = rng.randn(V * C, 0.5), y = labelsFor(rng, N, V);
  const wt = upload(g, w, [V, C]);
  const ranges = splitRows(g, wt, 192 * C * 4); // [0, 192), [192, 300): chunks 128, 64 | 108
  assert.equal(ranges.length, 2);
  const loss = poisoned(g, [1]), dHidden = poisoned(g, [N, C]), logits = poisoned(g, [N, V]);
  const ht = upload(g, h, [N, C]);
  const rec = new Recorder(g);
  crossEntropyLmHead(rec, {
    loss,
    dHidden,
    hidden: ht,
    weight: ranges,
    labels: tensorFrom(g, y),
    scratch: createCrossEntropyScratch(g, N, V, C, 128),
  });
  logitsForward(rec, logits, ht, ranges);
  rec.submit();
  const ref = crossEntropyRef(h, w, y, N, C, V);
  assertClose(await download(g, loss), [ref.loss], 1e-5, "loss (ranges)");
  assertClose(await download(g, dHidden), ref.dHidden, 1e-4, "dHidden (ranges)");
  const want = new Float64Array(N * V);
  for (let n = 0; n < N; n++) {
    for (let v = 0; v < V; v++) {
      for (let c = 0; c < C; c++) want[n * V + v] = want[n * V + v]! + h[n * C + c]! * w[v * C + c]!;
    }
  }
  assertClose(await download(g, logits), want, 1e-5, "logits");
});

Deno.test("crossEntropyLmHead with an f16 head matches float64 on the f16 weights within 2e-3", async () => {
  const g = await gpu();
  if (!g.hasF16) return;
  const rng = new Rng(53);
  const N = 7, C = 36, V = 260;
  const h = rng.randn(N * C), w = toF16(rng.randn(V * C, 0.5)), y = labelsFor(rng, N, V);
  const loss = poisoned(g, [1]), dHidden = poisoned(g, [N, C]);
  const rec = new Recorder(g);
  crossEntropyLmHead(rec, {
    loss,
    dHidden,
    hidden: upload(g, h, [N, C]),
    weight: tensorFrom(g, w.bits, [V, C]),
    labels: tensorFrom(g, y),
    scratch: createCrossEntropyScratch(g, N, V, C, 128),
  });
  rec.submit();
  const ref = crossEntropyRef(h, w.values, y, N, C, V);
  assertClose(await download(g, loss), [ref.loss], 2e-3, "loss (f16 head)");
  assertClose(await download(g, dHidden), ref.dHidden, 2e-3, "dHidden (f16 head)");
});

Deno.test("crossEntropyLmHead gives loss 0 and a zero gradient when every label is -100", async () => {
  const g = await gpu();
  const rng = new Rng(54);
  const N = 5, C = 8, V = 40;
  const loss = poisoned(g, [1]), dHidden = poisoned(g, [N, C]);
  const rec = new Recorder(g);
  crossEntropyLmHead(rec, {
    loss,
    dHidden,
    hidden: upload(g, rng.randn(N * C), [N, C]),
    weight: upload(g, rng.randn(V * C), [V, C]),
    labels: tensorFrom(g, new Int32Array(N).fill(-100)),
    scratch: createCrossEntropyScratch(g, N, V, C),
  });
  rec.submit();
  assert.deepEqual(Array.from(await download(g, loss)), [0]);
  assert.deepEqual(Array.from(await download(g, dHidden)), new Array(N * C).fill(0));
});

Deno.test("crossEntropyLmHead and logitsForward read an f16 hidden state: f32 loss, dHidden and logits", async () => {
  const g = await gpu();
  if (!g.hasF16) return;
  const rng = new Rng(55);
  // C = 33 takes the scalar loads of the hidden rows, C = 36 the vec4 ones; the last case is the f16
  // model (f16 hidden and f16 head)
  for (
    const [N, C, V, headDtype] of [[7, 33, 130, "f32"], [1, 36, 260, "f32"], [7, 36, 260, "f16"]] as const
  ) {
    const h = uploadF16(g, rng.randn(N * C), [N, C]);
    const w = headDtype === "f16" ? uploadF16(g, rng.randn(V * C, 0.5), [V, C]) : (() => {
      const values = rng.randn(V * C, 0.5);
      return { tensor: upload(g, values, [V, C]), values };
    })();
    const y = labelsFor(rng, N, V);
    const loss = poisoned(g, [1]), dHidden = poisoned(g, [N, C]), logits = poisoned(g, [N, V]);
    const rec = new Recorder(g);
    crossEntropyLmHead(rec, {
      loss,
      dHidden,
      hidden: h.tensor,
      weight: w.tensor,
      labels: tensorFrom(g, y),
      scratch: createCrossEntropyScratch(g, N, V, C, 128), // chunks of 128 rows
    });
    logitsForward(rec, logits, h.tensor, w.tensor);
    rec.submit();
    // The reference uses the f16-rounded hidden (and head), so the outputs keep the f32 tolerances of the
    // tests above (the f16 head's 2e-3 where the head is f16).
    const [tolLoss, tolGrad, tolLogits] = headDtype === "f16" ? [2e-3, 2e-3, 2e-3] : [1e-5, 1e-4, 1e-5];
    const ref = crossEntropyRef(h.values, w.values, y, N, C, V);
    const what = `N=${N} C=${C} V=${V} ${headDtype} head`;
    assertClose(await download(g, loss), [ref.loss], tolLoss, `loss (f16 hidden) ${what}`);
    assertClose(await download(g, dHidden), ref.dHidden, tolGrad, `dHidden (f16 hidden) ${what}`);
    const want = new Float64Array(N * V);
    for (let n = 0; n < N; n++) {
      for (let v = 0; v < V; v++) {
        for (let c = 0; c < C; c++) {
          want[n * V + v] = want[n * V + v]! +
            h.values[n * C + c]! * w.values[v * C + c]!;
        }
      }
    }
    assertClose(await download(g, logits), want, tolLogits, `logits (f16 hidden) ${what}`);
  }
});

Deno.test("crossEntropyLmHead keeps its gradient f32: an f16 dHidden is refused with a clear error", async () => {
  const g = await gpu();
  if (!g.hasF16) return;
  const N = 3, C = 5, V = 7;
  const rng = new Rng(56);
  assert.throws(
    () =>
      crossEntropyLmHead(new Recorder(g), {
        loss: poisoned(g, [1]),
        dHidden: poisoned(g, [N, C], "f16"),
        hidden: uploadF16(g, rng.randn(N * C), [N, C]).tensor,
        weight: upload(g, rng.randn(V * C), [V, C]),
        labels: tensorFrom(g, rng.ints(N, V)),
        scratch: createCrossEntropyScratch(g, N, V, C),
      }),
    /dHidden .* must be f32/,
  );
});

// The row sweep (the training default where ≥ 128 rows of full-vocabulary logits fit the scratch): blocks
// of 128 rows with a part-filled last block, the weight as one tensor or as row ranges, f32 or f16 hidden
// and head; the vocabulary sweep (`rowSweep = false`) must give the same within the same tolerances.
const ROW_SWEEP_CASES = [
  {
    name: "300 rows in blocks of 256 + 44, V=130",
    N: 300,
    C: 20,
    V: 130,
    ranges: false,
    h16: false,
    w16: false,
  },
  {
    name: "300 rows, the head in two row ranges",
    N: 300,
    C: 20,
    V: 130,
    ranges: true,
    h16: false,
    w16: false,
  },
  { name: "all 13 rows in one block, odd C=33", N: 13, C: 33, V: 30, ranges: false, h16: false, w16: false },
  { name: "300 rows, f16 hidden (C=36)", N: 300, C: 36, V: 130, ranges: false, h16: true, w16: false },
  { name: "260 rows, f16 hidden and head", N: 260, C: 36, V: 140, ranges: false, h16: true, w16: true },
  // one chunk of the whole vocabulary: the online softmax's steps of 8 loads per thread, then its tail
  { name: "V=4700 in one chunk", N: 130, C: 12, V: 4700, ranges: false, h16: false, w16: false, chunk: 8192 },
];

for (const rowSweep of [true, false]) {
  for (const c of ROW_SWEEP_CASES) {
    Deno.test(`crossEntropyLmHead ${rowSweep ? "row" : "vocabulary"} sweep matches float64: ${c.name}`, async () => {
      const g = await gpu();
      if ((c.h16 || c.w16) && !g.hasF16) return;
      const rng = new Rng(57 + c.N + c.V);
      const { N, C, V } = c;
      const h = c.h16 ? uploadF16(g, rng.randn(N * C), [N, C]) : (() => {
        const values = rng.randn(N * C);
        return { tensor: upload(g, values, [N, C]), values };
      })();
      const w = c.w16 ? uploadF16(g, rng.randn(V * C, 0.5), [V, C]) : (() => {
        const values = rng.randn(V * C, 0.5);
        return { tensor: upload(g, values, [V, C]), values };
      })();
      const y = labelsFor(rng, N, V);
      for (let n = 100; n < Math.min(N, 140); n++) y[n] = -100; // ignored rows across a block edge
      const weight = c.ranges ? splitRows(g, w.tensor, 64 * C * 4) : w.tensor;
      if (c.ranges) assert.equal((weight as unknown[]).length, 3);
      const scratch = createCrossEntropyScratch(g, N, V, C, "chunk" in c ? c.chunk : 128);
      const loss = poisoned(g, [1]), dHidden = poisoned(g, [N, C]);
      const saved = crossEntropyTuning.rowSweep;
      crossEntropyTuning.rowSweep = rowSweep;
      try {
        const rec = new Recorder(g);
        crossEntropyLmHead(rec, {
          loss,
          dHidden,
          hidden: h.tensor,
          weight,
          labels: tensorFrom(g, y),
          scratch,
        });
        rec.submit();
      } finally {
        crossEntropyTuning.rowSweep = saved;
      }
      const ref = crossEntropyRef(h.values, w.values, y, N, C, V);
      const [tolLoss, tolGrad] = c.w16 ? [2e-3, 2e-3] : [1e-5, 1e-4];
      assertClose(await download(g, loss), [ref.loss], tolLoss, "loss");
      assertClose(await download(g, dHidden), ref.dHidden, tolGrad, "dHidden");
    });
  }
}
