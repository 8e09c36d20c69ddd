/**
 * The error classes every part of promptgate throws. Each message says what went wrong and what to do
 * about it; the class says which kind of problem it is, so callers can branch on `instanceof`.
 *
 * @module
 */

/** Base class of every error promptgate throws on purpose. */
export class PromptgateError extends Error {
  /**
   * Creates the error.
   *
   * @param message What went wrong and what to do about it.
   * @param options Standard error options (`cause`).
   */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** A file (safetensors, JSON config, tokenizer, data) is malformed or inconsistent. */
export class InvalidFileError extends PromptgateError {}

/** A configuration (HF config.json, adapter config, options) asks for something we do not support. */
export class UnsupportedConfigError extends PromptgateError {}

/** An adapter does not fit the model it is applied to, or an adapter operation is not valid. */
export class AdapterError extends PromptgateError {}

/** A WebGPU problem: no adapter, a limit too small, a lost device, a validation or out-of-memory error. */
export class GpuError extends PromptgateError {}

/** Training hit a non-finite loss or another condition that stops it. */
export class TrainingError extends PromptgateError {}
