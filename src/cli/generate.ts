/**
 * `deno task generate`: streams a model's continuation of a prompt, with one or more saved adapters
 * (`--adapter`, repeatable; `--adapter-name` picks the active one) or without (`--no-adapter`). With no
 * flags it uses the embedded default model and the newest trained adapter in `runs/`. Tokens are printed
 * as they are decoded (the tokenizer's stream decoder holds back incomplete UTF-8).
 *
 * @module
 */

import { parseArgs } from "../_std.ts";
import { basename, join, resolve } from "../_std.ts";
import { loadModel } from "../models/load.ts";
import { generateStream } from "../models/generate.ts";
import { disableAdapters, setAdapter } from "../adapters/manage.ts";
import { loadAdapter } from "../adapters/io.ts";
import { resolveModelSource } from "../io/hub.ts";
import { loadTokenizer } from "../io/tokenizer.ts";
import { PromptgateError, UnsupportedConfigError } from "../errors.ts";
import { renderPrompt, type TemplateName, type TextTokenizer } from "../train/data.ts";
import { DEFAULT_MODEL } from "../train/trainer.ts";
import { newestRun } from "./train.ts";

/** Parsed `deno task generate` arguments. */
export interface GenerateArgs {
  /** Model folder or hub id (null = from the adapter's run, else the default). */
  model: string | null;
  /** Hub revision. */
  revision?: string;
  /** Adapter folders. */
  adapters: string[];
  /** Which adapter is active. */
  adapterName: string | null;
  /** Run the base model. */
  noAdapter: boolean;
  /** Prompt (null = read stdin). */
  prompt: string | null;
  /** Template (null = from the adapter's run, else none). */
  template: TemplateName | null;
  /** Tokens to generate at most. */
  maxNewTokens: number;
  /** 0 = greedy. */
  temperature: number;
  /** Nucleus mass. */
  topP: number;
  /** Sampling seed. */
  seed: number;
  /** Stop strings. */
  stop: string[];
  /** Compute dtype. */
  dtype: "f32" | "f16";
  /** `--help`. */
  help: boolean;
}

/** `--help` text. */
export const GENERATE_HELP: string = `Usage: deno task generate [flags]

Stream a continuation of a prompt. With no flags: the embedded default model with the newest adapter in runs/.

  --model <value>          model folder or HF hub id [default: the trained run's model, else default/model]
  --revision <value>       hub revision of --model
  --adapter <folder>       a saved adapter (PEFT format); repeatable [default: the newest run in runs/]
  --adapter-name <name>    which loaded adapter to use (its folder's name, or "default" for a run folder) [default: the first]
  --no-adapter             the base model alone, to compare
  --prompt <text>          the prompt [default: read from stdin]
  --template <t>           alpaca | chat | none [default: the trained run's template for instruction data, else none]
  --max-new-tokens <n>     [default: 100]
  --temperature <x>        0 = greedy [default: 0]
  --top-p <x>              nucleus sampling mass [default: 1]
  --seed <n>               sampling seed [default: 0]
  --stop <text>            stop when this text appears (repeatable; the EOS token always stops)
  --dtype <f32|f16>        [default: f32]
  -h, --help               show this help`;

function num(name: string, v: string | undefined, def: number, int: boolean): number {
  if (v === undefined) return def;
  const n = Number(v);
  if (v.trim() === "" || !Number.isFinite(n) || (int && !Number.isInteger(n)) || n < 0) {
    throw new UnsupportedConfigError(
      `--${name} needs a ${int ? "non-negative integer" : "non-negative number"}, got ${JSON.stringify(v)}`,
    );
  }
  return n;
}

/**
 * Parses the arguments.
 *
 * @param argv Arguments.
 * @returns The parsed arguments.
 * @throws {UnsupportedConfigError} On unknown flags or bad values.
 */
export function parseGenerateArgs(argv: string[]): GenerateArgs {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        model: { type: "string" },
        revision: { type: "string" },
        adapter: { type: "string", multiple: true },
        "adapter-name": { type: "string" },
        "no-adapter": { type: "boolean" },
        prompt: { type: "string" },
        template: { type: "string" },
        "max-new-tokens": { type: "string" },
        temperature: { type: "string" },
        "top-p": { type: "string" },
        seed: { type: "string" },
        stop: { type: "string", multiple: true },
        dtype: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    }));
  } catch (e) {
    throw new UnsupportedConfigError(
      `${(e as Error).message.split("\n")[0]}; run with --help to see every flag`,
    );
  }
  const template = values.template ?? null;
  if (template !== null && !["alpaca", "chat", "none"].includes(template)) {
    throw new UnsupportedConfigError(
      `--template must be alpaca, chat or none, got ${JSON.stringify(template)}`,
    );
  }
  const dtype = values.dtype ?? "f32";
  if (dtype !== "f32" && dtype !== "f16") {
    throw new UnsupportedConfigError(`--dtype must be f32 or f16, got ${dtype}`);
  }
  const topP = num("top-p", values["top-p"], 1, false);
  if (!(topP > 0 && topP <= 1)) throw new UnsupportedConfigError(`--top-p must be in (0, 1], got ${topP}`);
  if (values["no-adapter"] && values.adapter?.length) {
    throw new UnsupportedConfigError("--no-adapter and --adapter contradict each other; pass one of them");
  }
  return {
    model: values.model ?? null,
    ...(values.revision !== undefined ? { revision: values.revision } : {}),
    adapters: values.adapter ?? [],
    adapterName: values["adapter-name"] ?? null,
    noAdapter: values["no-adapter"] === true,
    prompt: values.prompt ?? null,
    template: template as TemplateName | null,
    maxNewTokens: num("max-new-tokens", values["max-new-tokens"], 100, true),
    temperature: num("temperature", values.temperature, 0, false),
    topP,
    seed: num("seed", values.seed, 0, true),
    stop: values.stop ?? [],
    dtype,
    help: values.help === true,
  };
}

/**
 * Tokenizes a prompt for generation: BOS, then the prompt rendered with the template.
 *
 * @param tokenizer The tokenizer.
 * @param prompt The prompt text.
 * @param template The template.
 * @returns Token ids.
 */
export function promptIds(tokenizer: TextTokenizer, prompt: string, template: TemplateName): number[] {
  const r = template === "none"
    ? { prompt, hasBos: false }
    : renderPrompt(template, prompt, "", template === "chat" ? detect(tokenizer) : "tagged");
  const bos = tokenizer.bosTokenId !== null && !r.hasBos ? [tokenizer.bosTokenId] : [];
  return [...bos, ...tokenizer.encode(r.prompt, { addSpecialTokens: false })];
}

function detect(t: TextTokenizer): "chatml" | "llama2" | "llama3" | "tagged" {
  const s = t.chatTemplate ?? "";
  if (s.includes("<|im_start|>")) return "chatml";
  if (s.includes("<|start_header_id|>")) return "llama3";
  if (s.includes("[INST]")) return "llama2";
  return "tagged";
}

async function readRunInfo(folder: string): Promise<Record<string, unknown> | null> {
  try {
    return JSON.parse(await Deno.readTextFile(join(folder, "run.json")));
  } catch {
    return null;
  }
}

/**
 * Runs the command: prints the prompt's continuation as it is generated.
 *
 * @param argv Arguments.
 * @param write Where text goes (default stdout).
 * @returns The exit code.
 */
export async function main(argv: string[], write?: (text: string) => void): Promise<number> {
  const enc = new TextEncoder();
  const out = write ?? ((t: string) => void Deno.stdout.writeSync(enc.encode(t)));
  try {
    const a = parseGenerateArgs(argv);
    if (a.help) {
      console.log(GENERATE_HELP);
      return 0;
    }
    let adapters = a.adapters;
    if (!a.noAdapter && adapters.length === 0) {
      const run = await newestRun("runs", "adapter_config.json");
      if (run) {
        adapters = [run];
        console.error(`using the newest adapter: ${run}`);
      } else {
        console.error(
          "no trained adapter in runs/: generating with the base model (train one with deno task train)",
        );
      }
    }
    const info = adapters.length ? await readRunInfo(adapters[0]!) : null;
    const runConfig = (info?.config ?? {}) as { model?: string; template?: TemplateName };
    const instruction = info?.instruction === true;
    const modelSource = a.model ?? runConfig.model ?? DEFAULT_MODEL;
    const template: TemplateName = a.template ??
      (instruction && runConfig.template ? runConfig.template : "none");
    let prompt = a.prompt;
    if (prompt === null) {
      if (Deno.stdin.isTerminal()) {
        console.error("reading the prompt from stdin (end with Ctrl-D), or pass --prompt");
      }
      prompt = (await new Response(Deno.stdin.readable).text()).replace(/\n$/, "");
    }
    if (prompt.length === 0) {
      throw new UnsupportedConfigError("the prompt is empty; pass --prompt <text> or pipe text in");
    }
    const folder = await resolveModelSource(
      modelSource,
      a.revision !== undefined ? { revision: a.revision } : {},
    );
    const tokenizer = await loadTokenizer(folder);
    const ids = promptIds(tokenizer, prompt, template);
    const model = await loadModel(folder, { dtype: a.dtype, maxSeqLen: ids.length + a.maxNewTokens });
    const names: string[] = [];
    for (const dir of adapters) {
      let name = basename(resolve(dir)).replace(/[^A-Za-z0-9_.-]/g, "_").replace(/^[.-]+/, "").slice(0, 64) ||
        "adapter";
      if (adapters.length === 1) name = "default";
      while (names.includes(name)) name += "_";
      await loadAdapter(model, dir, { name });
      names.push(name);
    }
    if (a.noAdapter || names.length === 0) disableAdapters(model);
    else setAdapter(model, a.adapterName ?? names[0]!);
    const decoder = tokenizer.createStreamDecoder({ skipSpecialTokens: true });
    const stopIds = tokenizer.eosTokenId !== null ? [tokenizer.eosTokenId] : [];
    let text = "";
    let printed = 0;
    out(prompt);
    const stops = a.stop.filter((s) => s.length > 0);
    const hold = Math.max(0, ...stops.map((s) => s.length - 1));
    let stopped = false;
    for await (
      const id of generateStream(model, ids, {
        maxNewTokens: a.maxNewTokens,
        temperature: a.temperature,
        topP: a.topP,
        seed: a.seed,
        stop: stopIds,
      })
    ) {
      text += decoder.push(id);
      const hit = stops.map((s) => text.indexOf(s)).filter((i) => i >= 0);
      if (hit.length) {
        text = text.slice(0, Math.min(...hit));
        stopped = true;
        break;
      }
      // Hold back a possible partial stop string.
      if (text.length - hold > printed) {
        out(text.slice(printed, text.length - hold));
        printed = text.length - hold;
      }
    }
    if (!stopped) text += decoder.flush();
    out(text.slice(printed) + "\n");
    return 0;
  } catch (e) {
    console.error(
      `error: ${e instanceof PromptgateError ? e.message : (e instanceof Error ? e.stack : String(e))}`,
    );
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
