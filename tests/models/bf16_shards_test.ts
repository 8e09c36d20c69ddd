/**
 * A checkpoint stored as bf16 shards (`model.safetensors.index.json` + two shard files), made in the
 * test from a golden f32 model, loads and gives the f32 model's logits within bf16 rounding — and
 * exactly (≤ 1e-5) the logits of an f32 checkpoint holding the same bf16-rounded values.
 */
import { join } from "../../src/_std.ts";
import { openSafetensors, type TensorToWrite, writeSafetensors } from "../../src/io/safetensors.ts";
import { bf16ArrayToF32, f32ArrayToBf16 } from "../../src/io/dtype.ts";
import { forward, loadModel } from "../../mod.ts";
import { assertClose } from "../_util.ts";

const GOLDEN = new URL("../fixtures/golden/llama_gqa_pad/model", import.meta.url).pathname;
const BATCH = { inputIds: [[1, 5, 9, 200, 31, 77, 4], [8, 8, 19, 3, 250, 2, 100]] };

Deno.test("bf16 shards load and match the f32 model within bf16 rounding", async () => {
  const src = await openSafetensors(join(GOLDEN, "model.safetensors"));
  const sharded = await Deno.makeTempDir();
  const rounded = await Deno.makeTempDir();
  const names = [...src.tensors.keys()];
  const shards: Record<string, TensorToWrite>[] = [{}, {}];
  const asF32: Record<string, TensorToWrite> = {};
  const weightMap: Record<string, string> = {};
  for (const [i, name] of names.entries()) {
    const info = src.tensors.get(name)!;
    const bits = f32ArrayToBf16(await src.readTensor(name, "f32"));
    shards[i % 2]![name] = { dtype: "BF16", shape: info.shape, data: bits };
    asF32[name] = { dtype: "F32", shape: info.shape, data: bf16ArrayToF32(bits) };
    weightMap[name] = `model-0000${(i % 2) + 1}-of-00002.safetensors`;
  }
  src.close();
  for (let s = 0; s < 2; s++) {
    await writeSafetensors(join(sharded, `model-0000${s + 1}-of-00002.safetensors`), shards[s]!, {
      format: "pt",
    });
  }
  await Deno.writeTextFile(
    join(sharded, "model.safetensors.index.json"),
    JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap }),
  );
  await writeSafetensors(join(rounded, "model.safetensors"), asF32, { format: "pt" });
  for (const dir of [sharded, rounded]) {
    await Deno.copyFile(join(GOLDEN, "config.json"), join(dir, "config.json"));
  }

  const f32 = (await forward(await loadModel(GOLDEN), BATCH)).logits;
  const bf16 = (await forward(await loadModel(sharded), BATCH)).logits;
  const same = (await forward(await loadModel(rounded), BATCH)).logits;
  assertClose(bf16, same, 1e-5, "bf16 shards vs f32 checkpoint of the same rounded values");
  assertClose(bf16, f32, 3e-2, "bf16 shards vs the original f32 model (bf16 keeps 8 bits of mantissa)");
  await Deno.remove(sharded, { recursive: true });
  await Deno.remove(rounded, { recursive: true });
});
