/**
 * Memory-copy bandwidth: `copyElements` (kernels/fill.ts) over buffers of growing size, GPU time from
 * timestamp queries, reported as GB/s = 2 * bytes / time (each byte is read once and written once). This
 * is the ceiling the bandwidth-bound kernels (matrix-vector, norms, element-wise) are measured against.
 * Big buffers run only with `PROMPTGATE_BENCH_FULL=1` (the default on a real GPU).
 *
 * Run: `deno bench --allow-read --allow-write --allow-env bench/copy_bench.ts`
 *
 * @module
 */

import { benchFull } from "./_shared.ts";
import { adapterReport, getGpu } from "../src/gpu/device.ts";
import { Recorder, runOps } from "../src/gpu/recorder.ts";
import { createTensor } from "../src/gpu/tensor.ts";
import { timeOps } from "../src/gpu/timing.ts";
import { copyElements, fill } from "../kernels/fill.ts";

const gpu = await getGpu();
const full = benchFull(gpu);

const MiB = 1024 * 1024;
const limit = Math.min(gpu.limits.maxStorageBufferBindingSize, gpu.limits.maxBufferSize);
const sizes = (full ? [16 * MiB, 64 * MiB, 256 * MiB, 1024 * MiB] : [1 * MiB, 8 * MiB]).filter((b) =>
  b <= limit
);

const rows: Record<string, string | number>[] = [];
const benchOps: { name: string; ops: ReturnType<Recorder["take"]> }[] = [];
for (const bytes of sizes) {
  const n = bytes / 4;
  const src = createTensor(gpu, [n], "f32", "copy src");
  const dst = createTensor(gpu, [n], "f32", "copy dst");
  const init = new Recorder(gpu);
  fill(init, src, 1.5);
  init.submit();
  const rec = new Recorder(gpu);
  copyElements(rec, src, dst);
  const ops = rec.take();
  await timeOps(gpu, ops, 2); // warm-up
  const repeats = full ? 20 : 5;
  const { ms, timestamps } = await timeOps(gpu, ops, repeats);
  rows.push({
    MiB: bytes / MiB,
    "GPU ms": Number(ms.toFixed(4)),
    "GB/s": Math.round((2 * bytes) / ms / 1e6),
    clock: timestamps ? "timestamps" : "wall",
  });
  if (bytes === sizes[sizes.length - 1]) benchOps.push({ name: `copy ${bytes / MiB} MiB`, ops });
  else {
    src.buffer.destroy();
    dst.buffer.destroy();
  }
}
console.log(`copyElements on ${adapterReport(gpu).description} (${full ? "full" : "small"} sizes)`);
console.table(rows);

for (const { name, ops } of benchOps) {
  Deno.bench(name, async () => {
    runOps(gpu, ops);
    await gpu.device.queue.onSubmittedWorkDone();
  });
}
