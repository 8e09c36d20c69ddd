import assert from "node:assert/strict";
import { adapterReport, throwIfFailed } from "../../src/gpu/device.ts";
import { compileKernel, defineKernel, pipelinesCompiled } from "../../src/gpu/kernel.ts";
import { bindGroupsCreated, Recorder } from "../../src/gpu/recorder.ts";
import { createTensor, readF32, readTensor, splitRows, Tensor, tensorFrom } from "../../src/gpu/tensor.ts";
import { BufferPool, sizeClass } from "../../src/gpu/buffer_pool.ts";
import { copyElements, fill } from "../../kernels/fill.ts";
import { GpuError } from "../../src/errors.ts";
import { gpu, Rng } from "../_util.ts";

Deno.test("a WebGPU adapter is present and reported", async () => {
  const g = await gpu();
  const r = adapterReport(g);
  assert.ok(r.description.length > 0);
  assert.ok(r.limits.maxStorageBufferBindingSize! >= 128 * 1024 * 1024);
  assert.equal(r.limits.maxStorageBufferBindingSize, g.limits.maxStorageBufferBindingSize);
});

Deno.test("buffers round-trip f32, i32 and f16 bits exactly", async () => {
  const g = await gpu();
  const rng = new Rng(1);
  const f = rng.randn(1037);
  assert.deepEqual(await readTensor(g, tensorFrom(g, f)), f);
  const i = rng.ints(33, 1 << 30);
  assert.deepEqual(await readTensor(g, tensorFrom(g, i)), i);
  const h = new Uint16Array([0x3c00, 0xc000, 0x7bff]); // odd length: padded to 4 bytes
  assert.deepEqual(await readTensor(g, tensorFrom(g, h)), h);
});

Deno.test("fill and copy write every element inside one pass", async () => {
  const g = await gpu();
  const a = createTensor(g, [130], "f32");
  const b = createTensor(g, [300], "f32");
  const rec = new Recorder(g);
  fill(rec, a, 2.5);
  fill(rec, b, NaN);
  copyElements(rec, a, b, 130, 0, 7);
  rec.submit();
  const out = await readF32(g, b);
  for (let i = 0; i < 300; i++) {
    if (i >= 7 && i < 137) assert.equal(out[i], 2.5);
    else assert.ok(Number.isNaN(out[i]));
  }
});

Deno.test("the pipeline cache compiles once and bind groups are reused across replays", async () => {
  const g = await gpu();
  const t = createTensor(g, [64], "f32");
  const rec = new Recorder(g);
  fill(rec, t, 1);
  rec.submit();
  const pipelines = pipelinesCompiled;
  const groups = bindGroupsCreated;
  for (let i = 0; i < 5; i++) {
    fill(rec, t, 1);
    rec.submit();
  }
  assert.equal(pipelinesCompiled, pipelines);
  assert.equal(bindGroupsCreated, groups);
  assert.deepEqual(await readF32(g, t), new Float32Array(64).fill(1));
});

Deno.test("a bad shader fails with an error naming its kernel", async () => {
  const g = await gpu();
  const bad = defineKernel("deliberately_broken", { v: 1 }, ["write"], () => `
@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@compute @workgroup_size(1) fn main() { x[0] = undefined_thing; }`);
  await assert.rejects(() => compileKernel(g, bad), (e: unknown) => {
    assert.ok(e instanceof GpuError);
    assert.match(e.message, /deliberately_broken\|v=1/);
    return true;
  });
  g.pendingErrors.length = 0;
  throwIfFailed(g);
});

Deno.test("the buffer pool reuses buffers by size class", async () => {
  const g = await gpu();
  const pool = new BufferPool(g);
  assert.equal(sizeClass(1), 256);
  assert.equal(sizeClass(257), 512); // 256·√2 rounded up to a multiple of 256
  assert.ok(sizeClass(1000) >= 1000 && sizeClass(1000) < 1000 * 1.5);
  const a = pool.tensor([100, 3]);
  pool.releaseTensor(a);
  const b = pool.tensor([290]); // same class as 300 floats
  assert.equal(b.buffer, a.buffer);
  assert.equal(pool.createdBuffers, 1);
  pool.trim();
});

Deno.test("a tensor over the binding limit is used through bound row ranges", async () => {
  const g = await gpu();
  const rows = 4099;
  const cols = 8192; // 4099 x 8192 f32 = 128.1 MiB, over lavapipe's 128 MiB binding limit
  const big = createTensor(g, [rows, cols], "f32", "big");
  const parts = splitRows(g, big);
  const limit = g.limits.maxStorageBufferBindingSize;
  if (big.byteLength > limit) assert.ok(parts.length >= 2);
  // a dispatch binding the whole tensor must be refused with advice, not crash
  if (big.byteLength > limit) {
    const rec = new Recorder(g);
    assert.throws(() => fill(rec, big, 1), /binding limit.*splitRows/);
  }
  const rec = new Recorder(g);
  parts.forEach(({ tensor }, i) => fill(rec, tensor, i + 1));
  rec.submit();
  // read back the two rows around each boundary
  for (let i = 0; i < parts.length; i++) {
    const { rowStart, tensor } = parts[i]!;
    const edge = new Tensor(big.buffer, [2, cols], "f32", big.offset + Math.max(0, rowStart - 1) * cols * 4);
    const v = await readF32(g, edge);
    assert.equal(v[cols], i + 1); // first row of part i
    if (rowStart > 0) assert.equal(v[0], i); // last row of part i-1
    assert.equal(tensor.shape[1], cols);
  }
  big.buffer.destroy();
});

Deno.test("a destroyed device gives a clear error instead of hanging", async () => {
  // a separate device, so the shared one stays usable for other tests
  const adapter = await navigator.gpu.requestAdapter();
  assert.ok(adapter);
  const device = await adapter.requestDevice();
  const g = {
    device,
    info: adapter.info,
    hasF16: false,
    hasTimestamps: false,
    limits: device.limits,
    lostMessage: null as string | null,
    pendingErrors: [] as GpuError[],
  };
  device.lost.then((info) => g.lostMessage = `the GPU device was lost (${info.reason}): restart the process`);
  const t = createTensor(g, [16], "f32");
  device.destroy();
  await device.lost;
  const rec = new Recorder(g);
  assert.throws(
    () => fill(rec, t, 1),
    (e: unknown) => e instanceof GpuError && /device was lost/.test(e.message),
  );
  await assert.rejects(() => readF32(g, t), GpuError);
});
