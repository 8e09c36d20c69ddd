/**
 * checkActivationsFit: its estimate is byte-exact against what createActivations allocates (golden llama,
 * llama with GQA, gpt2; training from several layers, with and without gradient checkpointing, and
 * inference; f32 and f16 activations), and on a device with small limits
 * it refuses a batch with a message whose suggested batch size and sequence length do fit.
 */
import assert from "node:assert/strict";
import { getGpu, GpuError } from "../../mod.ts";
import { loadModelConfig } from "../../src/io/hf_config.ts";
import { createActivations, destroyActivations } from "../../src/models/activations.ts";
import { checkActivationsFit } from "../../src/models/memory.ts";
import { gpuBytesAllocated } from "../../src/gpu/tensor.ts";

const GOLDEN = new URL("../fixtures/golden/", import.meta.url).pathname;

Deno.test("the estimate equals the bytes createActivations allocates (exact)", async () => {
  const gpu = await getGpu();
  for (const name of ["llama_basic", "llama_gqa_pad", "gpt2_basic"]) {
    const config = await loadModelConfig(`${GOLDEN}${name}/model`);
    for (
      const [B, T, training, saveFrom, ckpt] of [
        [2, 32, true, 1, false],
        [3, 17, true, 0, false],
        [1, 5, false, 0, false],
        [2, 32, true, 1, true],
        [3, 17, true, 0, true],
        [1, 5, false, 0, true],
      ] as const
    ) {
      for (const dtype of ["f32", "f16"] as const) {
        const est = checkActivationsFit(gpu, config, B, T, training, saveFrom, dtype, ckpt);
        const before = gpuBytesAllocated;
        const acts = createActivations(gpu, config, B, T, training, saveFrom, dtype, ckpt);
        const allocated = gpuBytesAllocated - before;
        destroyActivations(acts);
        const what = `${name} ${B}x${T} ${dtype} training=${training} from ${saveFrom} checkpointing=${ckpt}`;
        assert.equal(est.totalBytes, allocated, what);
        assert.equal(est.rows, B * T);
        if (dtype === "f16") {
          const f32 = checkActivationsFit(gpu, config, B, T, training, saveFrom, "f32").totalBytes;
          assert.ok(est.totalBytes < 0.8 * f32, `${what}: f16 activations ${est.totalBytes} vs f32 ${f32}`);
        }
      }
    }
  }
});

Deno.test("too large a batch is refused before allocating, naming the buffer and sizes that fit", () => {
  const gpu = {
    limits: { maxBufferSize: 2 ** 30, maxStorageBufferBindingSize: 2 ** 27 },
    info: { description: "a small device" },
  };
  const config = {
    family: "llama",
    hiddenSize: 4096,
    intermediateSize: 11008,
    numLayers: 32,
    numHeads: 32,
    numKvHeads: 8,
    headDim: 128,
  };
  // The widest buffers are (N, I) f32: 2^27 / (11008 · 4) = 3048 rows.
  let message = "";
  try {
    checkActivationsFit(gpu, config, 8, 2048, true, 24);
  } catch (e) {
    assert.ok(e instanceof GpuError);
    message = e.message;
  }
  assert.match(
    message,
    /a batch of 8 × 2048 tokens needs a 688\.0 MiB activation buffer \(shared\.g, 16384 rows × 11008 f32\)/,
  );
  assert.match(
    message,
    /a small device allows at most 128\.0 MiB per buffer \(maxStorageBufferBindingSize\)/,
  );
  assert.match(
    message,
    /At most 3048 tokens per step fit: use --batch-size 1 at --seq-len 2048, or --seq-len 381 at --batch-size 8/,
  );
  assert.equal(checkActivationsFit(gpu, config, 1, 2048, true, 24).maxRows, 3048);
  assert.equal(checkActivationsFit(gpu, config, 8, 381, true, 24).largest.bytes, 8 * 381 * 11008 * 4);
  assert.throws(
    () => checkActivationsFit(gpu, config, 1, 3049, true, 24),
    /--seq-len 3048 at --batch-size 1/,
  );
  // maxBufferSize below the binding limit is the one named.
  const g2 = { ...gpu, limits: { maxBufferSize: 2 ** 26, maxStorageBufferBindingSize: 2 ** 27 } };
  assert.throws(() => checkActivationsFit(g2, config, 1, 2048, false, 0), /per buffer \(maxBufferSize\)/);
  assert.throws(() => checkActivationsFit(gpu, config, 0, 2048, true, 0), GpuError);
});
