/**
 * promptgate against HuggingFace PEFT 0.21: every case of tests/fixtures/golden (tiny random llama,
 * mistral-GQA and gpt2 models, some right-padded) — base logits, zero-init, logits and loss with a saved
 * adapter, every gradient, disabled adapters, greedy generation, and a 5-step AdamW trajectory.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { openSafetensors } from "../../src/io/safetensors.ts";
import {
  adapterState,
  addAdaptionPrompt,
  createOptimizer,
  deleteAdapter,
  disableAdapters,
  enableAdapters,
  forward,
  generate,
  loadAdapter,
  loadModel,
  loss,
  lossAndGradients,
  type Model,
} from "../../mod.ts";
import { assertClose } from "../_util.ts";

const ROOT = new URL("../fixtures/golden/", import.meta.url).pathname;
const CASES = ["llama_basic", "llama_gqa_pad", "mistral_gqa", "gpt2_basic", "gpt2_pad"];

interface Golden {
  meta: { adapter_len: number; adapter_layers: number; batch: number; seq: number; param_names: string[] };
  t: Map<string, Float32Array | Int32Array>;
}

async function readGolden(name: string): Promise<Golden> {
  const file = await openSafetensors(join(ROOT, name, "golden.safetensors"));
  const t = new Map<string, Float32Array | Int32Array>();
  for (const [key, info] of file.tensors) {
    if (info.dtype === "I32") t.set(key, new Int32Array((await file.readRaw(key)).slice().buffer));
    else t.set(key, await file.readTensor(key, "f32"));
  }
  file.close();
  const meta = JSON.parse(await Deno.readTextFile(join(ROOT, name, "meta.json")));
  return { meta, t };
}

function rows(a: Int32Array, B: number, T: number): number[][] {
  return Array.from({ length: B }, (_, b) => Array.from(a.slice(b * T, (b + 1) * T)));
}

function batchOf(g: Golden) {
  const { batch: B, seq: T } = g.meta;
  return {
    inputIds: rows(g.t.get("input_ids") as Int32Array, B, T),
    attentionMask: rows(g.t.get("attention_mask") as Int32Array, B, T),
    labels: rows(g.t.get("labels") as Int32Array, B, T),
  };
}

/** Logits of padded query rows are not compared: HF leaves them as whatever its kernel makes. */
function realRows(g: Golden, logits: Float32Array, V: number): Float32Array {
  const mask = g.t.get("attention_mask") as Int32Array;
  const out: number[] = [];
  mask.forEach((m, i) => {
    if (m) { for (let v = 0; v < V; v++) out.push(logits[i * V + v]!); }
  });
  return Float32Array.from(out);
}

for (const name of CASES) {
  Deno.test(`golden ${name}: base, zero-init, adapter logits and loss, gradients, disabled, generate, AdamW`, async (t) => {
    const g = await readGolden(name);
    const model: Model = await loadModel(join(ROOT, name, "model"));
    const V = model.config.vocabSize;
    const batch = batchOf(g);
    const f = (key: string) => g.t.get(key) as Float32Array;

    const base = await forward(model, batch);
    await t.step("base logits match PEFT's base model (≤ 1e-5 relative)", () => {
      assertClose(realRows(g, base.logits, V), realRows(g, f("base_logits"), V), 1e-5, "base_logits");
    });

    await t.step("a fresh adapter (gate 0) gives bit-identical logits", async () => {
      addAdaptionPrompt(model, {
        adapterLen: g.meta.adapter_len,
        adapterLayers: g.meta.adapter_layers,
        name: "fresh",
      });
      const zero = await forward(model, batch);
      assert.deepEqual(zero.logits, base.logits);
      assertClose(
        realRows(g, zero.logits, V),
        realRows(g, f("zero_init_logits"), V),
        1e-5,
        "zero_init_logits",
      );
      deleteAdapter(model, "fresh");
    });

    await loadAdapter(model, join(ROOT, name, "adapter"));
    await t.step("PEFT's saved adapter: logits ≤ 1e-5 and loss ≤ 1e-5 relative", async () => {
      const out = await forward(model, batch);
      assertClose(realRows(g, out.logits, V), realRows(g, f("logits"), V), 1e-5, "logits");
      assertClose([out.loss!], f("loss"), 1e-5, "loss");
      assertClose([await loss(model, batch)], f("loss"), 1e-5, "loss() without logits");
    });

    await t.step("gradients of every prompt and gate ≤ 1e-4 relative", async () => {
      const { loss, gradients } = await lossAndGradients(model, batch);
      assertClose([loss], f("loss"), 1e-5, "loss");
      for (const p of g.meta.param_names) assertClose(gradients[p]!, f(`grad.${p}`), 1e-4, `grad.${p}`);
    });

    await t.step("disabled adapters give the base model", async () => {
      disableAdapters(model);
      const off = await forward(model, batch);
      assert.deepEqual(off.logits, base.logits);
      assertClose(realRows(g, off.logits, V), realRows(g, f("disabled_logits"), V), 1e-5, "disabled_logits");
      enableAdapters(model);
    });

    await t.step("greedy generation with the KV cache equals PEFT's generate", async () => {
      const input = Array.from(g.t.get("generate_input") as Int32Array);
      const want = Array.from(g.t.get("generate_output") as Int32Array).slice(input.length);
      const got = await generate(model, input, { maxNewTokens: want.length });
      assert.deepEqual(got, want);
    });

    await t.step("5 AdamW steps: losses ≤ 1e-5, parameters ≤ 1e-4 relative", async () => {
      const opt = createOptimizer(model, { lr: 1e-2, betas: [0.9, 0.999], eps: 1e-8, weightDecay: 0 });
      const losses: number[] = [];
      for (let i = 0; i < 5; i++) losses.push(await opt.step(batch));
      assertClose(losses, f("train_losses"), 1e-5, "train_losses");
      const trained = await adapterState(model);
      for (const p of g.meta.param_names) assertClose(trained[p]!, f(`trained.${p}`), 1e-4, `trained.${p}`);
    });
  });
}
