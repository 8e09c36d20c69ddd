import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { parseTrainArgs, resolveTrainConfig, trainHelp } from "../../src/cli/train.ts";
import { parseGenerateArgs } from "../../src/cli/generate.ts";
import { prepareOutDir } from "../../src/train/trainer.ts";
import type { TrainConfig } from "../../src/train/trainer.ts";

Deno.test("--help lists every flag of issue 7 with defaults", () => {
  const help = trainHelp();
  for (
    const f of [
      "model",
      "revision",
      "data",
      "template",
      "mask-prompt",
      "adapter-len",
      "adapter-layers",
      "gate",
      "seq-len",
      "pack",
      "batch-size",
      "grad-accum",
      "lr",
      "weight-decay",
      "warmup-steps",
      "schedule",
      "max-grad-norm",
      "epochs",
      "max-steps",
      "eval-split",
      "eval-data",
      "eval-every",
      "save-every",
      "out",
      "resume",
      "overwrite",
      "seed",
      "dtype",
      "init-adapter",
      "quiet",
      "json",
      "on-bad-line",
      "skip-nonfinite",
      "gradient-checkpointing",
    ]
  ) assert.ok(help.includes(`--${f}`), f);
  assert.ok(help.includes("[default: 10]"));
});

Deno.test("train arguments: values, negation and errors that say what to do", () => {
  const a = parseTrainArgs([
    "--lr",
    "0.01",
    "--no-mask-prompt",
    "--betas",
    "0.9,0.99",
    "--sample-prompt",
    "a",
    "--sample-prompt",
    "b",
    "--gradient-checkpointing",
  ]);
  assert.deepEqual(a.explicit, {
    lr: 0.01,
    maskPrompt: false,
    betas: [0.9, 0.99],
    samplePrompts: ["a", "b"],
    gradientCheckpointing: true,
  });
  assert.throws(() => parseTrainArgs(["--bogus"]), /--help/);
  assert.throws(() => parseTrainArgs(["--lr", "fast"]), /--lr needs a number/);
  assert.throws(() => parseTrainArgs(["--seq-len", "1.5"]), /--seq-len needs an integer/);
  assert.throws(() => parseTrainArgs(["--template", "jinja"]), /one of alpaca, chat, none/);
  assert.throws(() => parseTrainArgs(["--betas", "0.9"]), /two numbers/);
  assert.throws(() => parseTrainArgs(["--batch-size", "-3"]), /(must not be negative|--help)/);
  assert.throws(() => parseTrainArgs(["--no-overwrite"]), /not a flag/);
});

Deno.test("no --data gives the Moby-Dick profile; --data gives plain defaults", async () => {
  const d = await resolveTrainConfig({});
  assert.ok(d.data.endsWith("moby-dick-train.txt"));
  assert.ok(d.evalData?.endsWith("moby-dick-eval.txt"));
  assert.ok(d.out.startsWith("runs/"));
  const u = await resolveTrainConfig({ data: "x.jsonl" });
  assert.equal(u.evalData, undefined);
  assert.equal(u.maxSteps, 0);
});

Deno.test("an output folder holding a run is refused unless --resume or --overwrite", async () => {
  const out = await Deno.makeTempDir();
  await Deno.writeTextFile(join(out, "run.json"), "{}");
  await Deno.writeTextFile(join(out, "notes.txt"), "mine");
  const config = { out, resume: false, overwrite: false } as TrainConfig;
  await assert.rejects(
    prepareOutDir(config),
    /already holds a run \(run\.json\); pass --resume .* --overwrite/,
  );
  await assert.rejects(prepareOutDir({ ...config, resume: true }), /no complete checkpoint/);
  await prepareOutDir({ ...config, overwrite: true });
  assert.equal(await Deno.readTextFile(join(out, "notes.txt")), "mine"); // only run files are removed
});

Deno.test("generate arguments", () => {
  const g = parseGenerateArgs([
    "--adapter",
    "a",
    "--adapter",
    "b",
    "--prompt",
    "hi",
    "--stop",
    "\n\n",
    "--top-p",
    "0.9",
  ]);
  assert.deepEqual(g.adapters, ["a", "b"]);
  assert.equal(g.topP, 0.9);
  assert.throws(() => parseGenerateArgs(["--top-p", "2"]), /\(0, 1\]/);
  assert.throws(() => parseGenerateArgs(["--no-adapter", "--adapter", "a"]), /contradict/);
  assert.throws(() => parseGenerateArgs(["--template", "x"]), /alpaca, chat or none/);
  assert.throws(() => parseGenerateArgs(["--max-new-tokens=-1"]), /non-negative integer/);
});
