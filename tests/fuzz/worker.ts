/**
 * The fuzzer's worker: runs one loader on one mutated input and reports whether it returned, threw a
 * promptgate error (a typed, explained refusal) or threw anything else (a failure). Running in a
 * worker lets the driver terminate an input that hangs.
 *
 * @module
 */

import { join } from "../../src/_std.ts";
import { openSafetensors } from "../../src/io/safetensors.ts";
import { loadModelConfig } from "../../src/io/hf_config.ts";
import { loadTokenizer } from "../../src/io/tokenizer.ts";
import { parseAdapterConfig } from "../../src/adapters/config.ts";
import { readDataFile } from "../../src/train/data.ts";
import { PromptgateError } from "../../src/errors.ts";

/** A request from the driver. */
export interface FuzzRequest {
  /** Which loader. */
  target: "safetensors" | "config" | "tokenizer" | "adapter_config" | "data_jsonl" | "data_json" | "data_txt";
  /** The mutated file. */
  bytes: Uint8Array;
  /** A scratch folder of this worker. */
  dir: string;
}

/** The worker's answer. */
export interface FuzzResponse {
  /** `ok` (accepted), `typed` (refused with a promptgate error) or `failure`. */
  outcome: "ok" | "typed" | "failure";
  /** Error class and message, for failures and typed errors. */
  detail?: string;
}

async function run(req: FuzzRequest): Promise<void> {
  const { dir, bytes } = req;
  switch (req.target) {
    case "safetensors": {
      const path = join(dir, "model.safetensors");
      await Deno.writeFile(path, bytes);
      const f = await openSafetensors(path);
      try {
        let total = 0;
        for (const [name, info] of f.tensors) {
          total += info.byteLength;
          if (total > 64 << 20) break; // reading is bounded by the header check; keep the fuzz fast
          await f.readTensor(name, "f32");
        }
      } finally {
        f.close();
      }
      return;
    }
    case "config":
      await Deno.writeFile(join(dir, "config.json"), bytes);
      await loadModelConfig(dir);
      return;
    case "tokenizer": {
      await Deno.writeFile(join(dir, "tokenizer.json"), bytes);
      const tok = await loadTokenizer(dir);
      tok.decode(tok.encode("Call me Ishmael. 🐋 naïve\n\t  x"));
      return;
    }
    case "adapter_config":
      parseAdapterConfig(new TextDecoder().decode(bytes), "adapter_config.json");
      return;
    default: {
      const ext = req.target.slice(5);
      const path = join(dir, `data.${ext}`);
      await Deno.writeFile(path, bytes);
      await readDataFile(path, { onBadLine: "skip" });
    }
  }
}

const scope = self as unknown as {
  onmessage: ((e: MessageEvent<FuzzRequest>) => void) | null;
  postMessage(message: FuzzResponse): void;
};
scope.onmessage = async (e: MessageEvent<FuzzRequest>) => {
  let response: FuzzResponse;
  try {
    await run(e.data);
    response = { outcome: "ok" };
  } catch (err) {
    const detail = `${(err as Error)?.name ?? typeof err}: ${
      String((err as Error)?.message ?? err).slice(0, 300)
    }`;
    response = { outcome: err instanceof PromptgateError ? "typed" : "failure", detail };
  }
  scope.postMessage(response);
};
