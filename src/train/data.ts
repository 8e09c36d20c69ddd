/**
 * Training data: reading files (`.jsonl`, `.json`, `.txt`, or a folder of them), rendering records
 * with a prompt template, tokenizing with prompt masking, cutting into fixed-length rows (packing or
 * truncation), the seeded train/eval split, and a shuffled batch iterator whose position (epoch, row and
 * the generator state that shuffled the epoch) a checkpoint saves so a resumed run sees the same batches.
 *
 * Record forms: Alpaca `{instruction, input?, output}`, `{prompt, completion}` (both "instruction data":
 * the loss is on the response only unless masking is turned off), and `{text}` or a `.txt` file (plain
 * text: every token is trained on). Bad lines are reported as `file:line` and either stop the run or are
 * skipped with a warning.
 *
 * Every row has exactly `seqLen` tokens (right padding, attention mask 0, label -100), so one set of GPU
 * buffers serves the whole run.
 *
 * @module
 */

import { extname, join } from "../_std.ts";
import { InvalidFileError, UnsupportedConfigError } from "../errors.ts";
import { Random } from "./rng.ts";

/** The label value the loss ignores (HF convention). */
export const IGNORE_INDEX: number = -100;

/** What the data code needs from a tokenizer (the library's `Tokenizer` satisfies it). */
export interface TextTokenizer {
  /** Text → ids. */
  encode(text: string, options?: { addSpecialTokens?: boolean }): number[];
  /** Ids → text. */
  decode(ids: readonly number[], options?: { skipSpecialTokens?: boolean }): string;
  /** Beginning-of-sequence id, if the tokenizer has one. */
  readonly bosTokenId: number | null;
  /** End-of-sequence id, if the tokenizer has one. */
  readonly eosTokenId: number | null;
  /** Padding id, if the tokenizer has one. */
  readonly padTokenId: number | null;
  /** The Jinja chat template from `tokenizer_config.json`, if any. */
  readonly chatTemplate?: string | null;
}

/** One record as read from a file, before templating. */
export type DataRecord =
  | { kind: "text"; text: string; source: string }
  | { kind: "instruction"; instruction: string; input: string; output: string; source: string };

/** How bad lines are handled. */
export type OnBadLine = "skip" | "error";

/** A problem found in a line of a data file, with where it is. */
export interface DataWarning {
  /** `file:line`. */
  where: string;
  /** What is wrong. */
  message: string;
}

/** Options of {@link readDataRecords}. */
export interface ReadDataOptions {
  /** `error` (default) stops at the first bad line; `skip` drops it with a warning. */
  onBadLine?: OnBadLine;
  /** Called for each skipped line. */
  warn?: (w: DataWarning) => void;
}

const DATA_EXTENSIONS = new Set([".jsonl", ".json", ".txt"]);

/**
 * The data files a path names: the file itself, or the `.jsonl`/`.json`/`.txt` files of a folder
 * (recursively, sorted, hidden files skipped).
 *
 * @param path A file or folder.
 * @returns Absolute or relative paths in a stable order.
 * @throws {InvalidFileError} When the path is missing, or a folder holds no data file.
 */
export async function listDataFiles(path: string): Promise<string[]> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch (e) {
    throw new InvalidFileError(
      `the data path ${path} does not exist (${
        (e as Error).message
      }); pass --data with a .jsonl, .json or .txt ` +
        "file or a folder of them",
      { cause: e },
    );
  }
  if (info.isFile) {
    if (!DATA_EXTENSIONS.has(extname(path).toLowerCase())) {
      throw new InvalidFileError(
        `${path} is not a data file promptgate reads: use .jsonl (one JSON object a line), .json (an array of ` +
          "objects) or .txt (plain text)",
      );
    }
    return [path];
  }
  const out: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    const entries: Deno.DirEntry[] = [];
    for await (const e of Deno.readDir(dir)) entries.push(e);
    entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const e of entries) {
      if (e.name.startsWith(".")) continue;
      const p = join(dir, e.name);
      if (e.isDirectory) await walk(p);
      else if (e.isFile && DATA_EXTENSIONS.has(extname(e.name).toLowerCase())) out.push(p);
    }
  };
  await walk(path);
  if (out.length === 0) {
    throw new InvalidFileError(`the folder ${path} holds no .jsonl, .json or .txt file; put your data there`);
  }
  return out;
}

function safeParse(text: string): unknown {
  return JSON.parse(
    text,
    (k, v) => (k === "__proto__" || k === "constructor" || k === "prototype" ? undefined : v),
  );
}

const FORMS = 'expected {"instruction", "input"?, "output"}, {"prompt", "completion"} or {"text"}';

/**
 * Turns one parsed JSON value into a record, or says what is wrong with it.
 *
 * @param value The parsed value.
 * @param source `file:line` for messages.
 * @returns The record, or a message.
 */
export function recordFromJson(value: unknown, source: string): DataRecord | string {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    return `not a JSON object; ${FORMS}`;
  }
  const o = value as Record<string, unknown>;
  const str = (k: string): string | undefined | null => {
    if (!Object.hasOwn(o, k) || o[k] === undefined) return undefined;
    return typeof o[k] === "string" ? (o[k] as string) : null;
  };
  const has = (k: string): boolean => Object.hasOwn(o, k);
  if (has("instruction") || has("output")) {
    const instruction = str("instruction"), input = str("input"), output = str("output");
    if (instruction === undefined) return `has "output" but no "instruction"; ${FORMS}`;
    if (output === undefined) return `has "instruction" but no "output"; ${FORMS}`;
    if (instruction === null || output === null || input === null) {
      return `"instruction", "input" and "output" must be strings`;
    }
    if (output.length === 0) return `"output" is empty: there is nothing to train on`;
    return { kind: "instruction", instruction, input: input ?? "", output, source };
  }
  if (has("prompt") || has("completion")) {
    const prompt = str("prompt"), completion = str("completion");
    if (prompt === undefined) return `has "completion" but no "prompt"; ${FORMS}`;
    if (completion === undefined) return `has "prompt" but no "completion"; ${FORMS}`;
    if (prompt === null || completion === null) return `"prompt" and "completion" must be strings`;
    if (completion.length === 0) return `"completion" is empty: there is nothing to train on`;
    return { kind: "instruction", instruction: prompt, input: "", output: completion, source };
  }
  if (has("text")) {
    const text = str("text");
    if (typeof text !== "string") return `"text" must be a string`;
    if (text.length === 0) return `"text" is empty`;
    return { kind: "text", text, source };
  }
  const keys = Object.keys(o).slice(0, 5).map((k) => JSON.stringify(k)).join(", ");
  return `has none of the known fields (found ${keys || "no keys"}); ${FORMS}`;
}

/**
 * Reads the records of one data file.
 *
 * @param path A `.jsonl`, `.json` or `.txt` file.
 * @param options What to do with bad lines.
 * @returns The records, in file order.
 * @throws {InvalidFileError} On an unreadable file, or a bad line when `onBadLine` is `error`.
 */
export async function readDataFile(path: string, options: ReadDataOptions = {}): Promise<DataRecord[]> {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(await Deno.readFile(path));
  } catch (e) {
    if (e instanceof TypeError) {
      throw new InvalidFileError(`${path} is not valid UTF-8 text; convert it to UTF-8 first`, { cause: e });
    }
    throw new InvalidFileError(`cannot read the data file ${path}: ${(e as Error).message}`, { cause: e });
  }
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  const onBad = options.onBadLine ?? "error";
  const out: DataRecord[] = [];
  const bad = (line: number, message: string): void => {
    const where = `${path}:${line}`;
    if (onBad === "error") {
      throw new InvalidFileError(
        `${where}: ${message}. Fix the line, or pass --on-bad-line skip to skip bad lines with a warning`,
      );
    }
    options.warn?.({ where, message });
  };
  const ext = extname(path).toLowerCase();
  if (ext === ".txt") {
    if (text.trim().length > 0) out.push({ kind: "text", text, source: `${path}:1` });
    return out;
  }
  if (ext === ".json") {
    // A whole-file array; a .json file that is really JSON lines is read as such.
    let value: unknown;
    try {
      value = safeParse(text);
    } catch (e) {
      const lines = text.split("\n").filter((l) => l.trim().length > 0);
      if (lines.length > 1 && lines[0]!.trim().startsWith("{")) return readLines(text, path, bad);
      throw new InvalidFileError(
        `${path} is not valid JSON (${(e as Error).message}); ${FORMS} or an array of them`,
        {
          cause: e,
        },
      );
    }
    const items = Array.isArray(value) ? value : [value];
    // Line numbers of top-level array items are not kept by JSON.parse: report the item index instead.
    items.forEach((item, i) => {
      const r = recordFromJson(item, `${path}:item ${i + 1}`);
      if (typeof r === "string") {
        const where = `${path}:item ${i + 1}`;
        if (onBad === "error") {
          throw new InvalidFileError(
            `${where}: ${r}. Fix it, or pass --on-bad-line skip to skip bad records`,
          );
        }
        options.warn?.({ where, message: r });
      } else out.push(r);
    });
    return out;
  }
  return readLines(text, path, bad);
}

function readLines(text: string, path: string, bad: (line: number, message: string) => void): DataRecord[] {
  const out: DataRecord[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line.length === 0) continue;
    let value: unknown;
    try {
      value = safeParse(line);
    } catch (e) {
      bad(i + 1, `not valid JSON (${(e as Error).message})`);
      continue;
    }
    const r = recordFromJson(value, `${path}:${i + 1}`);
    if (typeof r === "string") bad(i + 1, r);
    else out.push(r);
  }
  return out;
}

/**
 * Reads every record under a path (a file or a folder).
 *
 * @param path A data file or folder.
 * @param options What to do with bad lines.
 * @returns The records and the files they came from.
 * @throws {InvalidFileError} When nothing is left to train on.
 */
export async function readDataRecords(
  path: string,
  options: ReadDataOptions = {},
): Promise<{ records: DataRecord[]; files: string[] }> {
  const files = await listDataFiles(path);
  const records: DataRecord[] = [];
  for (const f of files) records.push(...(await readDataFile(f, options)));
  if (records.length === 0) {
    throw new InvalidFileError(
      `no usable record in ${path}` + (options.onBadLine === "skip" ? " after skipping bad lines" : "") +
        `; ${FORMS} per line of a .jsonl file, or plain text in a .txt file`,
    );
  }
  return { records, files };
}

// -------------------------------------------------------------------------------------------------
// Templates
// -------------------------------------------------------------------------------------------------

/** Prompt templates. */
export type TemplateName = "alpaca" | "chat" | "none";

/** A rendered example: the prompt part (masked when masking) and the response part. */
export interface RenderedExample {
  /** Text the model is given. */
  prompt: string;
  /** Text it learns to produce. */
  response: string;
  /** Whether the template already starts with the BOS token text. */
  hasBos: boolean;
  /** Text appended after the response instead of the EOS id (chat forms end their turn themselves). */
  endText: string | null;
}

const ALPACA_WITH_INPUT =
  "Below is an instruction that describes a task, paired with an input that provides " +
  "further context. Write a response that appropriately completes the request.\n\n" +
  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
const ALPACA_NO_INPUT =
  "Below is an instruction that describes a task. Write a response that appropriately " +
  "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/** Which chat form the tokenizer's template looks like. */
export type ChatForm = "chatml" | "llama2" | "llama3" | "tagged";

/**
 * Recognises the common chat template families from the tokenizer's Jinja text. Promptgate does not run
 * Jinja (templates are code from the internet); it renders the recognised forms itself and falls back
 * to a simple role-tagged form.
 *
 * @param template The tokenizer's `chat_template`, or null.
 * @returns The form.
 */
export function detectChatForm(template: string | null | undefined): ChatForm {
  if (!template) return "tagged";
  if (template.includes("<|im_start|>")) return "chatml";
  if (template.includes("<|start_header_id|>")) return "llama3";
  if (template.includes("[INST]")) return "llama2";
  return "tagged";
}

/**
 * Renders the prompt (user turn) of an instruction with a template.
 *
 * @param template The template.
 * @param instruction The instruction (user message).
 * @param input Optional extra input.
 * @param chatForm The chat form (for `chat`).
 * @returns The prompt text and whether it carries its own BOS text.
 */
export function renderPrompt(
  template: TemplateName,
  instruction: string,
  input: string,
  chatForm: ChatForm = "tagged",
): { prompt: string; hasBos: boolean; endText: string | null } {
  if (template === "alpaca") {
    const t = input ? ALPACA_WITH_INPUT : ALPACA_NO_INPUT;
    return {
      prompt: t.replace("{instruction}", () => instruction).replace("{input}", () => input),
      hasBos: false,
      endText: null,
    };
  }
  const user = input ? `${instruction}\n\n${input}` : instruction;
  if (template === "none") return { prompt: user, hasBos: false, endText: null };
  switch (chatForm) {
    case "chatml":
      return {
        prompt: `<|im_start|>user\n${user}<|im_end|>\n<|im_start|>assistant\n`,
        hasBos: false,
        endText: "<|im_end|>\n",
      };
    case "llama3":
      return {
        prompt: `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n${user}<|eot_id|>` +
          "<|start_header_id|>assistant<|end_header_id|>\n\n",
        hasBos: true,
        endText: "<|eot_id|>",
      };
    case "llama2":
      return { prompt: `[INST] ${user.trim()} [/INST] `, hasBos: false, endText: null };
    default:
      return { prompt: `<|user|>\n${user}\n<|assistant|>\n`, hasBos: false, endText: null };
  }
}

/**
 * Renders an instruction record with a template.
 *
 * @param template The template.
 * @param record An instruction record.
 * @param chatForm The chat form (for `chat`).
 * @returns Prompt and response text.
 */
export function renderExample(
  template: TemplateName,
  record: Extract<DataRecord, { kind: "instruction" }>,
  chatForm: ChatForm = "tagged",
): RenderedExample {
  const p = renderPrompt(template, record.instruction, record.input, chatForm);
  return { prompt: p.prompt, response: record.output, hasBos: p.hasBos, endText: p.endText };
}

// -------------------------------------------------------------------------------------------------
// Tokenizing, masking, rows
// -------------------------------------------------------------------------------------------------

/** One tokenized example. */
export interface TokenizedExample {
  /** Token ids. */
  ids: number[];
  /** Labels (-100 where no loss is taken). */
  labels: number[];
  /** Where it came from (`file:line`). */
  source: string;
}

/** Options of {@link tokenizeRecords}. */
export interface TokenizeOptions {
  /** Prompt template for instruction records (default `alpaca`). */
  template?: TemplateName;
  /** Loss on the response only (default true). Plain text is always trained on entirely. */
  maskPrompt?: boolean;
}

/**
 * Tokenizes records: BOS + prompt + response + EOS, with labels -100 on the prompt when masking.
 * Prompt and response are tokenized separately so the mask boundary is exact.
 *
 * @param tokenizer The tokenizer.
 * @param records The records.
 * @param options Template and masking.
 * @returns One example per record.
 */
export function tokenizeRecords(
  tokenizer: TextTokenizer,
  records: readonly DataRecord[],
  options: TokenizeOptions = {},
): TokenizedExample[] {
  const template = options.template ?? "alpaca";
  const mask = options.maskPrompt ?? true;
  const chatForm = template === "chat" ? detectChatForm(tokenizer.chatTemplate) : "tagged";
  const enc = (t: string): number[] => (t.length ? tokenizer.encode(t, { addSpecialTokens: false }) : []);
  const bos = tokenizer.bosTokenId;
  const eos = tokenizer.eosTokenId;
  return records.map((r) => {
    if (r.kind === "text") {
      const ids = [...(bos !== null ? [bos] : []), ...enc(r.text), ...(eos !== null ? [eos] : [])];
      return { ids, labels: ids.slice(), source: r.source };
    }
    const ex = renderExample(template, r, chatForm);
    const prompt = [...(bos !== null && !ex.hasBos ? [bos] : []), ...enc(ex.prompt)];
    const response = [...enc(ex.response), ...(ex.endText ? enc(ex.endText) : eos !== null ? [eos] : [])];
    return {
      ids: [...prompt, ...response],
      labels: [...(mask ? prompt.map(() => IGNORE_INDEX) : prompt), ...response],
      source: r.source,
    };
  });
}

/** One fixed-length row. */
export interface Row {
  /** `seqLen` ids. */
  ids: number[];
  /** `seqLen` labels. */
  labels: number[];
  /** `seqLen` mask entries (1 real, 0 padding). */
  mask: number[];
}

/** Options of {@link buildRows}. */
export interface BuildRowsOptions {
  /** Tokens per row. */
  seqLen: number;
  /** Concatenate examples and cut the stream into rows (true), or one example per row, truncated (false). */
  pack: boolean;
  /** Padding id. */
  padId: number;
}

/** Rows and what happened while building them. */
export interface BuiltRows {
  /** The rows. */
  rows: Row[];
  /** Examples cut at `seqLen` (no packing). */
  truncated: number;
  /** Examples dropped because no label was left after truncation. */
  dropped: number;
}

/**
 * Cuts tokenized examples into rows of exactly `seqLen` tokens. Packing concatenates everything and cuts
 * the stream (a last partial row is padded when it is the only one, else dropped); without packing each
 * example becomes one row, truncated and padded.
 *
 * @param examples Tokenized examples.
 * @param options Length, packing, padding id.
 * @returns The rows and counts of truncated and dropped examples.
 */
export function buildRows(examples: readonly TokenizedExample[], options: BuildRowsOptions): BuiltRows {
  const { seqLen, padId } = options;
  if (!Number.isInteger(seqLen) || seqLen < 2) {
    throw new UnsupportedConfigError(`--seq-len must be an integer ≥ 2, got ${seqLen}`);
  }
  const pad = (ids: number[], labels: number[]): Row => {
    const n = ids.length;
    const fill = seqLen - n;
    return {
      ids: [...ids, ...new Array<number>(fill).fill(padId)],
      labels: [...labels, ...new Array<number>(fill).fill(IGNORE_INDEX)],
      mask: [...new Array<number>(n).fill(1), ...new Array<number>(fill).fill(0)],
    };
  };
  const rows: Row[] = [];
  let truncated = 0, dropped = 0;
  if (options.pack) {
    const ids: number[] = [], labels: number[] = [];
    for (const e of examples) {
      for (let i = 0; i < e.ids.length; i++) {
        ids.push(e.ids[i]!);
        labels.push(e.labels[i]!);
        if (ids.length === seqLen) {
          if (labels.some((l) => l !== IGNORE_INDEX)) rows.push(pad(ids.splice(0), labels.splice(0)));
          else ids.length = labels.length = 0;
        }
      }
    }
    if (ids.length > 1 && rows.length === 0 && labels.some((l) => l !== IGNORE_INDEX)) {
      rows.push(pad(ids, labels));
    }
    return { rows, truncated, dropped };
  }
  for (const e of examples) {
    let ids = e.ids, labels = e.labels;
    if (ids.length > seqLen) {
      truncated++;
      ids = ids.slice(0, seqLen);
      labels = labels.slice(0, seqLen);
    }
    // The loss is on labels shifted by one: position 0's label never counts.
    if (!labels.slice(1).some((l) => l !== IGNORE_INDEX)) {
      dropped++;
      continue;
    }
    rows.push(pad(ids, labels));
  }
  return { rows, truncated, dropped };
}

/**
 * Splits rows into train and eval parts with a seeded shuffle (the order inside each part is kept).
 *
 * @param rows All rows.
 * @param fraction Share for eval, in [0, 1).
 * @param seed Seed of the split.
 * @returns `{train, eval}`.
 */
export function splitRows<T>(rows: readonly T[], fraction: number, seed: number): { train: T[]; eval: T[] } {
  if (!(fraction >= 0 && fraction < 1)) {
    throw new UnsupportedConfigError(`--eval-split must be in [0, 1), got ${fraction}`);
  }
  const nEval = fraction > 0 ? Math.max(1, Math.round(rows.length * fraction)) : 0;
  if (nEval > 0 && rows.length - nEval < 1) {
    throw new UnsupportedConfigError(
      `--eval-split ${fraction} leaves no training rows out of ${rows.length}; lower it or add data`,
    );
  }
  const order = new Random(seed ^ 0x5eed).shuffle(rows.map((_, i) => i));
  const isEval = new Set(order.slice(0, nEval));
  return { train: rows.filter((_, i) => !isEval.has(i)), eval: rows.filter((_, i) => isEval.has(i)) };
}

// -------------------------------------------------------------------------------------------------
// Batches
// -------------------------------------------------------------------------------------------------

/** Where the batch iterator is: a checkpoint saves it. */
export interface DataCursor {
  /** Epoch (0-based). */
  epoch: number;
  /** Next row index within the epoch's order. */
  index: number;
  /** Generator state before this epoch's shuffle. */
  rng: { state: number; spare: number | null };
}

/** A training batch with its token count. */
export interface RowBatch {
  /** `[B][T]` ids. */
  inputIds: number[][];
  /** `[B][T]` mask. */
  attentionMask: number[][];
  /** `[B][T]` labels. */
  labels: number[][];
  /** Real (non-padding) tokens. */
  tokens: number;
  /** Label tokens that count in the loss. */
  labelTokens: number;
}

/**
 * Assembles rows into a batch.
 *
 * @param rows The rows.
 * @returns The batch.
 */
export function batchOf(rows: readonly Row[]): RowBatch {
  let tokens = 0, labelTokens = 0;
  for (const r of rows) {
    for (const m of r.mask) tokens += m;
    for (let i = 1; i < r.labels.length; i++) if (r.labels[i] !== IGNORE_INDEX) labelTokens++;
  }
  return {
    inputIds: rows.map((r) => r.ids),
    attentionMask: rows.map((r) => r.mask),
    labels: rows.map((r) => r.labels),
    tokens,
    labelTokens,
  };
}

/**
 * Shuffled batches over epochs. Each epoch is a fresh shuffle of the rows; the last rows of an epoch
 * that do not fill a batch are carried into the next batch (batches never mix sizes). The cursor
 * (epoch, index, generator state at the epoch's start) resumes exactly.
 */
export class BatchIterator {
  readonly #rows: readonly Row[];
  readonly #batchSize: number;
  readonly #rng: Random;
  #order: number[] = [];
  #cursor: DataCursor;

  /**
   * Creates the iterator at the start of epoch 0.
   *
   * @param rows Training rows.
   * @param batchSize Rows per batch.
   * @param seed Shuffle seed.
   * @param shuffle Shuffle each epoch (default true).
   */
  constructor(rows: readonly Row[], batchSize: number, seed: number, readonly shuffle = true) {
    if (rows.length === 0) {
      throw new InvalidFileError("the training set is empty; add data or lower --eval-split");
    }
    if (!Number.isInteger(batchSize) || batchSize < 1) {
      throw new UnsupportedConfigError(`--batch-size must be a positive integer, got ${batchSize}`);
    }
    this.#rows = rows;
    this.#batchSize = batchSize;
    this.#rng = new Random(seed);
    this.#cursor = { epoch: 0, index: 0, rng: this.#rng.save() };
    this.#startEpoch(0);
  }

  #startEpoch(epoch: number): void {
    const saved = this.#rng.save();
    this.#order = this.#rows.map((_, i) => i);
    if (this.shuffle) this.#rng.shuffle(this.#order);
    this.#cursor = { epoch, index: 0, rng: saved };
  }

  /** Where the iterator is (a copy, for checkpoints). */
  get cursor(): DataCursor {
    return { ...this.#cursor, rng: { ...this.#cursor.rng } };
  }

  /** Batches per epoch (rounded up; the rest carries over). */
  get batchesPerEpoch(): number {
    return Math.ceil(this.#rows.length / this.#batchSize);
  }

  /**
   * Moves to a saved cursor.
   *
   * @param c The cursor from a checkpoint.
   */
  restore(c: DataCursor): void {
    if (!(c.index >= 0 && c.index <= this.#rows.length)) {
      throw new InvalidFileError(
        `the checkpoint's data position (row ${c.index}) is outside this data set (${this.#rows.length} rows); ` +
          "resume with the same data and --seq-len",
      );
    }
    this.#rng.restore(c.rng);
    this.#startEpoch(c.epoch);
    this.#cursor.index = c.index;
  }

  /**
   * The next batch.
   *
   * @returns Exactly `batchSize` rows (wrapping into the next epoch).
   */
  next(): RowBatch {
    const rows: Row[] = [];
    while (rows.length < this.#batchSize) {
      if (this.#cursor.index >= this.#order.length) this.#startEpoch(this.#cursor.epoch + 1);
      rows.push(this.#rows[this.#order[this.#cursor.index++]!]!);
    }
    return batchOf(rows);
  }
}
