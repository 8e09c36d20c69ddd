/**
 * The adapter API behaves as PEFT's own tests (tests/test_adaption_prompt.py) expect: trainable names
 * and counts, save/load of all or selected adapters in PEFT's layout, reloaded weights equal to saved
 * ones, add/set/disable/enable/delete sequences, adding while disabled, f16 inference, gate variants,
 * and clear errors for adapters that do not fit.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import {
  AdapterError,
  adapterState,
  addAdaptionPrompt,
  createOptimizer,
  deleteAdapter,
  disableAdapters,
  enableAdapters,
  forward,
  loadAdapter,
  loadModel,
  lossAndGradients,
  type Model,
  saveAdapter,
  setAdapter,
} from "../../mod.ts";
import { writeSafetensors } from "../../src/io/safetensors.ts";
import { assertClose } from "../_util.ts";

const ROOT = new URL("../fixtures/golden/", import.meta.url).pathname;
const BATCH = { inputIds: [[3, 14, 15, 92, 65, 35, 89, 79]], labels: [[3, 14, 15, 92, 65, 35, 89, 79]] };

async function llama(): Promise<Model> {
  return await loadModel(join(ROOT, "llama_basic", "model"), { maxSeqLen: 32 });
}

async function trainSome(model: Model, steps = 2): Promise<void> {
  const opt = createOptimizer(model, { lr: 0.05, weightDecay: 0 });
  for (let i = 0; i < steps; i++) await opt.step(BATCH);
}

Deno.test("trainable parameters: one prompt and one gate per adapted layer, PEFT's names and sizes", async () => {
  const model = await llama();
  addAdaptionPrompt(model, { adapterLen: 4, adapterLayers: 2 });
  const state = await adapterState(model);
  assert.deepEqual(Object.keys(state).sort(), [
    "base_model.model.model.layers.1.self_attn.adaption_gate",
    "base_model.model.model.layers.1.self_attn.adaption_prompt",
    "base_model.model.model.layers.2.self_attn.adaption_gate",
    "base_model.model.model.layers.2.self_attn.adaption_prompt",
  ]);
  const count = Object.values(state).reduce((n, t) => n + t.length, 0);
  assert.equal(count, 2 * (4 * 64 + 1)); // PEFT: adapter_layers * (adapter_len * hidden + 1)
  assert.ok(state["base_model.model.model.layers.1.self_attn.adaption_gate"]!.every((g) => g === 0));
  const { gradients } = await lossAndGradients(model, BATCH);
  assert.deepEqual(Object.keys(gradients).sort(), Object.keys(state).sort());
});

Deno.test("save and load: all adapters, selected adapters, reloaded weights equal saved ones", async () => {
  const dir = await Deno.makeTempDir();
  const model = await llama();
  addAdaptionPrompt(model, { adapterLen: 4, adapterLayers: 2, seed: 1 });
  await trainSome(model);
  addAdaptionPrompt(model, { adapterLen: 2, adapterLayers: 3, name: "other", seed: 2 });
  await trainSome(model);
  await saveAdapter(model, dir);
  // PEFT layout: default in the folder itself, others in a subfolder of their name
  for (const f of ["adapter_config.json", "adapter_model.safetensors", "other/adapter_config.json"]) {
    assert.ok((await Deno.stat(join(dir, f))).isFile, f);
  }
  const reloaded = await llama();
  await loadAdapter(reloaded, dir);
  await loadAdapter(reloaded, join(dir, "other"), { name: "other" });
  for (const name of ["default", "other"]) {
    assert.deepEqual(await adapterState(reloaded, name), await adapterState(model, name), name);
    setAdapter(model, name);
    setAdapter(reloaded, name);
    assert.deepEqual((await forward(reloaded, BATCH)).logits, (await forward(model, BATCH)).logits);
  }
  // never one adapter's weights under another's name (PEFT #3638): values differ per folder
  const a = await adapterState(reloaded, "default");
  const b = await adapterState(reloaded, "other");
  assert.notDeepEqual(
    a["base_model.model.model.layers.2.self_attn.adaption_gate"],
    b["base_model.model.model.layers.2.self_attn.adaption_gate"],
  );
  const selected = await Deno.makeTempDir();
  await saveAdapter(model, selected, { names: ["other"] });
  await assert.rejects(() => Deno.stat(join(selected, "adapter_config.json")));
  assert.ok((await Deno.stat(join(selected, "other", "adapter_model.safetensors"))).isFile);
  const cfg = JSON.parse(await Deno.readTextFile(join(selected, "other", "adapter_config.json")));
  assert.equal(cfg.peft_type, "ADAPTION_PROMPT");
  assert.equal(cfg.adapter_len, 2);
  assert.equal(cfg.adapter_layers, 3);
  await Deno.remove(dir, { recursive: true });
  await Deno.remove(selected, { recursive: true });
});

Deno.test("add, set, disable, enable and delete in sequence; adding and setting while disabled", async () => {
  const model = await llama();
  const base = (await forward(model, BATCH)).logits;
  addAdaptionPrompt(model, { adapterLen: 4, adapterLayers: 2, name: "a" });
  await trainSome(model);
  const withA = (await forward(model, BATCH)).logits;
  assert.notDeepEqual(withA, base);
  disableAdapters(model);
  assert.deepEqual((await forward(model, BATCH)).logits, base);
  addAdaptionPrompt(model, { adapterLen: 3, adapterLayers: 1, name: "b" }); // added while disabled
  assert.equal(model.active, "b");
  assert.deepEqual((await forward(model, BATCH)).logits, base); // still disabled
  setAdapter(model, "a");
  assert.deepEqual((await forward(model, BATCH)).logits, base);
  enableAdapters(model);
  assert.deepEqual((await forward(model, BATCH)).logits, withA);
  setAdapter(model, "b");
  assert.deepEqual((await forward(model, BATCH)).logits, base); // b is fresh: gate 0
  deleteAdapter(model, "b");
  assert.equal(model.active, null);
  assert.deepEqual((await forward(model, BATCH)).logits, base);
  setAdapter(model, "a");
  assert.deepEqual((await forward(model, BATCH)).logits, withA);
});

Deno.test("errors, not silence: too many layers, duplicate names, missing adapter, misfit adapters", async () => {
  const model = await llama();
  assert.throws(() => addAdaptionPrompt(model, { adapterLen: 4, adapterLayers: 4 }), /only 3 layers/);
  // more prompt tokens than the adapter attention kernels take: refused up front, with the limit
  assert.throws(
    () => addAdaptionPrompt(model, { adapterLen: 65, adapterLayers: 1, name: "long" }),
    /adapter_len 65 is more than .* at most 64/,
  );
  assert.equal(model.adapters.has("long"), false);
  addAdaptionPrompt(model, { adapterLen: 4, adapterLayers: 2 });
  assert.throws(() => addAdaptionPrompt(model, { adapterLen: 4, adapterLayers: 2 }), /already exists/);
  assert.throws(() => setAdapter(model, "nope"), AdapterError);
  assert.throws(
    () => addAdaptionPrompt(model, { adapterLen: 4, adapterLayers: 1, name: "../x" }),
    /not allowed/,
  );
  // a gpt2 adapter on a llama model: another family
  await assert.rejects(
    () => loadAdapter(model, join(ROOT, "gpt2_basic", "adapter"), { name: "g" }),
    (e: unknown) => {
      assert.ok(e instanceof AdapterError);
      assert.match(e.message, /transformer\.h\.\d\.attn/);
      assert.match(e.message, /llama/);
      return true;
    },
  );
  // the gpt2_pad adapter has 4 layers; gpt2_basic has 3
  const gpt2 = await loadModel(join(ROOT, "gpt2_basic", "model"));
  await assert.rejects(
    () => loadAdapter(gpt2, join(ROOT, "gpt2_pad", "adapter")),
    /4 but the model has only 3|adapter_layers/,
  );
  // an adapter of another hidden size (32 instead of 64), written as PEFT would
  const dir = await Deno.makeTempDir();
  const cfg = {
    peft_type: "ADAPTION_PROMPT",
    adapter_len: 2,
    adapter_layers: 1,
    target_modules: "self_attn",
  };
  await Deno.writeTextFile(join(dir, "adapter_config.json"), JSON.stringify(cfg));
  await writeSafetensors(join(dir, "adapter_model.safetensors"), {
    "base_model.model.model.layers.2.self_attn.adaption_prompt": {
      dtype: "F32",
      shape: [1, 2, 32],
      data: new Float32Array(64),
    },
    "base_model.model.model.layers.2.self_attn.adaption_gate": {
      dtype: "F32",
      shape: [1],
      data: new Float32Array(1),
    },
  });
  await assert.rejects(() => loadAdapter(model, dir, { name: "narrow" }), (e: unknown) => {
    assert.ok(e instanceof AdapterError);
    assert.match(e.message, /\[1,2,32\].*needs \[1,2,64\]/);
    return true;
  });
  assert.equal(model.adapters.has("narrow"), false);
  // a PEFT adapter with adapter_len 100 (PEFT allows it): refused at load with the limit
  await Deno.writeTextFile(join(dir, "adapter_config.json"), JSON.stringify({ ...cfg, adapter_len: 100 }));
  await assert.rejects(() => loadAdapter(model, dir, { name: "long" }), /adapter_len 100 .* at most 64/);
  assert.equal(model.adapters.has("long"), false);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("f16 inference stays close to f32 (≤ 1e-2 relative) and zero-init is exact in f16 too", async (t) => {
  const f32 = await llama();
  if (!f32.gpu.hasF16) {
    throw new Error(
      "this GPU lacks shader-f16; promptgate's CI device (lavapipe) has it, so this should not happen",
    );
  }
  const f16 = await loadModel(join(ROOT, "llama_basic", "model"), { dtype: "f16", maxSeqLen: 32 });
  await loadAdapter(f32, join(ROOT, "llama_basic", "adapter"));
  await loadAdapter(f16, join(ROOT, "llama_basic", "adapter"));
  const a = (await forward(f32, BATCH)).logits;
  const b = (await forward(f16, BATCH)).logits;
  assertClose(b, a, 1e-2, "f16 logits");
  await t.step("zero gate in f16", async () => {
    disableAdapters(f16);
    const base = (await forward(f16, BATCH)).logits;
    enableAdapters(f16);
    addAdaptionPrompt(f16, { adapterLen: 2, adapterLayers: 2, name: "z" });
    assert.deepEqual((await forward(f16, BATCH)).logits, base);
  });
});

Deno.test("gate variants: per-head and per-head-tanh start exact, train, and round-trip with our config field", async () => {
  for (const gate of ["per-head", "per-head-tanh"] as const) {
    const model = await llama();
    const base = (await forward(model, BATCH)).logits;
    addAdaptionPrompt(model, { adapterLen: 3, adapterLayers: 2, gate });
    assert.deepEqual((await forward(model, BATCH)).logits, base);
    const st = await adapterState(model);
    assert.equal(
      st["base_model.model.model.layers.2.self_attn.adaption_gate"]!.length,
      model.config.numHeads,
    );
    await trainSome(model, 3);
    const trained = await adapterState(model);
    assert.ok(trained["base_model.model.model.layers.2.self_attn.adaption_gate"]!.some((g) => g !== 0));
    const dir = await Deno.makeTempDir();
    await saveAdapter(model, dir);
    assert.equal(JSON.parse(await Deno.readTextFile(join(dir, "adapter_config.json"))).promptgate_gate, gate);
    const again = await llama();
    await loadAdapter(again, dir);
    assert.deepEqual(await adapterState(again), trained);
    await Deno.remove(dir, { recursive: true });
  }
});
