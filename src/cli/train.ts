/**
 * `deno task train`: argument parsing, `--help`, and printing around {@link train}. With no flags it
 * fine-tunes the embedded default model (`default/model`) on Moby-Dick (`default/data`), with held-out
 * chapters as eval data, in a few minutes on a CPU. Every flag is listed with its default by `--help`.
 *
 * @module
 */

import { parseArgs } from "../_std.ts";
import { join } from "../_std.ts";
import { PromptgateError, UnsupportedConfigError } from "../errors.ts";
import { DEFAULT_MODEL, train, type TrainConfig } from "../train/trainer.ts";
import { Reporter } from "../train/metrics.ts";

const DATA_DIR = new URL("../../default/data/", import.meta.url).pathname;
/** The default training data (Moby-Dick without the held-out chapters). */
export const DEFAULT_DATA: string = join(DATA_DIR, "moby-dick-train.txt");
/** The default eval data (every 10th chapter of Moby-Dick). */
export const DEFAULT_EVAL_DATA: string = join(DATA_DIR, "moby-dick-eval.txt");

type Kind = "string" | "number" | "int" | "boolean" | "list";
interface Flag {
  key: keyof TrainConfig | "quiet" | "json" | "help" | "betas";
  kind: Kind;
  help: string;
  def?: string;
  choices?: readonly string[];
  negatable?: boolean;
  short?: string;
}

/** Every flag: name → what it sets, its type, help and default (as shown by --help). */
const FLAGS: Record<string, Flag> = {
  "model": {
    key: "model",
    kind: "string",
    help: "model folder or HF hub id",
    def: "default/model (embedded)",
  },
  "revision": { key: "revision", kind: "string", help: "hub revision (branch, tag or commit) of --model" },
  "dtype": { key: "dtype", kind: "string", help: "compute dtype", def: "f32", choices: ["f32", "f16"] },
  "data": {
    key: "data",
    kind: "string",
    help:
      "training data: a .jsonl/.json/.txt file or a folder of them; records {instruction, input?, output}, " +
      "{prompt, completion} or {text}",
    def: "default/data/moby-dick-train.txt",
  },
  "eval-data": {
    key: "evalData",
    kind: "string",
    help: "eval data (else --eval-split of the training rows)",
    def: "default/data/moby-dick-eval.txt with the default data",
  },
  "eval-split": {
    key: "evalSplit",
    kind: "number",
    help: "share of training rows held out for eval when no --eval-data",
    def: "0.05",
  },
  "eval-max-rows": {
    key: "evalMaxRows",
    kind: "int",
    help: "evaluate on at most this many rows (0 = all)",
    def: "0 (16 with the default data)",
  },
  "template": {
    key: "template",
    kind: "string",
    help: "prompt template for instruction data: alpaca; chat (the tokenizer's chat template when it is a " +
      "chatml, llama-2 or llama-3 form, else a simple <|user|>/<|assistant|> role-tagged form; Jinja is never " +
      "run); none (prompt and response as they are)",
    def: "alpaca",
    choices: ["alpaca", "chat", "none"],
  },
  "mask-prompt": {
    key: "maskPrompt",
    kind: "boolean",
    negatable: true,
    help: "loss on the response only (instruction data); --no-mask-prompt trains on the prompt too",
    def: "true",
  },
  "pack": {
    key: "pack",
    kind: "boolean",
    negatable: true,
    help: "pack examples into full rows (--no-pack: one example a row, truncated)",
    def: "pack plain text, not instruction data",
  },
  "on-bad-line": {
    key: "onBadLine",
    kind: "string",
    help: "a bad data line: stop (error) or skip with a warning",
    def: "error",
    choices: ["error", "skip"],
  },
  "adapter-len": {
    key: "adapterLen",
    kind: "int",
    help: "adaption prompt tokens per layer, 1 to 64 (LLaMA-Adapter: 10)",
    def: "10",
  },
  "adapter-layers": {
    key: "adapterLayers",
    kind: "int",
    help: "adapted top layers (0 = min(layers, 8))",
    def: "0 (2 with the default data)",
  },
  "gate": {
    key: "gate",
    kind: "string",
    help: "gate form",
    def: "scalar",
    choices: ["scalar", "per-head", "per-head-tanh"],
  },
  "adapter-name": { key: "adapterName", kind: "string", help: "adapter name", def: "default" },
  "init-adapter": {
    key: "initAdapter",
    kind: "string",
    help: "start from a saved adapter folder instead of a fresh one",
  },
  "seq-len": {
    key: "seqLen",
    kind: "int",
    help: "tokens per training row",
    def: "128 (64 with the default data)",
  },
  "batch-size": {
    key: "batchSize",
    kind: "int",
    help: "rows per micro-batch",
    def: "8 (4 with the default data)",
  },
  "grad-accum": {
    key: "gradAccum",
    kind: "int",
    help: "micro-batches per optimizer step (run as one batch of k×batch rows: exact, but no memory saving)",
    def: "1",
  },
  "lr": {
    key: "lr",
    kind: "number",
    help: "peak learning rate (AdamW)",
    def: "0.02 (0.05 with the default data)",
  },
  "weight-decay": {
    key: "weightDecay",
    kind: "number",
    help: "AdamW decoupled weight decay (LLaMA-Adapter: 0.02)",
    def: "0.02",
  },
  "betas": {
    key: "betas",
    kind: "string",
    help: "AdamW betas as b1,b2 (LLaMA-Adapter: 0.9,0.95)",
    def: "0.9,0.95",
  },
  "warmup-steps": { key: "warmupSteps", kind: "int", help: "linear warmup steps", def: "10" },
  "schedule": {
    key: "schedule",
    kind: "string",
    help: "learning rate after warmup",
    def: "cosine",
    choices: ["cosine", "constant"],
  },
  "max-grad-norm": {
    key: "maxGradNorm",
    kind: "number",
    help: "clip the global gradient norm (0 = off)",
    def: "1",
  },
  "epochs": {
    key: "epochs",
    kind: "int",
    help: "epochs over the training rows (when --max-steps is 0)",
    def: "1",
  },
  "max-steps": {
    key: "maxSteps",
    kind: "int",
    help: "optimizer steps (0 = from --epochs)",
    def: "0 (100 with the default data)",
  },
  "eval-every": {
    key: "evalEvery",
    kind: "int",
    help: "evaluate every N steps (0 = before and after only)",
    def: "50 (25 with the default data)",
  },
  "save-every": {
    key: "saveEvery",
    kind: "int",
    help: "checkpoint every N steps (0 = at the end only)",
    def: "100",
  },
  "seed": { key: "seed", kind: "int", help: "seed of the adapter init, eval split and shuffling", def: "0" },
  "sample-prompt": {
    key: "samplePrompts",
    kind: "list",
    help: "prompt for the before/after samples (repeatable; default: the start of the first eval rows)",
  },
  "sample-tokens": {
    key: "sampleTokens",
    kind: "int",
    help: "tokens generated per sample (0 = no samples)",
    def: "40",
  },
  "out": { key: "out", kind: "string", help: "run folder", def: "runs/<date-time>/" },
  "resume": {
    key: "resume",
    kind: "boolean",
    help: "continue the run in --out (default: the newest run in runs/) from its checkpoint",
  },
  "overwrite": { key: "overwrite", kind: "boolean", help: "replace a run already in --out" },
  "skip-nonfinite": {
    key: "skipNonfinite",
    kind: "boolean",
    help: "skip (roll back) a step with a NaN/infinite loss instead of stopping",
  },
  "gradient-checkpointing": {
    key: "gradientCheckpointing",
    kind: "boolean",
    help: "keep only each adapted layer's input and run its forward again in the backward: less memory, " +
      "10-30% more time a step, the same gradients",
  },
  "quiet": { key: "quiet", kind: "boolean", short: "q", help: "print only warnings, errors and the summary" },
  "json": { key: "json", kind: "boolean", help: "machine-readable events on stdout, one JSON object a line" },
  "help": { key: "help", kind: "boolean", short: "h", help: "show this help" },
};

/** Defaults of the configuration (what `--help` shows). */
export const TRAIN_DEFAULTS: Omit<TrainConfig, "out"> = {
  model: DEFAULT_MODEL,
  dtype: "f32",
  data: DEFAULT_DATA,
  evalSplit: 0.05,
  evalMaxRows: 0,
  template: "alpaca",
  maskPrompt: true,
  pack: null,
  onBadLine: "error",
  seqLen: 128,
  batchSize: 8,
  gradAccum: 1,
  lr: 0.02,
  weightDecay: 0.02,
  betas: [0.9, 0.95],
  warmupSteps: 10,
  schedule: "cosine",
  maxGradNorm: 1,
  epochs: 1,
  maxSteps: 0,
  evalEvery: 50,
  saveEvery: 100,
  seed: 0,
  adapterLen: 10,
  adapterLayers: 0,
  gate: "scalar",
  adapterName: "default",
  resume: false,
  overwrite: false,
  skipNonfinite: false,
  gradientCheckpointing: false,
  samplePrompts: [],
  sampleTokens: 40,
};

/** Overrides when no `--data` is given: the quick Moby-Dick fine-tune. */
export const DEFAULT_DATA_PROFILE: Partial<TrainConfig> = {
  evalData: DEFAULT_EVAL_DATA,
  seqLen: 64,
  batchSize: 4,
  lr: 0.05,
  // the top 2 of the default model's 4 layers: as good an eval loss in 60 steps, backward through half
  adapterLayers: 2,
  maxSteps: 100,
  evalEvery: 25,
  evalMaxRows: 16,
  sampleTokens: 24,
  samplePrompts: ["Call me Ishmael.", "The whale", "Captain Ahab said"],
};

/**
 * The `--help` text: every flag with its default.
 *
 * @returns The text.
 */
export function trainHelp(): string {
  const lines = [
    "Usage: deno task train [flags]",
    "",
    "Fine-tune a LLaMA-Adapter adaption prompt (PEFT format) on WebGPU. With no flags: the embedded default",
    "model on Moby-Dick, a few minutes on a CPU.",
    "",
  ];
  for (const [name, f] of Object.entries(FLAGS)) {
    const head = `  ${f.short ? `-${f.short}, ` : ""}--${name}${f.negatable ? `, --no-${name}` : ""}` +
      (f.kind === "boolean" ? "" : f.kind === "list" ? " <text>" : f.kind === "string" ? " <value>" : " <n>");
    const extra = (f.choices ? ` (${f.choices.join(" | ")})` : "") + (f.def ? ` [default: ${f.def}]` : "");
    lines.push(head, `        ${f.help}${extra}`);
  }
  lines.push(
    "",
    "Writes to --out: adapter_config.json + adapter_model.safetensors (best by eval loss, else last), checkpoint/,",
    "metrics.jsonl, loss.svg + loss.png, samples.md, run.json. Ctrl-C saves a checkpoint; resume with --resume --out <run>.",
  );
  return lines.join("\n");
}

/** What the command line asks for. */
export interface ParsedTrainArgs {
  /** `--help` was given. */
  help: boolean;
  /** Flags given explicitly, as config fields. */
  explicit: Partial<TrainConfig>;
  /** `--quiet`. */
  quiet: boolean;
  /** `--json`. */
  json: boolean;
}

function num(name: string, v: string, int: boolean): number {
  const n = Number(v);
  if (v.trim() === "" || !Number.isFinite(n) || (int && !Number.isInteger(n))) {
    throw new UnsupportedConfigError(
      `--${name} needs ${int ? "an integer" : "a number"}, got ${JSON.stringify(v)}; see --help`,
    );
  }
  return n;
}

/**
 * Parses `deno task train` arguments (strict: unknown flags and bad values are errors that say what to do).
 *
 * @param argv The arguments.
 * @returns The explicit settings and output flags.
 * @throws {UnsupportedConfigError} On an unknown flag or a bad value.
 */
export function parseTrainArgs(argv: string[]): ParsedTrainArgs {
  const options: Record<string, { type: "string" | "boolean"; multiple?: boolean; short?: string }> = {};
  for (const [name, f] of Object.entries(FLAGS)) {
    options[name] = {
      type: f.kind === "boolean" ? "boolean" : "string",
      ...(f.kind === "list" ? { multiple: true } : {}),
    };
    if (f.short) options[name].short = f.short;
  }
  let values: Record<string, string | boolean | (string | boolean)[] | undefined>;
  try {
    ({ values } = parseArgs({
      args: argv,
      options,
      strict: true,
      allowPositionals: false,
      allowNegative: true,
    }));
  } catch (e) {
    throw new UnsupportedConfigError(
      `${(e as Error).message.split("\n")[0]}; run with --help to see every flag`,
    );
  }
  const explicit: Record<string, unknown> = {};
  for (const [name, raw] of Object.entries(values)) {
    const f = FLAGS[name]!;
    if (f.key === "help" || f.key === "quiet" || f.key === "json") continue;
    if (f.kind === "boolean") {
      if (f.negatable !== true && raw === false) {
        throw new UnsupportedConfigError(`--no-${name} is not a flag; see --help`);
      }
      explicit[f.key] = raw;
      continue;
    }
    if (f.kind === "list") {
      explicit[f.key] = raw as string[];
      continue;
    }
    const v = raw as string;
    if (f.choices && !f.choices.includes(v)) {
      throw new UnsupportedConfigError(
        `--${name} must be one of ${f.choices.join(", ")}, got ${JSON.stringify(v)}`,
      );
    }
    if (f.key === "betas") {
      const parts = v.split(",").map((p) => num(name, p, false));
      if (parts.length !== 2 || parts.some((b) => !(b >= 0 && b < 1))) {
        throw new UnsupportedConfigError(
          `--betas needs two numbers in [0, 1) as b1,b2 (e.g. 0.9,0.95), got ${JSON.stringify(v)}`,
        );
      }
      explicit.betas = parts as [number, number];
    } else if (f.kind === "number" || f.kind === "int") {
      const n = num(name, v, f.kind === "int");
      if (n < 0) throw new UnsupportedConfigError(`--${name} must not be negative, got ${n}`);
      explicit[f.key] = n;
    } else {
      if (v.length === 0) throw new UnsupportedConfigError(`--${name} needs a value; see --help`);
      explicit[f.key] = v;
    }
  }
  return {
    help: values.help === true,
    explicit: explicit as Partial<TrainConfig>,
    quiet: values.quiet === true,
    json: values.json === true,
  };
}

function timestamp(d = new Date()): string {
  const p = (n: number): string => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}_${p(d.getHours())}-${
    p(d.getMinutes())
  }-${p(d.getSeconds())}`;
}

/**
 * The newest run folder under `runs/` that has a checkpoint (for `--resume` without `--out`).
 *
 * @param root The runs folder.
 * @param file The file a run must have.
 * @returns Its path, or null.
 */
export async function newestRun(root = "runs", file = "checkpoint"): Promise<string | null> {
  let best: { path: string; t: number } | null = null;
  try {
    for await (const e of Deno.readDir(root)) {
      if (!e.isDirectory) continue;
      try {
        const st = await Deno.stat(join(root, e.name, file));
        const t = st.mtime?.getTime() ?? 0;
        if (!best || t > best.t) best = { path: join(root, e.name), t };
      } catch {
        // Not a run with that file.
      }
    }
  } catch {
    return null;
  }
  return best?.path ?? null;
}

/**
 * The full configuration from the explicit flags: the saved run's configuration when resuming, else the
 * defaults (with the Moby-Dick profile when no `--data` is given).
 *
 * @param explicit Flags given on the command line.
 * @returns The configuration.
 */
export async function resolveTrainConfig(explicit: Partial<TrainConfig>): Promise<TrainConfig> {
  if (explicit.resume) {
    const out = explicit.out ?? await newestRun();
    if (!out) {
      throw new UnsupportedConfigError(
        "--resume: no run with a checkpoint in runs/; pass --out <run folder>",
      );
    }
    let saved: Partial<TrainConfig>;
    try {
      saved = JSON.parse(await Deno.readTextFile(join(out, "run.json"))).config;
    } catch (e) {
      throw new UnsupportedConfigError(
        `--resume: cannot read ${join(out, "run.json")} (${(e as Error).message}); is ${out} a run folder?`,
      );
    }
    return { ...TRAIN_DEFAULTS, ...saved, ...explicit, out, resume: true } as TrainConfig;
  }
  const profile = explicit.data === undefined ? DEFAULT_DATA_PROFILE : {};
  return {
    ...TRAIN_DEFAULTS,
    ...profile,
    ...explicit,
    out: explicit.out ?? join("runs", timestamp()),
  } as TrainConfig;
}

/**
 * Runs the command.
 *
 * @param argv Arguments.
 * @returns The exit code.
 */
export async function main(argv: string[]): Promise<number> {
  let reporter = new Reporter("lines");
  try {
    const args = parseTrainArgs(argv);
    if (args.help) {
      console.log(trainHelp());
      return 0;
    }
    const config = await resolveTrainConfig(args.explicit);
    reporter = new Reporter(Reporter.pick(args));
    const summary = await train(config, { reporter });
    if (args.quiet) {
      console.log(`${summary.interrupted ? "interrupted" : "done"}: ${summary.steps} steps; ${summary.out}`);
    }
    return summary.interrupted ? 130 : 0;
  } catch (e) {
    const msg = e instanceof PromptgateError
      ? e.message
      : (e instanceof Error ? e.stack ?? e.message : String(e));
    if (reporter.mode === "json") reporter.event({ event: "error", kind: (e as Error)?.name, message: msg });
    console.error(`error: ${msg}`);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
