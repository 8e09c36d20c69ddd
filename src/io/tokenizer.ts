/**
 * Text ↔ token ids for a Hugging Face model folder, wrapping `@huggingface/tokenizers` (a pure-JS port of
 * the Rust `tokenizers` library: byte-level BPE as in GPT-2, sentencepiece-style BPE with byte fallback as
 * in Llama and Mistral). {@link loadTokenizer} reads `tokenizer.json` (required), `tokenizer_config.json`,
 * `special_tokens_map.json` and `chat_template.jinja` (all optional) and resolves the special token ids.
 * {@link Tokenizer.createStreamDecoder} turns generated ids into text as they arrive, holding back a
 * character until all of its UTF-8 bytes have been generated (one emoji can span several byte tokens).
 *
 * @module
 */

import { join } from "../_std.ts";
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers";
import { InvalidFileError, PromptgateError, UnsupportedConfigError } from "../errors.ts";

/** Options for {@link Tokenizer.encode}. */
export interface EncodeOptions {
  /** Add the tokens the tokenizer's post-processor adds (e.g. `<s>` for Llama). Default true. */
  addSpecialTokens?: boolean;
}

/** Options for {@link Tokenizer.decode}. */
export interface DecodeOptions {
  /** Drop special tokens (`<s>`, `</s>`, `<|endoftext|>`, ...) from the text. Default false. */
  skipSpecialTokens?: boolean;
}

/** Incremental decoding of generated tokens. */
export interface StreamDecoder {
  /**
   * Add one generated token.
   *
   * @param id The token id.
   * @returns The text that became complete with this token (often "", e.g. mid-way through an emoji).
   */
  push(id: number): string;
  /**
   * Finish: return any text still held back (an incomplete UTF-8 sequence decodes as U+FFFD).
   *
   * @returns The remaining text.
   */
  flush(): string;
}

/** Files of a tokenizer, already parsed, for {@link Tokenizer.fromObjects}. */
export interface TokenizerFiles {
  /** The parsed `tokenizer.json`. */
  tokenizerJson: unknown;
  /** The parsed `tokenizer_config.json`, if any. */
  tokenizerConfig?: unknown;
  /** The parsed `special_tokens_map.json`, if any. */
  specialTokensMap?: unknown;
  /** The text of `chat_template.jinja`, if any (takes precedence over `chat_template` in the config). */
  chatTemplate?: string;
}

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** A special token's text: configs store either the string or an AddedToken-like `{content: ...}`. */
function tokenText(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (isObject(v) && typeof v["content"] === "string") return v["content"];
  return null;
}

const SPECIAL_KEYS = [
  "bos_token",
  "eos_token",
  "unk_token",
  "pad_token",
  "sep_token",
  "cls_token",
  "mask_token",
];

/**
 * A loaded tokenizer: encode, decode, special token ids, chat template and streaming decode.
 *
 * Build one with {@link loadTokenizer} (from a folder) or {@link Tokenizer.fromObjects} (from parsed files).
 */
export class Tokenizer {
  /** Beginning-of-sequence token id, or null if the tokenizer has none. */
  readonly bosTokenId: number | null;
  /** End-of-sequence token id, or null if the tokenizer configuration names none. */
  readonly eosTokenId: number | null;
  /** Padding token id, or null (many causal LMs have no pad token). */
  readonly padTokenId: number | null;
  /** The Jinja chat template, or null if the model has none. */
  readonly chatTemplate: string | null;
  /** Number of token ids (highest id + 1, added tokens included). */
  readonly vocabSize: number;
  #hf: HfTokenizer;
  #cleanUp: boolean;

  private constructor(hf: HfTokenizer, config: Json, chatTemplate: string | null) {
    this.#hf = hf;
    const vocab = hf.get_vocab(true);
    let maxId = -1;
    for (const id of vocab.values()) if (id > maxId) maxId = id;
    this.vocabSize = maxId + 1;
    const idOf = (key: string): number | null => {
      const text = tokenText(config[key]);
      return text === null ? null : hf.token_to_id(text) ?? null;
    };
    this.bosTokenId = idOf("bos_token");
    this.eosTokenId = idOf("eos_token");
    this.padTokenId = idOf("pad_token");
    this.chatTemplate = chatTemplate;
    // The Rust library never cleans up spaces; transformers does only when the config asks for it.
    this.#cleanUp = config["clean_up_tokenization_spaces"] === true;
  }

  /**
   * Build a tokenizer from parsed files.
   *
   * @param files The parsed `tokenizer.json` and optional companions.
   * @param source Where the files came from, for error messages.
   * @returns The tokenizer.
   * @throws {InvalidFileError} When `tokenizer.json` is not a tokenizer.
   * @throws {UnsupportedConfigError} When it uses a component the JS library cannot run.
   */
  static fromObjects(files: TokenizerFiles, source = "tokenizer.json"): Tokenizer {
    const tj = files.tokenizerJson;
    if (!isObject(tj) || !isObject(tj["model"])) {
      throw new InvalidFileError(
        `${source} is not a Hugging Face tokenizer (no "model" object); download the tokenizer again.`,
      );
    }
    // The JS library insists every pipeline stage is present, even as null; Rust omits none but be lenient.
    const tokenizerJson: Json = { added_tokens: [], ...tj };
    for (const key of ["normalizer", "pre_tokenizer", "post_processor", "decoder"]) {
      if (!(key in tokenizerJson)) tokenizerJson[key] = null;
    }
    // transformers gives special_tokens_map.json precedence over tokenizer_config.json.
    const config: Json = {};
    if (isObject(files.tokenizerConfig)) Object.assign(config, files.tokenizerConfig);
    if (isObject(files.specialTokensMap)) {
      for (const [key, value] of Object.entries(files.specialTokensMap)) {
        if (key !== "__proto__") config[key] = value;
      }
    }
    // The JS library expects plain strings for special tokens.
    const libConfig: Json = { ...config, clean_up_tokenization_spaces: false };
    for (const key of SPECIAL_KEYS) {
      if (key in config) libConfig[key] = tokenText(config[key]);
    }
    if (Array.isArray(config["additional_special_tokens"])) {
      libConfig["additional_special_tokens"] = config["additional_special_tokens"]
        .map(tokenText)
        .filter((t): t is string => t !== null);
    }
    let hf: HfTokenizer;
    try {
      hf = new HfTokenizer(tokenizerJson, libConfig);
    } catch (error) {
      throw new UnsupportedConfigError(
        `${source} could not be loaded by @huggingface/tokenizers: ${
          (error as Error).message
        }. The tokenizer ` +
          `uses a component the JS library does not implement, or the file is damaged.`,
        { cause: error },
      );
    }
    const tokenizer = new Tokenizer(hf, config, chatTemplateOf(config, files.chatTemplate));
    // The library builds some components lazily: exercise them now so a damaged file fails at load time.
    try {
      hf.decode(hf.encode("Hello, world! 123 \u00e9\ud83d\udc0b", { add_special_tokens: true }).ids, {});
    } catch (error) {
      throw new InvalidFileError(
        `${source} loaded but cannot encode or decode text (${
          (error as Error).message
        }); the file is damaged ` +
          "or uses a component @huggingface/tokenizers does not implement. Download the tokenizer again.",
        { cause: error },
      );
    }
    return tokenizer;
  }

  /**
   * Turn text into token ids.
   *
   * @param text The text.
   * @param options Whether to add special tokens (default true: e.g. a leading `<s>` for Llama).
   * @returns The token ids.
   *
   * @example Encode without special tokens
   * ```ts ignore
   * const ids = tokenizer.encode("Hello world", { addSpecialTokens: false });
   * ```
   */
  encode(text: string, options: EncodeOptions = {}): number[] {
    if (typeof text !== "string") {
      throw new PromptgateError(`encode expects a string, got ${typeof text}.`);
    }
    try {
      return this.#hf.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids;
    } catch (error) {
      throw new InvalidFileError(`the tokenizer failed to encode text (${(error as Error).message})`, {
        cause: error,
      });
    }
  }

  /**
   * Turn token ids into text.
   *
   * @param ids Token ids (integers in `[0, vocabSize)`).
   * @param options Whether to drop special tokens (default false).
   * @returns The text ("" for no ids).
   * @throws {PromptgateError} For an id that is not an integer in the vocabulary.
   */
  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    if (ids.length === 0) return "";
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
        throw new PromptgateError(
          `cannot decode token id ${id}: the tokenizer's ids are integers from 0 to ${this.vocabSize - 1}. ` +
            `If the model's vocabulary is larger than the tokenizer's, mask those logits before sampling.`,
        );
      }
    }
    try {
      return this.#hf.decode([...ids], {
        skip_special_tokens: options.skipSpecialTokens ?? false,
        clean_up_tokenization_spaces: this.#cleanUp,
      });
    } catch (error) {
      throw new InvalidFileError(`the tokenizer failed to decode ids (${(error as Error).message})`, {
        cause: error,
      });
    }
  }

  /**
   * The id of a token string, if it is in the vocabulary.
   *
   * @param token The token text (e.g. `"</s>"`).
   * @returns Its id, or undefined.
   */
  tokenToId(token: string): number | undefined {
    return this.#hf.token_to_id(token);
  }

  /**
   * The token string of an id.
   *
   * @param id The token id.
   * @returns The token text, or undefined for an unknown id.
   */
  idToToken(id: number): string | undefined {
    return this.#hf.id_to_token(id);
  }

  /**
   * Start decoding a stream of generated tokens.
   *
   * Each {@link StreamDecoder.push} decodes a short window of recent ids and returns only the text that
   * is new and complete: when the window's text ends in U+FFFD (a UTF-8 character split across byte
   * tokens, as with byte fallback or GPT-2's byte-level BPE), nothing is emitted until its last byte
   * arrives. Decoding a window rather than one token keeps leading spaces right (sentencepiece decoders
   * strip the space of the first token they see). Concatenating every `push` result and `flush()` gives
   * `decode(allIds)`.
   *
   * @param options Whether to drop special tokens (default false).
   * @returns A fresh stream decoder.
   *
   * @example Print tokens as they are generated
   * ```ts ignore
   * const stream = tokenizer.createStreamDecoder({ skipSpecialTokens: true });
   * for (const id of generatedIds) await Deno.stdout.write(new TextEncoder().encode(stream.push(id)));
   * console.log(stream.flush());
   * ```
   */
  createStreamDecoder(options: DecodeOptions = {}): StreamDecoder {
    const ids: number[] = [];
    // ids[prefixStart, readStart) were already emitted and give context; ids[readStart, ...) are pending.
    let prefixStart = 0;
    let readStart = 0;
    const emit = (force: boolean): string => {
      const prefixText = this.decode(ids.slice(prefixStart, readStart), options);
      const fullText = this.decode(ids.slice(prefixStart), options);
      if (fullText.length <= prefixText.length || (!force && fullText.endsWith("\uFFFD"))) return "";
      const text = fullText.slice(prefixText.length);
      prefixStart = readStart;
      readStart = ids.length;
      return text;
    };
    return {
      push: (id: number): string => {
        ids.push(id);
        return emit(false);
      },
      flush: (): string => (readStart < ids.length ? emit(true) : ""),
    };
  }
}

function chatTemplateOf(config: Json, fromFile: string | undefined): string | null {
  if (fromFile !== undefined) return fromFile;
  const t = config["chat_template"];
  if (typeof t === "string") return t;
  // Older configs store several named templates; transformers uses the one named "default".
  if (Array.isArray(t)) {
    const named = t.filter((x): x is { name: string; template: string } =>
      isObject(x) && typeof x["name"] === "string" && typeof x["template"] === "string"
    );
    return (named.find((x) => x.name === "default") ?? named[0])?.template ?? null;
  }
  return null;
}

async function readOptionalText(path: string): Promise<string | undefined> {
  try {
    return await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw new InvalidFileError(`could not read ${path}: ${(error as Error).message}.`, { cause: error });
  }
}

function parseJson(path: string, text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new InvalidFileError(
      `${path} is not valid JSON (${(error as Error).message}); download the tokenizer files again.`,
      { cause: error },
    );
  }
}

/**
 * Load the tokenizer of a Hugging Face model folder.
 *
 * @param folder A folder with `tokenizer.json` (and optionally `tokenizer_config.json`,
 *   `special_tokens_map.json`, `chat_template.jinja`).
 * @returns The tokenizer.
 * @throws {InvalidFileError} When tokenizer.json is missing or any file is malformed.
 * @throws {UnsupportedConfigError} When the tokenizer uses a component the JS library cannot run.
 *
 * @example Round-trip a sentence
 * ```ts ignore
 * import { loadTokenizer } from "./tokenizer.ts";
 * const tokenizer = await loadTokenizer("tests/fixtures/tokenizers/gpt2");
 * const ids = tokenizer.encode("Hello world"); // [15496, 995]
 * console.log(tokenizer.decode(ids)); // "Hello world"
 * ```
 */
export async function loadTokenizer(folder: string): Promise<Tokenizer> {
  const tokenizerPath = join(folder, "tokenizer.json");
  const tokenizerText = await readOptionalText(tokenizerPath);
  if (tokenizerText === undefined) {
    const hasSentencepiece = await Deno.stat(join(folder, "tokenizer.model")).then(() => true, () => false);
    throw new InvalidFileError(
      `no tokenizer.json in ${folder}. promptgate needs the fast-tokenizer file tokenizer.json` +
        (hasSentencepiece
          ? "; this folder only has a sentencepiece tokenizer.model. Convert it once with transformers: " +
            "AutoTokenizer.from_pretrained(path).save_pretrained(path)."
          : "; pass the model folder that contains it (or download the model's tokenizer files)."),
    );
  }
  const files: TokenizerFiles = { tokenizerJson: parseJson(tokenizerPath, tokenizerText) };
  const configPath = join(folder, "tokenizer_config.json");
  const configText = await readOptionalText(configPath);
  if (configText !== undefined) files.tokenizerConfig = parseJson(configPath, configText);
  const mapPath = join(folder, "special_tokens_map.json");
  const mapText = await readOptionalText(mapPath);
  if (mapText !== undefined) files.specialTokensMap = parseJson(mapPath, mapText);
  const template = await readOptionalText(join(folder, "chat_template.jinja"));
  if (template !== undefined) files.chatTemplate = template;
  return Tokenizer.fromObjects(files, tokenizerPath);
}
