/**
 * What a training run tells the world: `metrics.jsonl` (one object per logged step, rewritten
 * atomically as a whole so a crash never leaves a torn line, and cut back to the checkpoint's step on
 * resume), and the progress shown to a person — a progress bar on a TTY, plain periodic lines elsewhere
 * (CI, logs), nothing with `--quiet`, or JSON events on stdout with `--json`.
 *
 * @module
 */

import process from "node:process";
import cliProgress from "cli-progress";
import { writeFileAtomic } from "../io/atomic_write.ts";

/** One logged step, as written to `metrics.jsonl`. */
export interface MetricsEntry {
  /** Optimizer step (1-based). */
  step: number;
  /** Mean training loss of the step. */
  loss: number;
  /** Learning rate used by the step. */
  lr: number;
  /** Training tokens per second over the logging interval. */
  tokens_per_s: number;
  /** Eval loss, when evaluated at this step. */
  eval_loss?: number;
  /** Seconds since the run started. */
  elapsed_s?: number;
}

/**
 * The `metrics.jsonl` of a run: kept in memory and rewritten atomically after every change.
 */
export class MetricsLog {
  /** Entries so far. */
  readonly entries: MetricsEntry[] = [];

  /**
   * Creates an empty log.
   *
   * @param path Where `metrics.jsonl` lives.
   */
  constructor(readonly path: string) {}

  /**
   * Loads an existing log for a resumed run, keeping only steps ≤ `upToStep` (later steps were not
   * checkpointed and will be redone).
   *
   * @param path The file.
   * @param upToStep The checkpoint's step.
   * @returns The log.
   */
  static async resume(path: string, upToStep: number): Promise<MetricsLog> {
    const log = new MetricsLog(path);
    let text = "";
    try {
      text = await Deno.readTextFile(path);
    } catch {
      return log;
    }
    for (const line of text.split("\n")) {
      if (!line.trim()) continue;
      try {
        const e = JSON.parse(line) as MetricsEntry;
        if (typeof e.step === "number" && e.step <= upToStep) log.entries.push(e);
      } catch {
        // A line from an older, interrupted writer: drop it, the checkpoint is the truth.
      }
    }
    return log;
  }

  /**
   * Adds an entry and appends it to the file (append + fsync: a crash can tear at most this last line,
   * which {@link MetricsLog.resume} drops).
   *
   * @param e The entry.
   */
  async append(e: MetricsEntry): Promise<void> {
    this.entries.push(e);
    const f = await Deno.open(this.path, { append: true, create: true });
    try {
      const bytes = new TextEncoder().encode(line(e) + "\n");
      let at = 0;
      while (at < bytes.length) at += await f.write(bytes.subarray(at));
      await f.sync();
    } finally {
      f.close();
    }
  }

  /**
   * The file's text.
   *
   * @returns One JSON object a line.
   */
  text(): string {
    return this.entries.map(line).join("\n") + (this.entries.length ? "\n" : "");
  }

  /** Rewrites the whole file atomically (after a resume cut it back). */
  async write(): Promise<void> {
    await writeFileAtomic(this.path, this.text());
  }
}

function line(e: MetricsEntry): string {
  return JSON.stringify(e, (_k, v) => (typeof v === "number" && !Number.isFinite(v) ? null : v));
}

/** How progress is shown. */
export type ReportMode = "bar" | "lines" | "json" | "quiet";

/** A machine-readable event (`--json`). */
export interface TrainEvent {
  /** Event kind: `start`, `step`, `eval`, `sample`, `checkpoint`, `warning`, `done`, `interrupted`, `error`. */
  event: string;
  /** Any other fields. */
  [key: string]: unknown;
}

/**
 * Shows progress: a bar on a TTY, periodic lines otherwise, JSON events, or nothing.
 */
export class Reporter {
  // deno-lint-ignore no-explicit-any
  #bar: any = null;
  #lastLine = 0;
  readonly #enc = new TextEncoder();

  /**
   * Creates a reporter.
   *
   * @param mode How to show progress.
   * @param lineEverySeconds Minimum seconds between plain progress lines (default 10).
   */
  constructor(readonly mode: ReportMode, readonly lineEverySeconds = 10) {}

  /**
   * The mode that fits the terminal: `json` or `quiet` when asked, else `bar` on a TTY and `lines` off one.
   *
   * @param o Flags.
   * @returns The mode.
   */
  static pick(o: { json?: boolean; quiet?: boolean }): ReportMode {
    if (o.json) return "json";
    if (o.quiet) return "quiet";
    return Deno.stderr.isTerminal() ? "bar" : "lines";
  }

  /**
   * A message for a person (stderr), unless quiet or JSON.
   *
   * @param text The message.
   */
  info(text: string): void {
    if (this.mode === "quiet" || this.mode === "json") return;
    if (this.#bar) {
      // Keep the bar on its own line below the message.
      Deno.stderr.writeSync(this.#enc.encode("\r\x1b[2K" + text + "\n"));
      this.#bar.render?.();
      return;
    }
    Deno.stderr.writeSync(this.#enc.encode(text + "\n"));
  }

  /**
   * A warning: always shown on stderr except in JSON mode, where it is an event.
   *
   * @param text The warning.
   */
  warn(text: string): void {
    if (this.mode === "json") this.event({ event: "warning", message: text });
    else Deno.stderr.writeSync(this.#enc.encode(`warning: ${text}\n`));
  }

  /**
   * A JSON event on stdout (JSON mode only).
   *
   * @param e The event.
   */
  event(e: TrainEvent): void {
    if (this.mode !== "json") return;
    Deno.stdout.writeSync(
      this.#enc.encode(
        JSON.stringify(e, (_k, v) => (typeof v === "number" && !Number.isFinite(v) ? null : v)) + "\n",
      ),
    );
  }

  /**
   * Starts the bar.
   *
   * @param total Total steps.
   * @param start Steps already done (resume).
   */
  start(total: number, start: number): void {
    this.#lastLine = performance.now();
    if (this.mode !== "bar") return;
    this.#bar = new cliProgress.SingleBar({
      format: "step {value}/{total} |{bar}| loss {loss} | eval {eval} | {tps} tok/s | ETA {eta_formatted}",
      hideCursor: true,
      clearOnComplete: false,
      stream: process.stderr,
      etaBuffer: 20,
    }, cliProgress.Presets.shades_classic);
    this.#bar.start(total, start, { loss: "-", eval: "-", tps: "-" });
  }

  /**
   * Reports a step.
   *
   * @param s Step numbers and values.
   */
  step(
    s: {
      step: number;
      total: number;
      loss: number;
      evalLoss: number | null;
      tokensPerS: number;
      lr: number;
      etaS: number;
    },
  ): void {
    if (this.mode === "bar") {
      this.#bar?.update(s.step, {
        loss: s.loss.toFixed(4),
        eval: s.evalLoss === null ? "-" : s.evalLoss.toFixed(4),
        tps: Math.round(s.tokensPerS),
      });
    } else if (this.mode === "lines") {
      const now = performance.now();
      if (now - this.#lastLine >= this.lineEverySeconds * 1000 || s.step === s.total || s.step === 1) {
        this.#lastLine = now;
        this.info(
          `step ${s.step}/${s.total}  loss ${s.loss.toFixed(4)}  lr ${s.lr.toExponential(2)}` +
            (s.evalLoss === null ? "" : `  eval ${s.evalLoss.toFixed(4)}`) +
            `  ${Math.round(s.tokensPerS)} tok/s  ETA ${formatSeconds(s.etaS)}`,
        );
      }
    } else {
      this.event({ event: "step", step: s.step, loss: s.loss, lr: s.lr, tokens_per_s: s.tokensPerS });
    }
  }

  /** Stops the bar (before the summary). */
  stop(): void {
    if (this.#bar) {
      this.#bar.stop();
      this.#bar = null;
    }
  }
}

/**
 * Seconds as `1h02m`, `3m05s` or `12s`.
 *
 * @param s Seconds.
 * @returns The text.
 */
export function formatSeconds(s: number): string {
  if (!Number.isFinite(s) || s < 0) return "?";
  const t = Math.round(s);
  if (t >= 3600) return `${Math.floor(t / 3600)}h${String(Math.floor((t % 3600) / 60)).padStart(2, "0")}m`;
  if (t >= 60) return `${Math.floor(t / 60)}m${String(t % 60).padStart(2, "0")}s`;
  return `${t}s`;
}
