/**
 * The training loop behind `deno task train`: it prepares the run folder (refusing one that holds a run
 * unless resuming or overwriting), loads the model and tokenizer, reads and tokenizes the data, adds or
 * loads the adapter, then steps AdamW with the schedule, evaluates every N steps, writes metrics, the
 * loss plot and checkpoints, and leaves the best (or last) adapter, samples before and after, `run.json`
 * and a summary. It never loses saved work: every file is written atomically; a non-finite loss, a lost
 * device or Ctrl-C stop with the last good checkpoint in place (Ctrl-C saves a fresh one first; a second
 * Ctrl-C exits at once). A resumed run restores the adapter, AdamW's moments and step, and the data
 * position, and continues with bit-identical losses.
 *
 * Gradient accumulation (`gradAccum` k) steps the optimizer on k micro-batches at once: one submission of
 * k × batch rows, whose gradient is the token-mean over all of them — exact, but it does not save GPU
 * memory compared with a batch k times larger.
 *
 * @module
 */

import { join, resolve } from "../_std.ts";
import denoJson from "../../deno.json" with { type: "json" };
import { loadModel } from "../models/load.ts";
import { loadModelConfig } from "../io/hf_config.ts";
import type { Model } from "../models/model.ts";
import { loss } from "../models/run.ts";
import { generate } from "../models/generate.ts";
import { adapterState, addAdaptionPrompt, getAdapter, writeAdapterTensors } from "../adapters/manage.ts";
import { loadAdapter } from "../adapters/io.ts";
import type { GateKind } from "../adapters/config.ts";
import { createOptimizer, type Optimizer } from "./optimizer.ts";
import { resolveModelSource } from "../io/hub.ts";
import { loadTokenizer } from "../io/tokenizer.ts";
import { writeFileAtomic } from "../io/atomic_write.ts";
import { GpuError, PromptgateError, TrainingError, UnsupportedConfigError } from "../errors.ts";
import { adapterReport } from "../gpu/device.ts";
import {
  BatchIterator,
  batchOf,
  buildRows,
  IGNORE_INDEX,
  type OnBadLine,
  readDataRecords,
  renderPrompt,
  type Row,
  splitRows,
  type TemplateName,
  type TextTokenizer,
  tokenizeRecords,
} from "./data.ts";
import { learningRate, type ScheduleKind, validateSchedule } from "./schedule.ts";
import { formatSeconds, MetricsLog, Reporter } from "./metrics.ts";
import { lossPlotSvg } from "./plot.ts";
import { lossPlotPng } from "./plot_png.ts";
import {
  cleanStaleCheckpoints,
  findCheckpoint,
  type OptimizerState,
  readCheckpoint,
  saveCheckpoint,
  type TrainerState,
  writeAdapterFiles,
} from "./checkpoint.ts";

/** Everything a run is configured by (the CLI's flags; `run.json` stores it). */
export interface TrainConfig {
  /** Model folder or hub id. */
  model: string;
  /** Hub revision. */
  revision?: string;
  /** Compute dtype. */
  dtype: "f32" | "f16";
  /** Training data file or folder. */
  data: string;
  /** Eval data file or folder (else `evalSplit` of the training rows). */
  evalData?: string;
  /** Share of rows held out for eval when no `evalData`. */
  evalSplit: number;
  /** Evaluate on at most this many rows (0 = all). */
  evalMaxRows: number;
  /** Prompt template of instruction data. */
  template: TemplateName;
  /** Loss on the response only (instruction data). */
  maskPrompt: boolean;
  /** Pack rows; null = pack plain text, truncate instruction data. */
  pack: boolean | null;
  /** Bad data lines: stop or skip. */
  onBadLine: OnBadLine;
  /** Tokens per row. */
  seqLen: number;
  /** Rows per micro-batch. */
  batchSize: number;
  /** Micro-batches per optimizer step. */
  gradAccum: number;
  /** Peak learning rate. */
  lr: number;
  /** AdamW decoupled weight decay. */
  weightDecay: number;
  /** AdamW betas. */
  betas: [number, number];
  /** Warmup steps. */
  warmupSteps: number;
  /** Schedule after warmup. */
  schedule: ScheduleKind;
  /** Gradient-norm clip (0 = off). */
  maxGradNorm: number;
  /** Epochs (used when `maxSteps` is 0). */
  epochs: number;
  /** Optimizer steps (0 = from epochs). */
  maxSteps: number;
  /** Evaluate every N steps (0 = only before and after). */
  evalEvery: number;
  /** Checkpoint every N steps (0 = only at the end). */
  saveEvery: number;
  /** Seed of initialisation, split and shuffling. */
  seed: number;
  /** Adapter prompt length. */
  adapterLen: number;
  /** Adapted top layers (0 = min(layers, 8)). */
  adapterLayers: number;
  /** Gate form. */
  gate: GateKind;
  /** Adapter name. */
  adapterName: string;
  /** Start from a saved adapter folder. */
  initAdapter?: string;
  /** Run folder. */
  out: string;
  /** Continue the run in `out` from its checkpoint. */
  resume: boolean;
  /** Replace a run already in `out`. */
  overwrite: boolean;
  /** Skip a step whose loss is not finite (roll back the step) instead of stopping. */
  skipNonfinite: boolean;
  /** Keep only each adapted layer's input and run its forward again in the backward (less memory). */
  gradientCheckpointing: boolean;
  /** Prompts for the before/after samples (empty = taken from the eval data). */
  samplePrompts: string[];
  /** Tokens generated per sample. */
  sampleTokens: number;
}

/** Fields a resumed run may change; every other field must equal the saved configuration. */
export const RESUMABLE_CHANGES: readonly (keyof TrainConfig)[] = [
  "maxSteps",
  "epochs",
  "evalEvery",
  "saveEvery",
  "resume",
  "overwrite",
  "skipNonfinite",
  "gradientCheckpointing",
  "out",
];

/** Test and embedding hooks. */
export interface TrainHooks {
  /** Tokenizer to use instead of the model folder's. */
  tokenizer?: TextTokenizer;
  /** Progress reporter (default: quiet). */
  reporter?: Reporter;
  /** Act as if Ctrl-C came after this many steps of this session (tests). */
  interruptAfter?: number;
  /** Install SIGINT handlers (default true; tests turn it off). */
  handleSignals?: boolean;
  /** Called after each step with its loss (tests). */
  onStep?: (step: number, loss: number) => void;
  /**
   * Called before each optimizer step, after the `--skip-nonfinite` snapshot (tests: poison the adapter to
   * force a non-finite loss through the real kernels).
   */
  beforeStep?: (step: number, model: Model) => void | Promise<void>;
}

/** `--skip-nonfinite` gives up after this many non-finite batches in a row: the weights themselves are broken. */
export const MAX_CONSECUTIVE_SKIPS = 10;

/** What a run ends with. */
export interface TrainSummary {
  /** Optimizer steps done (in total, across resumes). */
  steps: number;
  /** Steps planned. */
  totalSteps: number;
  /** Training seconds (across resumes). */
  seconds: number;
  /** Training tokens per second. */
  tokensPerS: number;
  /** Eval loss before training, or null. */
  evalBefore: number | null;
  /** Eval loss at the end, or null. */
  evalAfter: number | null;
  /** Best eval loss and its step, or null. */
  best: { loss: number; step: number } | null;
  /** Last training loss. */
  lastLoss: number | null;
  /** Whether the run stopped on Ctrl-C (resume it). */
  interrupted: boolean;
  /** The run folder. */
  out: string;
  /** Command that generates with the result. */
  generateCommand: string;
}

/** Files of a run folder that mark it as holding a run (and that `overwrite` replaces). */
const RUN_FILES = [
  "run.json",
  "checkpoint",
  ".checkpoint.old",
  "metrics.jsonl",
  "loss.svg",
  "loss.png",
  "samples.md",
  "adapter_config.json",
  "adapter_model.safetensors",
];

/** The embedded default model's folder. */
export const DEFAULT_MODEL: string = new URL("../../default/model", import.meta.url).pathname;

async function exists(p: string): Promise<boolean> {
  try {
    await Deno.stat(p);
    return true;
  } catch {
    return false;
  }
}

async function sha256File(path: string): Promise<string> {
  const bytes = await Deno.readFile(path);
  return Array.from(
    new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)),
    (b) => b.toString(16).padStart(2, "0"),
  )
    .join("");
}

async function sha256Text(text: string): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(d), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Checks the run folder: refuses one that already holds a run unless resuming or overwriting; with
 * `overwrite`, removes only the files a run writes.
 *
 * @param config The configuration.
 */
export async function prepareOutDir(config: TrainConfig): Promise<void> {
  const out = config.out;
  const present: string[] = [];
  for (const f of RUN_FILES) if (await exists(join(out, f))) present.push(f);
  if (config.resume) {
    if (!(await findCheckpoint(out))) {
      throw new TrainingError(
        `--resume: ${out} has no complete checkpoint/ to resume from; start a new run (another --out, or ` +
          "--overwrite to replace it)",
      );
    }
    return;
  }
  if (present.length > 0) {
    if (!config.overwrite) {
      throw new TrainingError(
        `${out} already holds a run (${present.join(", ")}); pass --resume to continue it, --overwrite to ` +
          "replace it, or choose another --out",
      );
    }
    for (const f of present) await Deno.remove(join(out, f), { recursive: true });
  }
  await Deno.mkdir(out, { recursive: true });
}

function evalLossOf(results: { loss: number; tokens: number }[]): number {
  let sum = 0, n = 0;
  for (const r of results) {
    sum += r.loss * r.tokens;
    n += r.tokens;
  }
  return n > 0 ? sum / n : NaN;
}

/**
 * The token-weighted mean loss of the rows, in batches of `batchSize`.
 *
 * @param model The model.
 * @param rows Eval rows.
 * @param batchSize Rows per forward.
 * @returns The mean loss over label tokens.
 */
export async function evaluate(model: Model, rows: readonly Row[], batchSize: number): Promise<number> {
  const results: { loss: number; tokens: number }[] = [];
  for (let i = 0; i < rows.length; i += batchSize) {
    const b = batchOf(rows.slice(i, i + batchSize));
    if (b.labelTokens === 0) continue;
    const l = await loss(model, { inputIds: b.inputIds, attentionMask: b.attentionMask, labels: b.labels });
    results.push({ loss: l, tokens: b.labelTokens });
  }
  return evalLossOf(results);
}

/** A sample: prompt text and the generated continuation. */
export interface Sample {
  /** The prompt as text. */
  prompt: string;
  /** Greedy continuation. */
  text: string;
}

async function sampleAll(
  model: Model,
  tokenizer: TextTokenizer,
  prompts: { text: string; ids: number[] }[],
  maxNewTokens: number,
): Promise<Sample[]> {
  const out: Sample[] = [];
  const stop = tokenizer.eosTokenId !== null ? [tokenizer.eosTokenId] : [];
  for (const p of prompts) {
    const ids = await generate(model, p.ids, { maxNewTokens, temperature: 0, stop });
    const text = tokenizer.decode(ids, { skipSpecialTokens: true });
    // say so when the model ends the text at once, rather than printing an empty sample
    const ended = ids.length > 0 && stop.includes(ids[ids.length - 1]!);
    out.push({ prompt: p.text, text: text.trim() === "" && ended ? "[end of text]" : text });
  }
  return out;
}

function samplesMarkdown(before: Sample[], after: Sample[] | null, stepAfter: number): string {
  const block = (s: string): string => "```text\n" + s.replace(/```/g, "``\u200b`") + "\n```\n";
  let md = "# Samples (greedy)\n\n";
  before.forEach((b, i) => {
    md += `## Prompt ${i + 1}\n\n${block(b.prompt)}\n### Before training\n\n${block(b.text)}\n`;
    const a = after?.[i];
    if (a) md += `### After ${stepAfter} steps\n\n${block(a.text)}\n`;
  });
  return md;
}

/**
 * Builds the sample prompts: the given texts, or the start of the first eval (else train) rows — the
 * prompt part of instruction rows, the first 16 tokens of text rows.
 */
function samplePromptsOf(
  config: TrainConfig,
  tokenizer: TextTokenizer,
  rows: readonly Row[],
  instruction: boolean,
): { text: string; ids: number[] }[] {
  const bos = tokenizer.bosTokenId;
  if (config.samplePrompts.length > 0) {
    return config.samplePrompts.map((text) => {
      const p = instruction ? renderPrompt(config.template, text, "", "tagged").prompt : text;
      const ids = [...(bos !== null ? [bos] : []), ...tokenizer.encode(p, { addSpecialTokens: false })];
      return { text, ids };
    });
  }
  return rows.slice(0, 3).map((r) => {
    const n = r.mask.reduce((a, b) => a + b, 0);
    let cut = instruction ? r.labels.findIndex((l) => l !== IGNORE_INDEX) : Math.min(16, n);
    if (cut <= 0) cut = Math.min(16, n);
    const ids = r.ids.slice(0, cut);
    return { text: tokenizer.decode(ids, { skipSpecialTokens: true }), ids };
  });
}

/** Prints nothing: the reporter used when none is given. */
const QUIET = new Reporter("quiet");

/**
 * Runs (or resumes) a training run.
 *
 * @param config The configuration.
 * @param hooks Tokenizer, reporter and test hooks.
 * @returns The summary.
 * @throws {TrainingError} On a non-finite loss (the last good checkpoint is kept), a run folder in use, …
 * @example Train the default model for 20 steps
 * ```ts ignore
 * const summary = await train({ ...defaults, maxSteps: 20, out: "runs/try" });
 * console.log(summary.generateCommand);
 * ```
 */
export async function train(config: TrainConfig, hooks: TrainHooks = {}): Promise<TrainSummary> {
  const rep = hooks.reporter ?? QUIET;
  const out = resolve(config.out);
  config = { ...config, out };
  for (
    const [k, v] of Object.entries({
      "--batch-size": config.batchSize,
      "--grad-accum": config.gradAccum,
      "--adapter-len": config.adapterLen,
    })
  ) {
    if (!Number.isInteger(v) || v < 1) {
      throw new UnsupportedConfigError(`${k} must be a positive integer, got ${v}`);
    }
  }
  for (
    const [k, v] of Object.entries({
      "--epochs": config.epochs,
      "--max-steps": config.maxSteps,
      "--eval-every": config.evalEvery,
      "--save-every": config.saveEvery,
      "--sample-tokens": config.sampleTokens,
      "--eval-max-rows": config.evalMaxRows,
    })
  ) {
    if (!Number.isInteger(v) || v < 0) {
      throw new UnsupportedConfigError(`${k} must be an integer ≥ 0, got ${v}`);
    }
  }
  if (config.maxSteps === 0 && config.epochs === 0) {
    throw new UnsupportedConfigError(
      "--epochs and --max-steps are both 0: give one of them to say how long to train",
    );
  }

  await prepareOutDir(config);
  await cleanStaleCheckpoints(out);
  let resumeFrom: { dir: string; state: TrainerState; optimizer: OptimizerState } | null = null;
  if (config.resume) {
    const dir = (await findCheckpoint(out))!;
    const { state, optimizer } = await readCheckpoint(dir);
    const saved = state.config as Partial<TrainConfig>;
    for (const k of Object.keys(saved) as (keyof TrainConfig)[]) {
      if (RESUMABLE_CHANGES.includes(k)) continue;
      if (JSON.stringify(saved[k]) !== JSON.stringify(config[k])) {
        throw new TrainingError(
          `--resume: the run in ${out} was started with ${k}=${JSON.stringify(saved[k])}, now ${
            JSON.stringify(config[k])
          }; ` +
            `an exact resume needs the same setting (only ${RESUMABLE_CHANGES.join(", ")} may change)`,
        );
      }
    }
    resumeFrom = { dir, state, optimizer };
  }

  // Model and tokenizer.
  const folder = await resolveModelSource(
    config.model,
    config.revision !== undefined ? { revision: config.revision } : {},
  );
  const tokenizer = hooks.tokenizer ?? await loadTokenizer(folder);
  const modelConfig = await loadModelConfig(folder);
  const maxPos = modelConfig.maxPositions;
  if (config.seqLen > maxPos) {
    throw new UnsupportedConfigError(
      `--seq-len ${config.seqLen} is longer than the model's context (${maxPos} positions); pass --seq-len ${maxPos} or less`,
    );
  }
  // Room for training rows and for prompt + generated tokens of the samples, not more (the KV cache).
  const model = await loadModel(folder, {
    dtype: config.dtype,
    maxSeqLen: Math.min(maxPos, Math.max(config.seqLen, 256 + config.sampleTokens)),
  });
  model.gradientCheckpointing = config.gradientCheckpointing ?? false;

  // Data.
  const warnings: string[] = [];
  const readOpts = {
    onBadLine: config.onBadLine,
    warn: (w: { where: string; message: string }) => {
      warnings.push(`${w.where}: ${w.message}`);
      rep.warn(`skipped ${w.where}: ${w.message}`);
    },
  };
  const train = await readDataRecords(config.data, readOpts);
  const instruction = train.records.some((r) => r.kind === "instruction");
  const pack = config.pack ?? !instruction;
  const padId = tokenizer.padTokenId ?? tokenizer.eosTokenId ?? 0;
  const tok = { template: config.template, maskPrompt: config.maskPrompt };
  const vocab = model.config.vocabSize;
  const checkIds = (rows: Row[], what: string): Row[] => {
    for (const r of rows) {
      for (const id of r.ids) {
        if (!(id >= 0 && id < vocab)) {
          throw new UnsupportedConfigError(
            `the tokenizer produced token id ${id} for the ${what} data, outside the model's vocabulary of ${vocab}; ` +
              "use the tokenizer that belongs to the model",
          );
        }
      }
    }
    return rows;
  };
  const built = buildRows(tokenizeRecords(tokenizer, train.records, tok), {
    seqLen: config.seqLen,
    pack,
    padId,
  });
  if (built.truncated > 0) {
    rep.warn(`${built.truncated} examples were longer than --seq-len ${config.seqLen} and were truncated`);
  }
  if (built.dropped > 0) {
    rep.warn(`${built.dropped} examples had no response token left within --seq-len and were dropped`);
  }
  let trainRows: Row[], evalRows: Row[];
  const files = [...train.files];
  if (config.evalData) {
    const ev = await readDataRecords(config.evalData, readOpts);
    files.push(...ev.files);
    trainRows = built.rows;
    evalRows =
      buildRows(tokenizeRecords(tokenizer, ev.records, tok), { seqLen: config.seqLen, pack, padId }).rows;
  } else {
    ({ train: trainRows, eval: evalRows } = splitRows(built.rows, config.evalSplit, config.seed));
  }
  checkIds(trainRows, "training");
  checkIds(evalRows, "eval");
  if (trainRows.length === 0) {
    throw new TrainingError(
      `no training row is left after tokenizing ${config.data} with --seq-len ${config.seqLen}; add data or lower --eval-split`,
    );
  }
  if (config.evalMaxRows > 0) evalRows = evalRows.slice(0, config.evalMaxRows);
  const rowsPerStep = config.batchSize * config.gradAccum;
  const iter = new BatchIterator(trainRows, rowsPerStep, config.seed);
  const totalSteps = config.maxSteps > 0 ? config.maxSteps : config.epochs * iter.batchesPerEpoch;
  const schedule = { lr: config.lr, warmupSteps: config.warmupSteps, totalSteps, kind: config.schedule };
  validateSchedule(schedule);

  // Adapter and optimizer.
  const name = config.adapterName;
  const layers = config.adapterLayers > 0 ? config.adapterLayers : Math.min(model.config.numLayers, 8);
  if (resumeFrom) {
    await loadAdapter(model, resumeFrom.dir, { name });
  } else if (config.initAdapter) {
    await loadAdapter(model, config.initAdapter, { name });
  } else {
    addAdaptionPrompt(model, {
      adapterLen: config.adapterLen,
      adapterLayers: layers,
      name,
      gate: config.gate,
      seed: config.seed,
    });
  }
  const opt: Optimizer = createOptimizer(model, {
    lr: config.lr,
    betas: config.betas,
    weightDecay: config.weightDecay,
    maxGradNorm: config.maxGradNorm,
  });
  let state: TrainerState;
  if (resumeFrom) {
    opt.loadState(resumeFrom.optimizer);
    iter.restore(resumeFrom.state.cursor);
    state = resumeFrom.state;
  } else {
    state = {
      step: 0,
      cursor: iter.cursor,
      bestEvalLoss: null,
      bestStep: null,
      lastLoss: null,
      adapterName: name,
      config: config as unknown as Record<string, unknown>,
      elapsedS: 0,
      tokens: 0,
    };
  }
  state.config = config as unknown as Record<string, unknown>;

  // run.json
  const modelConfigText = await Deno.readTextFile(join(folder, "config.json")).catch(() =>
    JSON.stringify(model.config)
  );
  const runJsonPath = join(out, "run.json");
  const runInfo: Record<string, unknown> = resumeFrom && await exists(runJsonPath)
    ? JSON.parse(await Deno.readTextFile(runJsonPath))
    : {
      config,
      adapter_name: name,
      adapter_layers: layers,
      instruction,
      model: {
        source: config.model,
        folder,
        config_sha256: await sha256Text(modelConfigText),
        family: model.config.family,
      },
      data: await Promise.all(files.map(async (f) => ({ path: f, sha256: await sha256File(f) }))),
      rows: { train: trainRows.length, eval: evalRows.length, seq_len: config.seqLen, packed: pack },
      versions: { promptgate: denoJson.version, deno: Deno.version.deno, v8: Deno.version.v8 },
      gpu: adapterReport(model.gpu).description,
      started_at: new Date().toISOString(),
    };
  if (resumeFrom) {
    const savedData = (runInfo.data ?? []) as { path: string; sha256: string }[];
    for (const d of savedData) {
      if (await exists(d.path) && (await sha256File(d.path)) !== d.sha256) {
        throw new TrainingError(
          `--resume: ${d.path} changed since the run started (sha-256 differs); an exact resume needs the same data`,
        );
      }
    }
    runInfo.resumed = [...((runInfo.resumed as unknown[]) ?? []), {
      at: new Date().toISOString(),
      step: state.step,
    }];
    runInfo.config = config;
  }
  await writeFileAtomic(runJsonPath, JSON.stringify(runInfo, null, 2) + "\n");

  const metricsPath = join(out, "metrics.jsonl");
  const metrics = await MetricsLog.resume(metricsPath, state.step);
  if (resumeFrom) await metrics.write();
  const drawPlot = async (): Promise<void> => {
    const trainPts = metrics.entries.filter((e) => e.step > 0 && Number.isFinite(e.loss)).map((e) =>
      [e.step, e.loss] as const
    );
    const evalPts = metrics.entries.filter((e) => typeof e.eval_loss === "number").map((e) =>
      [e.step, e.eval_loss!] as const
    );
    const series = [
      { label: "train", color: "#1f77b4", points: trainPts },
      { label: "eval", color: "#d62728", points: evalPts },
    ];
    const title = { title: `loss — ${config.model.split("/").slice(-2).join("/")}` };
    await writeFileAtomic(join(out, "loss.svg"), lossPlotSvg(series, title));
    await writeFileAtomic(join(out, "loss.png"), lossPlotPng(series, title));
  };

  const hasEval = evalRows.length > 0;
  const samplesPath = join(out, "samples.md");
  const prompts = samplePromptsOf(config, tokenizer, evalRows.length ? evalRows : trainRows, instruction)
    .filter((p) => p.ids.length > 0 && p.ids.length + config.sampleTokens <= model.maxSeqLen);
  const evalBatch = config.batchSize;

  rep.info(
    `training ${name} (adapter_len ${config.adapterLen}, ${layers} layers) on ${model.config.family} ${folder}\n` +
      `  ${trainRows.length} train rows, ${evalRows.length} eval rows of ${config.seqLen} tokens` +
      `${pack ? " (packed)" : ""}; ${totalSteps} steps of ${rowsPerStep} rows; out: ${out}`,
  );
  rep.event({
    event: "start",
    out,
    total_steps: totalSteps,
    start_step: state.step,
    train_rows: trainRows.length,
    eval_rows: evalRows.length,
  });

  // Before.
  let evalBefore: number | null = (state as TrainerState & { evalBefore?: number | null }).evalBefore ?? null;
  let samplesBefore: Sample[] = (state as TrainerState & { samplesBefore?: Sample[] }).samplesBefore ?? [];
  if (!resumeFrom) {
    if (hasEval) {
      evalBefore = await evaluate(model, evalRows, evalBatch);
      state.bestEvalLoss = evalBefore;
      state.bestStep = 0;
      await metrics.append({ step: 0, loss: NaN, lr: 0, tokens_per_s: 0, eval_loss: evalBefore });
      rep.info(`eval loss before training: ${evalBefore.toFixed(4)}`);
      rep.event({ event: "eval", step: 0, eval_loss: evalBefore });
    }
    if (config.sampleTokens > 0 && prompts.length > 0) {
      samplesBefore = await sampleAll(model, tokenizer, prompts, config.sampleTokens);
      await writeFileAtomic(samplesPath, samplesMarkdown(samplesBefore, null, 0));
      for (const s of samplesBefore) {
        rep.event({ event: "sample", when: "before", prompt: s.prompt, text: s.text });
      }
    }
    Object.assign(state, { evalBefore, samplesBefore });
    await writeAdapterFiles(model, name, out);
    state.cursor = iter.cursor;
    await saveCheckpoint(out, model, await opt.saveState(), state);
  }

  // Signals.
  let stopRequested = false;
  const onSigint = (): void => {
    if (stopRequested) {
      Deno.stderr.writeSync(
        new TextEncoder().encode("\nsecond Ctrl-C: exiting now (the last checkpoint is intact)\n"),
      );
      Deno.exit(130);
    }
    stopRequested = true;
    rep.info("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to exit at once)");
  };
  const handle = hooks.handleSignals ?? true;
  if (handle) Deno.addSignalListener("SIGINT", onSigint);

  let lastSaved = state.step;
  let lastEval: number | null = metrics.entries.findLast((e) => typeof e.eval_loss === "number")?.eval_loss ??
    null;
  let bestKind: "best" | "last" = hasEval ? "best" : "last";
  const sessionStart = performance.now();
  const elapsedBefore = state.elapsedS;
  const tokensBefore = state.tokens;
  let sessionSteps = 0;
  const checkpoint = async (): Promise<void> => {
    state.cursor = iter.cursor;
    state.elapsedS = elapsedBefore + (performance.now() - sessionStart) / 1000;
    try {
      await saveCheckpoint(out, model, await opt.saveState(), state);
      if (!hasEval) await writeAdapterFiles(model, name, out);
    } catch (e) {
      // A lost device fails the readback of the state: the previous checkpoint is still complete.
      gpuHint(e);
    }
    lastSaved = state.step;
    rep.event({ event: "checkpoint", step: state.step });
  };
  function gpuHint(e: unknown): never {
    if (e instanceof GpuError) {
      throw new GpuError(
        `${e.message}\nThe last good checkpoint (step ${lastSaved}) is in ${
          join(out, "checkpoint")
        }; after fixing the cause ` +
          `(lower --batch-size or --seq-len, pass --gradient-checkpointing, or --dtype f16), continue with ` +
          `--resume --out ${out}`,
        { cause: e },
      );
    }
    throw e;
  }

  rep.start(totalSteps, state.step);
  let interrupted = false;
  let skipped = 0;
  try {
    while (state.step < totalSteps) {
      if (stopRequested || (hooks.interruptAfter !== undefined && sessionSteps >= hooks.interruptAfter)) {
        interrupted = true;
        break;
      }
      const batch = iter.next();
      const step = state.step + 1;
      opt.lr = learningRate(step, schedule);
      let snapshot: { params: Record<string, Float32Array>; opt: OptimizerState } | null = null;
      if (config.skipNonfinite) {
        snapshot = { params: await adapterState(model, name), opt: await opt.saveState() };
      }
      await hooks.beforeStep?.(step, model);
      let loss: number;
      try {
        loss = await opt.step({
          inputIds: batch.inputIds,
          attentionMask: batch.attentionMask,
          labels: batch.labels,
        });
      } catch (e) {
        gpuHint(e);
        throw e;
      }
      if (!Number.isFinite(loss)) {
        if (snapshot && ++skipped < MAX_CONSECUTIVE_SKIPS) {
          writeAdapterTensors(model, getAdapter(model, name), snapshot.params);
          opt.loadState(snapshot.opt);
          rep.warn(
            `loss is ${loss} at step ${step}: skipped this batch and rolled the step back (--skip-nonfinite)`,
          );
          continue;
        }
        if (snapshot) {
          throw new TrainingError(
            `the loss was ${loss} on ${skipped} batches in a row at step ${step} (--skip-nonfinite skipped ` +
              `them): the adapter's weights are no longer usable. The last checkpoint (step ${lastSaved}) is in ` +
              `${join(out, "checkpoint")}; lower --lr or set --max-grad-norm and start again`,
          );
        }
        throw new TrainingError(
          `the loss became ${loss} at step ${step}; training stopped. The last good checkpoint (step ${lastSaved}) is in ` +
            `${
              join(out, "checkpoint")
            } and the adapter in ${out} is untouched. Lower --lr, set --max-grad-norm, use ` +
            "--dtype f32, or pass --skip-nonfinite to skip such batches",
        );
      }
      skipped = 0;
      sessionSteps++;
      state.step = step;
      state.lastLoss = loss;
      state.tokens += batch.tokens;
      hooks.onStep?.(step, loss);
      const sessionS = (performance.now() - sessionStart) / 1000;
      const tps = (state.tokens - tokensBefore) / Math.max(sessionS, 1e-9);
      let evalLoss: number | undefined;
      if (hasEval && ((config.evalEvery > 0 && step % config.evalEvery === 0) || step === totalSteps)) {
        try {
          evalLoss = await evaluate(model, evalRows, evalBatch);
        } catch (e) {
          gpuHint(e);
        }
        lastEval = evalLoss!;
        rep.event({ event: "eval", step, eval_loss: evalLoss });
        if (state.bestEvalLoss === null || evalLoss! < state.bestEvalLoss) {
          state.bestEvalLoss = evalLoss!;
          state.bestStep = step;
          await writeAdapterFiles(model, name, out);
        }
      }
      await metrics.append({
        step,
        loss,
        lr: opt.lr,
        tokens_per_s: Math.round(tps),
        ...(evalLoss !== undefined ? { eval_loss: evalLoss } : {}),
        elapsed_s: Number((elapsedBefore + sessionS).toFixed(3)),
      });
      rep.step({
        step,
        total: totalSteps,
        loss,
        evalLoss: lastEval,
        tokensPerS: tps,
        lr: opt.lr,
        etaS: (sessionS / sessionSteps) * (totalSteps - step),
      });
      if (evalLoss !== undefined || step % 10 === 0) await drawPlot();
      if (config.saveEvery > 0 && step % config.saveEvery === 0 && step < totalSteps) await checkpoint();
    }
    await checkpoint();
    await drawPlot();
  } finally {
    if (handle) Deno.removeSignalListener("SIGINT", onSigint);
    rep.stop();
  }

  // After.
  let samplesAfter: Sample[] = [];
  if (!interrupted && config.sampleTokens > 0 && prompts.length > 0) {
    samplesAfter = await sampleAll(model, tokenizer, prompts, config.sampleTokens);
    await writeFileAtomic(samplesPath, samplesMarkdown(samplesBefore, samplesAfter, state.step));
    for (const s of samplesAfter) {
      rep.event({ event: "sample", when: "after", prompt: s.prompt, text: s.text });
    }
  }
  if (!hasEval) bestKind = "last";
  const seconds = state.elapsedS;
  const defaultModel = resolve(config.model) === resolve(DEFAULT_MODEL);
  const generateCommand =
    `deno task generate ${defaultModel ? "" : `--model ${config.model} `}--adapter ${out}` +
    (config.template !== "alpaca" || !instruction
      ? ` --template ${instruction ? config.template : "none"}`
      : "") +
    ` --prompt "${(prompts[0]?.text ?? "Hello").replace(/["\\$`]/g, "\\$&").slice(0, 60)}"`;
  const summary: TrainSummary = {
    steps: state.step,
    totalSteps,
    seconds,
    tokensPerS: state.tokens / Math.max(seconds, 1e-9),
    evalBefore,
    evalAfter: hasEval && !interrupted ? lastEval : null,
    best: state.bestEvalLoss !== null && state.bestStep !== null
      ? { loss: state.bestEvalLoss, step: state.bestStep }
      : null,
    lastLoss: state.lastLoss,
    interrupted,
    out,
    generateCommand,
  };
  runInfo.summary = {
    ...summary,
    adapter: { kind: bestKind, step: bestKind === "best" ? state.bestStep : state.step },
  };
  runInfo.finished_at = new Date().toISOString();
  await writeFileAtomic(runJsonPath, JSON.stringify(runInfo, null, 2) + "\n");
  rep.event({ event: interrupted ? "interrupted" : "done", ...summary });
  if (!interrupted) {
    for (let i = 0; i < samplesAfter.length; i++) {
      rep.info(
        `\nprompt: ${samplesBefore[i]?.prompt}\n  before: ${samplesBefore[i]?.text}\n  after:  ${
          samplesAfter[i]!.text
        }`,
      );
    }
  }
  rep.info(summaryText(summary, bestKind));
  return summary;
}

/**
 * The end-of-run summary for a person.
 *
 * @param s The summary.
 * @param kind Whether the adapter in the run folder is the best (by eval loss) or the last.
 * @returns Lines of text.
 */
export function summaryText(s: TrainSummary, kind: "best" | "last" = "best"): string {
  const lines = [
    "",
    s.interrupted
      ? `interrupted at step ${s.steps}/${s.totalSteps}; checkpoint saved. Continue with: deno task train --resume --out ${s.out}`
      : `done: ${s.steps} steps in ${formatSeconds(s.seconds)} (${Math.round(s.tokensPerS)} tokens/s)`,
  ];
  if (s.evalBefore !== null) {
    lines.push(
      `eval loss: ${s.evalBefore.toFixed(4)} before` +
        (s.evalAfter !== null ? ` → ${s.evalAfter.toFixed(4)} after` : "") +
        (s.best ? ` (best ${s.best.loss.toFixed(4)} at step ${s.best.step})` : ""),
    );
  } else if (s.lastLoss !== null) lines.push(`last training loss: ${s.lastLoss.toFixed(4)}`);
  lines.push(
    `written to ${s.out}: adapter_config.json + adapter_model.safetensors (${kind} adapter), checkpoint/, ` +
      "metrics.jsonl, loss.svg, loss.png, samples.md, run.json",
    `generate with: ${s.generateCommand}`,
  );
  return lines.join("\n");
}

/** Re-exported for the CLI: the base error class to catch and print. */
export { PromptgateError };
