/**
 * The whole training pipeline on the tiny golden llama (256-token vocabulary, a byte tokenizer): loss goes
 * down, the run folder is complete and its adapter loads back, an interrupted and resumed run gives
 * bit-identical losses and weights (also when the resumed half turns on gradient checkpointing), and
 * `generate` streams with the trained adapter.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { loadAdapter, loadModel } from "../../mod.ts";
import { train, type TrainConfig } from "../../src/train/trainer.ts";
import { TRAIN_DEFAULTS } from "../../src/cli/train.ts";
import { main as generateMain } from "../../src/cli/generate.ts";
import { byteTokenizer, byteTokenizerJson } from "./_byte_tokenizer.ts";

const MODEL = new URL("../fixtures/golden/llama_basic/model", import.meta.url).pathname;

async function setup(): Promise<{ data: string; base: TrainConfig }> {
  const dir = await Deno.makeTempDir();
  const data = join(dir, "data.txt");
  await Deno.writeTextFile(data, "the cat sat on the mat. ".repeat(60));
  const base: TrainConfig = {
    ...TRAIN_DEFAULTS,
    model: MODEL,
    data,
    evalSplit: 0.1,
    seqLen: 32,
    batchSize: 2,
    lr: 0.05,
    warmupSteps: 2,
    maxSteps: 8,
    evalEvery: 4,
    saveEvery: 2,
    adapterLayers: 2,
    samplePrompts: ["the cat"],
    sampleTokens: 8,
    out: join(dir, "run"),
  };
  return { data, base };
}

const silent = { tokenizer: byteTokenizer, handleSignals: false };

Deno.test("a short run learns, leaves a complete run folder, and its adapter loads back", async () => {
  const { base } = await setup();
  const losses: number[] = [];
  const s = await train({ ...base, maxSteps: 16 }, { ...silent, onStep: (_, l) => losses.push(l) });
  assert.equal(s.steps, 16);
  assert.ok(s.evalAfter! < s.evalBefore!, `eval ${s.evalBefore} → ${s.evalAfter}`);
  const mean = (a: number[]) => a.reduce((x, y) => x + y, 0) / a.length;
  assert.ok(mean(losses.slice(-4)) < mean(losses.slice(0, 4)), losses.join(" "));
  for (
    const f of [
      "adapter_config.json",
      "adapter_model.safetensors",
      "metrics.jsonl",
      "loss.svg",
      "loss.png",
      "samples.md",
      "run.json",
      "checkpoint/adapter_model.safetensors",
      "checkpoint/optimizer.safetensors",
      "checkpoint/trainer_state.json",
    ]
  ) await Deno.stat(join(base.out, f));
  const metrics = (await Deno.readTextFile(join(base.out, "metrics.jsonl"))).trim().split("\n").map((l) =>
    JSON.parse(l)
  );
  assert.equal(metrics.length, 17);
  assert.ok(metrics.every((m) => "step" in m && "loss" in m && "lr" in m && "tokens_per_s" in m));
  assert.ok((await Deno.readTextFile(join(base.out, "samples.md"))).includes("After 16 steps"));
  const run = JSON.parse(await Deno.readTextFile(join(base.out, "run.json")));
  assert.match(run.data[0].sha256, /^[0-9a-f]{64}$/);
  const model = await loadModel(MODEL);
  await loadAdapter(model, base.out);
  await loadAdapter(model, join(base.out, "checkpoint"), { name: "ckpt" });
});

Deno.test("interrupting and resuming gives bit-identical losses and adapter weights", async () => {
  const { base } = await setup();
  const straight: number[] = [];
  await train(base, { ...silent, onStep: (_, l) => straight.push(l) });
  const out2 = base.out + "-resumed";
  const resumed: number[] = [];
  const first = await train({ ...base, out: out2 }, {
    ...silent,
    interruptAfter: 3,
    onStep: (_, l) => resumed.push(l),
  });
  assert.equal(first.interrupted, true);
  assert.equal(first.steps, 3);
  await assert.rejects(train({ ...base, out: out2 }, silent), /already holds a run/);
  await assert.rejects(
    train({ ...base, out: out2, resume: true, lr: 0.1 }, silent),
    /was started with lr=0.05/,
  );
  // the second half with gradient checkpointing (a setting a resume may change: the steps are bit-identical)
  const checkpointed: boolean[] = [];
  await train({ ...base, out: out2, resume: true, gradientCheckpointing: true }, {
    ...silent,
    onStep: (_, l) => resumed.push(l),
    beforeStep: (_, model) => void checkpointed.push(model.gradientCheckpointing),
  });
  assert.deepEqual(checkpointed, [true, true, true, true, true]);
  assert.deepEqual(resumed, straight);
  const a = await Deno.readFile(join(base.out, "checkpoint", "adapter_model.safetensors"));
  const b = await Deno.readFile(join(out2, "checkpoint", "adapter_model.safetensors"));
  assert.deepEqual(a, b);
  const ma = (await Deno.readTextFile(join(base.out, "metrics.jsonl"))).split("\n").map((l) =>
    l && JSON.parse(l).loss
  );
  const mb = (await Deno.readTextFile(join(out2, "metrics.jsonl"))).split("\n").map((l) =>
    l && JSON.parse(l).loss
  );
  assert.deepEqual(ma, mb);
});

Deno.test("grad accumulation and an eval set from --eval-data run; a seq-len beyond the context is refused", async () => {
  const { base, data } = await setup();
  const s = await train({ ...base, gradAccum: 2, maxSteps: 2, evalData: data, sampleTokens: 0 }, silent);
  assert.equal(s.steps, 2);
  await assert.rejects(
    train({ ...base, out: base.out + "2", seqLen: 4096 }, silent),
    /--seq-len 4096 is longer than the model's context \(128 positions\)/,
  );
});

Deno.test("generate streams the continuation with a trained adapter", async () => {
  const { base } = await setup();
  await train({ ...base, maxSteps: 2, sampleTokens: 0 }, silent);
  const modelDir = await Deno.makeTempDir();
  for (const f of ["config.json", "model.safetensors", "generation_config.json"]) {
    await Deno.copyFile(join(MODEL, f), join(modelDir, f));
  }
  await Deno.writeTextFile(join(modelDir, "tokenizer.json"), JSON.stringify(byteTokenizerJson()));
  const chunks: string[] = [];
  const code = await generateMain(
    ["--model", modelDir, "--adapter", base.out, "--prompt", "the cat", "--max-new-tokens", "12"],
    (t) => chunks.push(t),
  );
  assert.equal(code, 0);
  assert.ok(chunks.length > 2, `streamed in ${chunks.length} pieces`);
  assert.ok(chunks.join("").startsWith("the cat"));
  assert.equal(
    await generateMain(
      ["--model", modelDir, "--no-adapter", "--prompt", "x", "--max-new-tokens", "3"],
      () => {},
    ),
    0,
  );
});
