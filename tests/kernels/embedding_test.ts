import assert from "node:assert/strict";
import { embeddingForward, positionEmbeddingForward } from "../../kernels/embedding.ts";
import { Recorder } from "../../src/gpu/recorder.ts";
import { splitRows, type Tensor, tensorFrom } from "../../src/gpu/tensor.ts";
import type { Gpu } from "../../src/gpu/device.ts";
import { assertClose, download, downloadF16, gpu, poisoned, Rng, upload, uploadF16 } from "../_util.ts";
import { embeddingForwardRef, positionEmbeddingForwardRef } from "../reference/embedding.ts";

// A lookup copies values: exact for f32 tables, and exact against the f16-rounded table for f16.
const TOL = 0;

async function run(g: Gpu, out: Tensor, record: (rec: Recorder) => void): Promise<Float32Array> {
  const rec = new Recorder(g);
  record(rec);
  rec.submit();
  return out.dtype === "f16" ? await downloadF16(g, out) : await download(g, out);
}

// An f16 output rounds each value once: 2^-11 relative to nearest, and WGSL lets f32 → f16 take either
// neighbour, so allow one f16 ulp, 2^-10, normwise.
const TOL_F16_OUT = 2 ** -10;

Deno.test("embeddingForward gathers rows and writes zeros for ids outside the table", async () => {
  const g = await gpu();
  const rng = new Rng(21);
  for (const [N, V, C] of [[1, 7, 1], [7, 33, 5], [130, 50, 33]] as const) {
    const table = rng.randn(V * C);
    const ids = rng.ints(N, V);
    if (N > 2) {
      ids[1] = -3; // out of range on both sides: zeros, no out-of-bounds read
      ids[2] = V;
    }
    const out = poisoned(g, [N, C]);
    const got = await run(
      g,
      out,
      (rec) => embeddingForward(rec, out, upload(g, ids), upload(g, table, [V, C])),
    );
    assertClose(got, embeddingForwardRef(ids, table, V, C), TOL, `embedding ${N}x${V}x${C}`);
  }
});

Deno.test("embeddingForward accumulates into the output", async () => {
  const g = await gpu();
  const rng = new Rng(22);
  const [N, V, C] = [33, 17, 7];
  const table = rng.randn(V * C);
  const ids = rng.ints(N, V);
  const init = rng.randn(N * C);
  const out = upload(g, init, [N, C]);
  const got = await run(
    g,
    out,
    (rec) => embeddingForward(rec, out, upload(g, ids), upload(g, table, [V, C]), { accumulate: true }),
  );
  assertClose(
    got,
    embeddingForwardRef(ids, table, V, C).map((v, i) => v + init[i]!),
    1e-7,
    "embedding accumulate",
  );
});

Deno.test("a table in row ranges covers every id when each range is looked up once", async () => {
  const g = await gpu();
  const rng = new Rng(23);
  const [N, V, C] = [130, 200, 64]; // 64 f32 = 256 bytes a row, so every range offset is bindable
  const tableData = rng.randn(V * C);
  const table = upload(g, tableData, [V, C]);
  const ranges = splitRows(g, table, 50 * C * 4 + 100); // ranges of 50 rows
  assert.equal(ranges.length, 4);
  const ids = rng.ints(N, V);
  const out = poisoned(g, [N, C]);
  const got = await run(g, out, (rec) => {
    for (const { rowStart, tensor } of ranges) {
      embeddingForward(rec, out, upload(g, ids), tensor, { rowStart });
    }
  });
  assertClose(got, embeddingForwardRef(ids, tableData, V, C), TOL, "embedding in ranges");
});

Deno.test("embeddingForward reads f16 tables", async () => {
  const g = await gpu();
  if (!g.hasF16) return; // the f16 variant is only compiled where shader-f16 exists
  const rng = new Rng(24);
  const [N, V, C] = [33, 40, 7]; // odd C: f16 rows are not 4-byte aligned
  const half = new Float16Array(rng.randn(V * C));
  const ids = rng.ints(N, V);
  const out = poisoned(g, [N, C]);
  const table = tensorFrom(g, new Uint16Array(half.buffer), [V, C]);
  const got = await run(g, out, (rec) => embeddingForward(rec, out, upload(g, ids), table));
  assertClose(got, embeddingForwardRef(ids, Float32Array.from(half), V, C), TOL, "f16 embedding");
});

Deno.test("more than 65535 workgroups of lookups are folded into y", async () => {
  const g = await gpu();
  const rng = new Rng(25);
  const [N, V, C] = [65537, 9, 256]; // 65537 workgroups of 256 elements
  const table = rng.randn(V * C);
  const ids = rng.ints(N, V);
  const out = poisoned(g, [N, C]);
  const got = await run(
    g,
    out,
    (rec) => embeddingForward(rec, out, upload(g, ids), upload(g, table, [V, C])),
  );
  assertClose(got, embeddingForwardRef(ids, table, V, C), TOL, "embedding fold");
});

Deno.test("positionEmbeddingForward adds position rows into the hidden state (f32 and f16)", async () => {
  const g = await gpu();
  const rng = new Rng(26);
  for (const [N, P, C] of [[1, 3, 1], [7, 9, 5], [130, 64, 33]] as const) {
    const h = rng.randn(N * C);
    const wpe = rng.randn(P * C);
    const positions = Int32Array.from({ length: N }, (_, i) => i % P);
    if (N > 2) positions[1] = P + 4; // adds nothing, reads nothing
    const out = upload(g, h, [N, C]);
    const got = await run(
      g,
      out,
      (rec) => positionEmbeddingForward(rec, out, upload(g, wpe, [P, C]), upload(g, positions)),
    );
    assertClose(got, positionEmbeddingForwardRef(h, positions, wpe, P, C), 1e-7, `wpe ${N}x${P}x${C}`);
    if (g.hasF16) {
      const half = new Float16Array(wpe);
      const out16 = upload(g, h, [N, C]);
      const wpe16 = tensorFrom(g, new Uint16Array(half.buffer), [P, C]);
      const got16 = await run(
        g,
        out16,
        (rec) => positionEmbeddingForward(rec, out16, wpe16, upload(g, positions)),
      );
      assertClose(
        got16,
        positionEmbeddingForwardRef(h, positions, Float32Array.from(half), P, C),
        1e-7,
        "f16 wpe",
      );
    }
  }
});

Deno.test("embeddingForward writes f16 outputs: exact from f16 tables, one rounding from f32 tables", async () => {
  const g = await gpu();
  if (!g.hasF16) return; // the f16 variant is only compiled where shader-f16 exists
  const rng = new Rng(27);
  for (const [N, V, C] of [[1, 7, 1], [7, 33, 5], [33, 40, 7]] as const) {
    const ids = rng.ints(N, V);
    if (N > 2) {
      ids[1] = -3; // zeros in f16 too
      ids[2] = V;
    }
    const table16 = uploadF16(g, rng.randn(V * C), [V, C]);
    const out16 = poisoned(g, [N, C], "f16");
    const got16 = await run(g, out16, (rec) => embeddingForward(rec, out16, upload(g, ids), table16.tensor));
    assertClose(got16, embeddingForwardRef(ids, table16.values, V, C), TOL, `f16 -> f16 ${N}x${V}x${C}`);
    const table32 = rng.randn(V * C); // an f32 table (an f32 checkpoint) feeding f16 activations
    const out = poisoned(g, [N, C], "f16");
    const got = await run(
      g,
      out,
      (rec) => embeddingForward(rec, out, upload(g, ids), upload(g, table32, [V, C])),
    );
    assertClose(got, embeddingForwardRef(ids, table32, V, C), TOL_F16_OUT, `f32 -> f16 ${N}x${V}x${C}`);
  }
});

Deno.test("positionEmbeddingForward adds into an f16 hidden state (f16 and f32 position tables)", async () => {
  const g = await gpu();
  if (!g.hasF16) return;
  const rng = new Rng(28);
  for (const [N, P, C] of [[1, 3, 1], [7, 9, 5], [33, 40, 7]] as const) {
    const h = rng.randn(N * C);
    const positions = Int32Array.from({ length: N }, (_, i) => (i * 5) % P);
    if (N > 2) positions[1] = -1; // adds nothing: the row keeps its f16 value exactly
    for (const wpeDtype of ["f16", "f32"] as const) {
      const wpe = wpeDtype === "f16" ? uploadF16(g, rng.randn(P * C), [P, C]) : (() => {
        const values = rng.randn(P * C);
        return { tensor: upload(g, values, [P, C]), values };
      })();
      const out = uploadF16(g, h, [N, C]); // added into, so it holds the hidden state rather than poison
      const got = await run(g, out.tensor, (rec) => {
        positionEmbeddingForward(rec, out.tensor, wpe.tensor, upload(g, positions));
      });
      // f32 sum of the f16 inputs rounded once to f16: one f16 ulp plus the f32 add's 2^-24
      assertClose(
        got,
        positionEmbeddingForwardRef(out.values, positions, wpe.values, P, C),
        TOL_F16_OUT * 1.01,
        `f16 h += ${wpeDtype} wpe ${N}x${P}x${C}`,
      );
    }
  }
});
