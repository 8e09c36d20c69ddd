/**
 * Reading and writing safetensors files, the format Hugging Face checkpoints and PEFT adapters use.
 *
 * A safetensors file is an 8-byte little-endian header length, a JSON header that maps each tensor name
 * to `{dtype, shape, data_offsets}` (plus an optional `__metadata__` string map), and the raw
 * little-endian tensor bytes. {@link openSafetensors} reads and validates only the header; each tensor's
 * bytes are read on demand, so a multi-gigabyte checkpoint can be streamed to the GPU one tensor at a
 * time. The header is untrusted input: its length is checked against the file size before anything is
 * allocated, it is parsed by a strict parser that rejects duplicate names and `__proto__` keys, and every
 * shape, dtype and offset is checked (with overflow checks) before a single tensor byte is read.
 *
 * {@link openCheckpoint} gives one view over a model folder, whether it holds `model.safetensors` or a
 * sharded `model.safetensors.index.json`. {@link writeSafetensors} writes files byte-compatible with
 * the Python `safetensors` library (same header order and padding), atomically.
 *
 * @module
 */

import { isAbsolute, join } from "../_std.ts";
import { InvalidFileError, PromptgateError, UnsupportedConfigError } from "../errors.ts";
import { writeFileAtomic } from "./atomic_write.ts";
import { bf16ArrayToF32, f16ArrayToF32, f32ArrayToF16, f8E4M3ArrayToF32, f8E5M2ArrayToF32 } from "./dtype.ts";

/** Every element type the safetensors format defines. */
export type SafetensorsDtype =
  | "F64"
  | "F32"
  | "F16"
  | "BF16"
  | "I64"
  | "I32"
  | "I16"
  | "I8"
  | "U8"
  | "U64"
  | "U32"
  | "U16"
  | "BOOL"
  | "F8_E4M3"
  | "F8_E5M2";

/** Bytes per element of each safetensors dtype. */
export const DTYPE_BYTES: Readonly<Record<SafetensorsDtype, number>> = Object.freeze({
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  U64: 8,
  U32: 4,
  U16: 2,
  BOOL: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
});

/** Where one tensor lives in its file. */
export interface TensorInfo {
  /** Element type as stored. */
  dtype: SafetensorsDtype;
  /** Shape, outermost dimension first (row-major). `[]` is a scalar. */
  shape: number[];
  /** Absolute offset of the first byte in the file (header included). */
  byteOffset: number;
  /** Number of bytes: product(shape) × bytes per element. */
  byteLength: number;
}

/** A {@link TensorInfo} inside a (possibly sharded) checkpoint, with the file it lives in. */
export interface CheckpointTensorInfo extends TensorInfo {
  /** Absolute path of the safetensors file that holds the tensor. */
  file: string;
}

/** What tensors are converted to when read: float32, or f16 bit patterns. */
export type TargetDtype = "f32" | "f16";

/** Read access to named tensors, shared by single files and sharded checkpoints. */
export interface TensorSource<Info extends TensorInfo = TensorInfo> {
  /** Every tensor by name, in header order. */
  readonly tensors: ReadonlyMap<string, Info>;
  /** The `__metadata__` string map (for a sharded checkpoint: the index's `metadata`, as strings). */
  readonly metadata: ReadonlyMap<string, string>;
  /**
   * Read one tensor converted to float32.
   *
   * @param name The tensor name.
   * @param targetDtype `"f32"`.
   * @returns A new Float32Array with product(shape) elements.
   */
  readTensor(name: string, targetDtype: "f32"): Promise<Float32Array>;
  /**
   * Read one tensor converted to f16 bit patterns (round to nearest even).
   *
   * @param name The tensor name.
   * @param targetDtype `"f16"`.
   * @returns A new Uint16Array of f16 bit patterns with product(shape) elements.
   */
  readTensor(name: string, targetDtype: "f16"): Promise<Uint16Array>;
  /**
   * Read one tensor converted to the given type.
   *
   * @param name The tensor name.
   * @param targetDtype `"f32"` or `"f16"`.
   * @returns The converted values.
   */
  readTensor(name: string, targetDtype: TargetDtype): Promise<Float32Array | Uint16Array>;
  /**
   * Read one tensor's bytes exactly as stored (little-endian).
   *
   * @param name The tensor name.
   * @returns A new byte array of `byteLength` bytes.
   */
  readRaw(name: string): Promise<Uint8Array>;
  /** Close the underlying file(s). Reads after this fail. */
  close(): void;
}

/** One open safetensors file. */
export interface SafetensorsFile extends TensorSource<TensorInfo> {
  /** The file's path as given to {@link openSafetensors}. */
  readonly path: string;
  /** Offset of the data section (8 + header length). */
  readonly dataOffset: number;
}

/** One view over every tensor of a model folder (single file or shards). */
export interface Checkpoint extends TensorSource<CheckpointTensorInfo> {
  /** The model folder. */
  readonly folder: string;
  /** The safetensors files, in the order they were opened. */
  readonly files: readonly string[];
}

/** A tensor to write: its dtype, shape and data (f16/bf16 as bit patterns). */
export type TensorToWrite =
  | { dtype: "F32"; shape: readonly number[]; data: Float32Array }
  | { dtype: "F16"; shape: readonly number[]; data: Uint16Array }
  | { dtype: "BF16"; shape: readonly number[]; data: Uint16Array }
  | { dtype: "I32"; shape: readonly number[]; data: Int32Array }
  | { dtype: "I64"; shape: readonly number[]; data: BigInt64Array };

/** The header size limit of the reference implementation (100 MB). */
export const MAX_HEADER_BYTES = 100_000_000;

// The dtype order of the Rust `safetensors` crate (its `Dtype` enum, increasing alignment). Writers sort
// tensors by this order, descending, then by name; we do the same so files are byte-identical.
const DTYPE_ORDER: readonly SafetensorsDtype[] = [
  "BOOL",
  "U8",
  "I8",
  "F8_E5M2",
  "F8_E4M3",
  "I16",
  "U16",
  "F16",
  "BF16",
  "I32",
  "U32",
  "F32",
  "F64",
  "I64",
  "U64",
];

const WRITABLE_ARRAY: Readonly<Record<TensorToWrite["dtype"], { name: string; ctor: unknown }>> = {
  F32: { name: "Float32Array", ctor: Float32Array },
  F16: { name: "Uint16Array (f16 bit patterns)", ctor: Uint16Array },
  BF16: { name: "Uint16Array (bf16 bit patterns)", ctor: Uint16Array },
  I32: { name: "Int32Array", ctor: Int32Array },
  I64: { name: "BigInt64Array", ctor: BigInt64Array },
};

const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

// ---------------------------------------------------------------------------------------------------
// Strict JSON: objects become Maps, duplicate keys and `__proto__` are errors, nesting is bounded.
// ---------------------------------------------------------------------------------------------------

/** A parsed JSON value; objects are Maps so no key can reach a prototype. */
type Json = null | boolean | number | string | Json[] | JsonObject;
interface JsonObject extends Map<string, Json> {}

class JsonError extends Error {}

const MAX_JSON_DEPTH = 64;

/**
 * Parse JSON text strictly (RFC 8259) into Maps and arrays.
 * Throws JsonError for syntax errors, duplicate keys within one object, and `__proto__` keys.
 */
function parseStrictJson(text: string): Json {
  let pos = 0;
  const fail = (what: string): never => {
    throw new JsonError(`${what} at character ${pos}`);
  };
  const skipSpace = () => {
    for (;;) {
      const c = text.charCodeAt(pos);
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) pos++;
      else return;
    }
  };
  const parseString = (): string => {
    // pos is at the opening quote.
    pos++;
    let out = "";
    let start = pos;
    for (;;) {
      if (pos >= text.length) fail("unterminated string");
      const c = text.charCodeAt(pos);
      if (c === 0x22) {
        out += text.slice(start, pos);
        pos++;
        return out;
      }
      if (c < 0x20) fail("control character in string");
      if (c !== 0x5c) {
        pos++;
        continue;
      }
      out += text.slice(start, pos);
      const e = text[pos + 1];
      pos += 2;
      switch (e) {
        case '"':
          out += '"';
          break;
        case "\\":
          out += "\\";
          break;
        case "/":
          out += "/";
          break;
        case "b":
          out += "\b";
          break;
        case "f":
          out += "\f";
          break;
        case "n":
          out += "\n";
          break;
        case "r":
          out += "\r";
          break;
        case "t":
          out += "\t";
          break;
        case "u": {
          const hex = text.slice(pos, pos + 4);
          if (!/^[0-9a-fA-F]{4}$/.test(hex)) fail("bad \\u escape");
          out += String.fromCharCode(parseInt(hex, 16));
          pos += 4;
          break;
        }
        default:
          pos -= 1;
          fail("bad escape");
      }
      start = pos;
    }
  };
  const numberPattern = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;
  const parseValue = (depth: number): Json => {
    if (depth > MAX_JSON_DEPTH) fail("nesting too deep");
    skipSpace();
    const c = text[pos];
    if (c === "{") {
      pos++;
      const obj: JsonObject = new Map();
      skipSpace();
      if (text[pos] === "}") {
        pos++;
        return obj;
      }
      for (;;) {
        skipSpace();
        if (text[pos] !== '"') fail("expected a string key");
        const keyPos = pos;
        const key = parseString();
        if (key === "__proto__") {
          pos = keyPos;
          fail('forbidden key "__proto__"');
        }
        if (obj.has(key)) {
          pos = keyPos;
          fail(`duplicate key ${JSON.stringify(key)}`);
        }
        skipSpace();
        if (text[pos] !== ":") fail("expected ':'");
        pos++;
        obj.set(key, parseValue(depth + 1));
        skipSpace();
        if (text[pos] === ",") {
          pos++;
          continue;
        }
        if (text[pos] === "}") {
          pos++;
          return obj;
        }
        fail("expected ',' or '}'");
      }
    }
    if (c === "[") {
      pos++;
      const arr: Json[] = [];
      skipSpace();
      if (text[pos] === "]") {
        pos++;
        return arr;
      }
      for (;;) {
        arr.push(parseValue(depth + 1));
        skipSpace();
        if (text[pos] === ",") {
          pos++;
          continue;
        }
        if (text[pos] === "]") {
          pos++;
          return arr;
        }
        fail("expected ',' or ']'");
      }
    }
    if (c === '"') return parseString();
    if (text.startsWith("true", pos)) {
      pos += 4;
      return true;
    }
    if (text.startsWith("false", pos)) {
      pos += 5;
      return false;
    }
    if (text.startsWith("null", pos)) {
      pos += 4;
      return null;
    }
    numberPattern.lastIndex = pos;
    const m = numberPattern.exec(text);
    if (m === null) return fail(pos >= text.length ? "unexpected end of text" : "unexpected character");
    pos += m[0].length;
    return Number(m[0]);
  };
  const value = parseValue(0);
  skipSpace();
  if (pos !== text.length) fail("unexpected text after the JSON value");
  return value;
}

function isJsonObject(v: Json | undefined): v is JsonObject {
  return v instanceof Map;
}

// ---------------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------------

function invalid(path: string, detail: string): InvalidFileError {
  return new InvalidFileError(
    `${path} is not a valid safetensors file: ${detail}. The file is damaged, truncated or was not ` +
      `written by a safetensors library; download or save it again.`,
  );
}

function describe(value: Json | undefined): string {
  if (value === undefined) return "nothing";
  if (value instanceof Map) return "an object";
  return JSON.stringify(value);
}

/** Validate the parsed header and lay out the tensors. Throws InvalidFileError naming the problem. */
function validateHeader(
  path: string,
  header: Json,
  dataOffset: number,
  dataSize: number,
): { tensors: Map<string, TensorInfo>; metadata: Map<string, string> } {
  if (!isJsonObject(header)) throw invalid(path, `the header is ${describe(header)}, not a JSON object`);
  const metadata = new Map<string, string>();
  const entries: { name: string; info: TensorInfo; begin: number; end: number }[] = [];
  for (const [name, value] of header) {
    if (name === "__metadata__") {
      if (!isJsonObject(value)) throw invalid(path, `"__metadata__" is ${describe(value)}, not an object`);
      for (const [key, v] of value) {
        if (typeof v !== "string") {
          throw invalid(path, `"__metadata__" entry ${JSON.stringify(key)} is ${describe(v)}, not a string`);
        }
        metadata.set(key, v);
      }
      continue;
    }
    const where = `tensor ${JSON.stringify(name)}`;
    if (!isJsonObject(value)) throw invalid(path, `${where} is ${describe(value)}, not an object`);
    const dtype = value.get("dtype");
    if (typeof dtype !== "string" || !Object.hasOwn(DTYPE_BYTES, dtype)) {
      throw invalid(
        path,
        `${where} has dtype ${describe(dtype)}; known dtypes are ${Object.keys(DTYPE_BYTES).join(", ")}`,
      );
    }
    const elementBytes = DTYPE_BYTES[dtype as SafetensorsDtype];
    const shapeValue = value.get("shape");
    if (!Array.isArray(shapeValue)) {
      throw invalid(path, `${where} has shape ${describe(shapeValue)}, not a list`);
    }
    const shape: number[] = [];
    let elements = 1;
    for (const d of shapeValue) {
      if (typeof d !== "number" || !Number.isSafeInteger(d) || d < 0) {
        throw invalid(path, `${where} has shape ${describe(shapeValue)}; dimensions must be integers >= 0`);
      }
      shape.push(d);
      elements *= d;
      if (!Number.isSafeInteger(elements)) {
        throw invalid(path, `${where} has shape ${describe(shapeValue)} whose element count overflows`);
      }
    }
    const byteLength = elements * elementBytes;
    if (!Number.isSafeInteger(byteLength)) {
      throw invalid(path, `${where} has shape ${describe(shapeValue)} whose byte size overflows`);
    }
    const offsets = value.get("data_offsets");
    if (
      !Array.isArray(offsets) || offsets.length !== 2 ||
      !offsets.every((o) => typeof o === "number" && Number.isSafeInteger(o) && o >= 0)
    ) {
      throw invalid(
        path,
        `${where} has data_offsets ${describe(offsets)}; expected [begin, end] integers >= 0`,
      );
    }
    const [begin, end] = offsets as [number, number];
    if (end < begin) {
      throw invalid(path, `${where} has data_offsets [${begin}, ${end}] with end before begin`);
    }
    if (end > dataSize) {
      throw invalid(
        path,
        `${where} has data_offsets [${begin}, ${end}] past the end of the data section (${dataSize} bytes)`,
      );
    }
    if (end - begin !== byteLength) {
      throw invalid(
        path,
        `${where} is ${dtype} with shape [${shape.join(", ")}], which is ${byteLength} bytes, but its ` +
          `data_offsets [${begin}, ${end}] span ${end - begin} bytes`,
      );
    }
    entries.push({
      name,
      info: { dtype: dtype as SafetensorsDtype, shape, byteOffset: dataOffset + begin, byteLength },
      begin,
      end,
    });
  }
  // Zero-byte tensors occupy no bytes and cannot overlap anything; compare each tensor with the
  // furthest-reaching non-empty tensor that starts before it.
  const byBegin = entries.filter((e) => e.end > e.begin).sort((a, b) => a.begin - b.begin || a.end - b.end);
  let reach: (typeof entries)[number] | null = null;
  for (const cur of byBegin) {
    if (reach !== null && cur.begin < reach.end) {
      const a = `${JSON.stringify(reach.name)} [${reach.begin}, ${reach.end}]`;
      const b = `${JSON.stringify(cur.name)} [${cur.begin}, ${cur.end}]`;
      throw invalid(path, `tensors ${a} and ${b} overlap`);
    }
    if (reach === null || cur.end > reach.end) reach = cur;
  }
  const tensors = new Map<string, TensorInfo>();
  for (const e of entries) tensors.set(e.name, e.info);
  return { tensors, metadata };
}

async function readFully(file: Deno.FsFile, into: Uint8Array, path: string): Promise<void> {
  let filled = 0;
  while (filled < into.length) {
    const n = await file.read(into.subarray(filled));
    if (n === null) throw invalid(path, `the file ended ${into.length - filled} bytes early`);
    filled += n;
  }
}

/** Convert stored bytes (a fresh, aligned buffer) to float32. */
function bytesToF32(dtype: SafetensorsDtype, bytes: Uint8Array): Float32Array {
  const buf = bytes.buffer as ArrayBuffer;
  switch (dtype) {
    case "F32":
      return new Float32Array(buf, bytes.byteOffset, bytes.byteLength / 4);
    case "F64":
      return Float32Array.from(new Float64Array(buf, bytes.byteOffset, bytes.byteLength / 8));
    case "F16":
      return f16ArrayToF32(new Uint16Array(buf, bytes.byteOffset, bytes.byteLength / 2));
    case "BF16":
      return bf16ArrayToF32(new Uint16Array(buf, bytes.byteOffset, bytes.byteLength / 2));
    case "I64": {
      const src = new BigInt64Array(buf, bytes.byteOffset, bytes.byteLength / 8);
      const out = new Float32Array(src.length);
      for (let i = 0; i < src.length; i++) out[i] = Number(src[i]!);
      return out;
    }
    case "U64": {
      const src = new BigUint64Array(buf, bytes.byteOffset, bytes.byteLength / 8);
      const out = new Float32Array(src.length);
      for (let i = 0; i < src.length; i++) out[i] = Number(src[i]!);
      return out;
    }
    case "I32":
      return new Float32Array(new Int32Array(buf, bytes.byteOffset, bytes.byteLength / 4));
    case "U32":
      return new Float32Array(new Uint32Array(buf, bytes.byteOffset, bytes.byteLength / 4));
    case "I16":
      return new Float32Array(new Int16Array(buf, bytes.byteOffset, bytes.byteLength / 2));
    case "U16":
      return new Float32Array(new Uint16Array(buf, bytes.byteOffset, bytes.byteLength / 2));
    case "I8":
      return new Float32Array(new Int8Array(buf, bytes.byteOffset, bytes.byteLength));
    case "U8":
      return new Float32Array(bytes);
    case "BOOL":
      return Float32Array.from(bytes, (b) => (b !== 0 ? 1 : 0));
    case "F8_E4M3":
      return f8E4M3ArrayToF32(bytes);
    case "F8_E5M2":
      return f8E5M2ArrayToF32(bytes);
  }
}

function missingTensor(name: string, where: string, names: Iterable<string>): PromptgateError {
  const all = [...names];
  // Names that differ only in a layer index are the likely intended ones.
  const shape = (n: string) => n.replace(/\d+/g, "#");
  const close = all.filter((n) => shape(n) === shape(name)).slice(0, 5);
  const hint = close.length > 0
    ? ` Similar names: ${close.join(", ")}.`
    : all.length > 0
    ? ` It has ${all.length} tensors, e.g. ${all.slice(0, 3).join(", ")}.`
    : " It has no tensors.";
  return new PromptgateError(
    `tensor ${JSON.stringify(name)} is not in ${where}.${hint} Check that the checkpoint matches the ` +
      `model architecture.`,
  );
}

class SafetensorsReader implements SafetensorsFile {
  readonly path: string;
  readonly dataOffset: number;
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  readonly metadata: ReadonlyMap<string, string>;
  #file: Deno.FsFile | null;
  // Reads seek the shared file handle, so they run one at a time in call order.
  #queue: Promise<unknown> = Promise.resolve();

  constructor(
    path: string,
    file: Deno.FsFile,
    dataOffset: number,
    tensors: Map<string, TensorInfo>,
    metadata: Map<string, string>,
  ) {
    this.path = path;
    this.#file = file;
    this.dataOffset = dataOffset;
    this.tensors = tensors;
    this.metadata = metadata;
  }

  readRaw(name: string): Promise<Uint8Array> {
    const info = this.tensors.get(name);
    if (info === undefined) return Promise.reject(missingTensor(name, this.path, this.tensors.keys()));
    const run = async (): Promise<Uint8Array> => {
      const file = this.#file;
      if (file === null) {
        throw new PromptgateError(`${this.path} was closed; open it again before reading "${name}".`);
      }
      const bytes = new Uint8Array(info.byteLength);
      await file.seek(info.byteOffset, Deno.SeekMode.Start);
      await readFully(file, bytes, this.path);
      return bytes;
    };
    const result = this.#queue.then(run, run);
    this.#queue = result.catch(() => {});
    return result;
  }

  readTensor(name: string, targetDtype: "f32"): Promise<Float32Array>;
  readTensor(name: string, targetDtype: "f16"): Promise<Uint16Array>;
  readTensor(name: string, targetDtype: TargetDtype): Promise<Float32Array | Uint16Array>;
  async readTensor(name: string, targetDtype: TargetDtype): Promise<Float32Array | Uint16Array> {
    if (targetDtype !== "f32" && targetDtype !== "f16") {
      throw new UnsupportedConfigError(
        `readTensor target dtype must be "f32" or "f16", got ${String(targetDtype)}.`,
      );
    }
    if (!LITTLE_ENDIAN_HOST) {
      throw new UnsupportedConfigError(
        "safetensors data is little-endian and this machine is big-endian; promptgate does not byte-swap.",
      );
    }
    const bytes = await this.readRaw(name);
    const dtype = this.tensors.get(name)!.dtype;
    if (targetDtype === "f16" && dtype === "F16") {
      return new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
    }
    const f32 = bytesToF32(dtype, bytes);
    return targetDtype === "f32" ? f32 : f32ArrayToF16(f32);
  }

  close(): void {
    if (this.#file !== null) {
      this.#file.close();
      this.#file = null;
    }
  }
}

/**
 * Open a safetensors file: read and validate its header, keeping the file open for tensor reads.
 *
 * Only the 8-byte length and the JSON header are read here. The header length is checked against the
 * file size and the 100 MB limit before the header is allocated; then every entry's dtype, shape and
 * offsets are checked (offsets inside the data section, no two tensors overlapping, byte sizes matching
 * dtype × shape, no integer overflow), tensor names must be unique and `__metadata__` must map strings to
 * strings.
 *
 * @param path Path of the `.safetensors` file.
 * @returns The open file; call `close()` when done.
 * @throws {InvalidFileError} When the file is missing, truncated or its header is invalid.
 *
 * @example Read one weight as float32
 * ```ts ignore
 * import { openSafetensors } from "./safetensors.ts";
 * const st = await openSafetensors("model/model.safetensors");
 * try {
 *   const info = st.tensors.get("model.norm.weight")!;
 *   const values = await st.readTensor("model.norm.weight", "f32");
 *   console.log(info.shape, values.length);
 * } finally {
 *   st.close();
 * }
 * ```
 */
export async function openSafetensors(path: string): Promise<SafetensorsFile> {
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new InvalidFileError(`safetensors file ${path} does not exist; check the path.`, {
        cause: error,
      });
    }
    throw new InvalidFileError(
      `could not open safetensors file ${path}: ${(error as Error).message}. Check its permissions.`,
      { cause: error },
    );
  }
  try {
    const { size, isFile } = await file.stat();
    if (!isFile) throw new InvalidFileError(`${path} is not a file; pass the path of a .safetensors file.`);
    if (size < 8) throw invalid(path, `it is ${size} bytes long, shorter than the 8-byte header length`);
    const lengthBytes = new Uint8Array(8);
    await readFully(file, lengthBytes, path);
    const headerLength = new DataView(lengthBytes.buffer).getBigUint64(0, true);
    if (headerLength > BigInt(size - 8)) {
      throw invalid(
        path,
        `the header length ${headerLength} is larger than the rest of the file (${size - 8} bytes)`,
      );
    }
    if (headerLength > BigInt(MAX_HEADER_BYTES)) {
      throw invalid(path, `the header length ${headerLength} is over the ${MAX_HEADER_BYTES}-byte limit`);
    }
    const n = Number(headerLength);
    const headerBytes = new Uint8Array(n);
    await readFully(file, headerBytes, path);
    let text: string;
    try {
      text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(headerBytes);
    } catch {
      throw invalid(path, "the header is not valid UTF-8");
    }
    let header: Json;
    try {
      header = parseStrictJson(text);
    } catch (error) {
      if (error instanceof JsonError) throw invalid(path, `the header is not valid JSON (${error.message})`);
      throw error;
    }
    const dataOffset = 8 + n;
    const { tensors, metadata } = validateHeader(path, header, dataOffset, size - dataOffset);
    return new SafetensorsReader(path, file, dataOffset, tensors, metadata);
  } catch (error) {
    file.close();
    throw error;
  }
}

// ---------------------------------------------------------------------------------------------------
// Checkpoints (single file or shards)
// ---------------------------------------------------------------------------------------------------

/** The single-file checkpoint name transformers writes. */
export const SAFETENSORS_WEIGHTS_NAME = "model.safetensors";
/** The shard index name transformers writes for sharded checkpoints. */
export const SAFETENSORS_INDEX_NAME = "model.safetensors.index.json";

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/**
 * Check that a shard name from an index file is a plain file name inside the folder.
 * The index is untrusted: a name like `../../etc/passwd` must not reach the file system.
 */
function checkShardName(indexPath: string, tensor: string, shard: Json | undefined): string {
  const bad = (why: string) =>
    new InvalidFileError(
      `${indexPath} maps tensor ${JSON.stringify(tensor)} to shard ${describe(shard)}, which ${why}. Shard ` +
        `names must be plain file names in the same folder; fix or re-download the index.`,
    );
  if (typeof shard !== "string" || shard.length === 0) throw bad("is not a file name");
  if (shard.includes("\0")) throw bad("contains a NUL character");
  if (shard.includes("/") || shard.includes("\\")) throw bad("contains a path separator");
  if (shard === "." || shard === ".." || shard.includes("..")) throw bad("contains '..'");
  if (isAbsolute(shard) || /^[A-Za-z]:/.test(shard)) throw bad("is an absolute path");
  return shard;
}

class CheckpointReader implements Checkpoint {
  readonly folder: string;
  readonly files: readonly string[];
  readonly tensors: ReadonlyMap<string, CheckpointTensorInfo>;
  readonly metadata: ReadonlyMap<string, string>;
  #byName: Map<string, SafetensorsFile>;
  #shards: SafetensorsFile[];

  constructor(
    folder: string,
    shards: SafetensorsFile[],
    tensors: Map<string, CheckpointTensorInfo>,
    byName: Map<string, SafetensorsFile>,
    metadata: Map<string, string>,
  ) {
    this.folder = folder;
    this.#shards = shards;
    this.files = shards.map((s) => s.path);
    this.tensors = tensors;
    this.#byName = byName;
    this.metadata = metadata;
  }

  #shardOf(name: string): SafetensorsFile {
    const shard = this.#byName.get(name);
    if (shard === undefined) {
      throw missingTensor(name, `the checkpoint in ${this.folder}`, this.tensors.keys());
    }
    return shard;
  }

  readRaw(name: string): Promise<Uint8Array> {
    try {
      return this.#shardOf(name).readRaw(name);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  readTensor(name: string, targetDtype: "f32"): Promise<Float32Array>;
  readTensor(name: string, targetDtype: "f16"): Promise<Uint16Array>;
  readTensor(name: string, targetDtype: TargetDtype): Promise<Float32Array | Uint16Array>;
  readTensor(name: string, targetDtype: TargetDtype): Promise<Float32Array | Uint16Array> {
    try {
      return this.#shardOf(name).readTensor(name, targetDtype);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  close(): void {
    for (const shard of this.#shards) shard.close();
  }
}

/**
 * Open every safetensors file of a model folder as one set of tensors.
 *
 * Handles `model.safetensors.index.json` (its `weight_map` names the shard of each tensor; shard names
 * must be plain file names inside the folder) and a single `model.safetensors`. Every tensor named in
 * the index must be in its shard, and no tensor may appear in two shards.
 *
 * @param folder The model folder (e.g. a hub snapshot).
 * @returns One view over all tensors; call `close()` when done.
 * @throws {InvalidFileError} When no safetensors weights are found or a file or the index is invalid.
 *
 * @example List a checkpoint's tensors
 * ```ts ignore
 * import { openCheckpoint } from "./safetensors.ts";
 * const ckpt = await openCheckpoint("models/TinyLlama");
 * for (const [name, info] of ckpt.tensors) console.log(name, info.dtype, info.shape);
 * ckpt.close();
 * ```
 */
export async function openCheckpoint(folder: string): Promise<Checkpoint> {
  const indexPath = join(folder, SAFETENSORS_INDEX_NAME);
  const singlePath = join(folder, SAFETENSORS_WEIGHTS_NAME);
  const shards: SafetensorsFile[] = [];
  const tensors = new Map<string, CheckpointTensorInfo>();
  const byName = new Map<string, SafetensorsFile>();
  const add = (shard: SafetensorsFile) => {
    for (const [name, info] of shard.tensors) {
      const other = byName.get(name);
      if (other !== undefined) {
        throw new InvalidFileError(
          `tensor ${
            JSON.stringify(name)
          } is in both ${other.path} and ${shard.path}; a checkpoint must hold ` +
            `each tensor once. Remove the stray file or re-download the checkpoint.`,
        );
      }
      byName.set(name, shard);
      tensors.set(name, { ...info, file: shard.path });
    }
  };
  try {
    if (await exists(indexPath)) {
      let text: string;
      try {
        text = await Deno.readTextFile(indexPath);
      } catch (error) {
        throw new InvalidFileError(`could not read ${indexPath}: ${(error as Error).message}.`, {
          cause: error,
        });
      }
      let index: Json;
      try {
        index = parseStrictJson(text);
      } catch (error) {
        if (!(error instanceof JsonError)) throw error;
        throw new InvalidFileError(
          `${indexPath} is not valid JSON (${error.message}); re-download the checkpoint.`,
          { cause: error },
        );
      }
      const weightMap = isJsonObject(index) ? index.get("weight_map") : undefined;
      if (!isJsonObject(weightMap)) {
        throw new InvalidFileError(
          `${indexPath} has no "weight_map" object mapping tensor names to shard files; re-download the checkpoint.`,
        );
      }
      const wanted = new Map<string, string[]>();
      for (const [tensor, shard] of weightMap) {
        const file = checkShardName(indexPath, tensor, shard);
        const list = wanted.get(file);
        if (list === undefined) wanted.set(file, [tensor]);
        else list.push(tensor);
      }
      if (wanted.size === 0) {
        throw new InvalidFileError(`${indexPath} lists no tensors; re-download the checkpoint.`);
      }
      for (const [file, names] of wanted) {
        const shard = await openSafetensors(join(folder, file));
        shards.push(shard);
        for (const name of names) {
          if (!shard.tensors.has(name)) {
            throw new InvalidFileError(
              `${indexPath} says tensor ${
                JSON.stringify(name)
              } is in ${file}, but that file does not hold it; ` +
                `the index and shards are from different checkpoints. Re-download the checkpoint.`,
            );
          }
        }
        add(shard);
      }
      const metadata = new Map<string, string>();
      const meta = isJsonObject(index) ? index.get("metadata") : undefined;
      if (isJsonObject(meta)) {
        for (const [k, v] of meta) metadata.set(k, typeof v === "string" ? v : JSON.stringify(v));
      }
      return new CheckpointReader(folder, shards, tensors, byName, metadata);
    }
    if (await exists(singlePath)) {
      const shard = await openSafetensors(singlePath);
      shards.push(shard);
      add(shard);
      return new CheckpointReader(folder, shards, tensors, byName, new Map(shard.metadata));
    }
  } catch (error) {
    for (const shard of shards) shard.close();
    throw error;
  }
  const hasBin = (await exists(join(folder, "pytorch_model.bin"))) ||
    (await exists(join(folder, "pytorch_model.bin.index.json")));
  throw new InvalidFileError(
    `no ${SAFETENSORS_WEIGHTS_NAME} or ${SAFETENSORS_INDEX_NAME} in ${folder}. ` +
      (hasBin
        ? "The folder only has PyTorch .bin weights, which promptgate does not load (they can run code); " +
          "convert them with transformers: AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, " +
          "safe_serialization=True)."
        : "Pass the folder that holds the model's config.json and safetensors weights."),
  );
}

// ---------------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------------

function compareUtf8(a: string, b: string): number {
  // Rust compares strings by UTF-8 bytes, which is code point order; JS `<` compares UTF-16 units.
  const ia = a[Symbol.iterator]();
  const ib = b[Symbol.iterator]();
  for (;;) {
    const x = ia.next();
    const y = ib.next();
    if (x.done || y.done) return x.done === y.done ? 0 : x.done ? -1 : 1;
    const cx = x.value.codePointAt(0)!;
    const cy = y.value.codePointAt(0)!;
    if (cx !== cy) return cx < cy ? -1 : 1;
  }
}

function writeError(detail: string): PromptgateError {
  return new PromptgateError(`cannot write safetensors: ${detail}.`);
}

/**
 * Build a safetensors file as a list of byte chunks (the header, then each tensor's bytes as views of the
 * given arrays, not copies).
 */
function encodeChunks(
  tensors: Readonly<Record<string, TensorToWrite>>,
  metadata: Readonly<Record<string, string>> | undefined,
): Uint8Array[] {
  if (!LITTLE_ENDIAN_HOST) {
    throw new UnsupportedConfigError("safetensors data is little-endian and this machine is big-endian.");
  }
  const names = Object.keys(tensors);
  for (const name of names) {
    if (name === "__metadata__" || name === "__proto__") {
      throw writeError(`the tensor name "${name}" is reserved`);
    }
    const t = tensors[name]!;
    const spec = WRITABLE_ARRAY[t.dtype];
    if (spec === undefined) {
      throw writeError(
        `tensor "${name}" has dtype ${String(t.dtype)}; writable dtypes are ${
          Object.keys(WRITABLE_ARRAY).join(", ")
        }`,
      );
    }
    if (!(t.data instanceof (spec.ctor as typeof Float32Array))) {
      throw writeError(`tensor "${name}" is ${t.dtype}, so its data must be a ${spec.name}`);
    }
    let elements = 1;
    for (const d of t.shape) {
      if (!Number.isSafeInteger(d) || d < 0) {
        throw writeError(
          `tensor "${name}" has shape [${t.shape.join(", ")}]; dimensions must be integers >= 0`,
        );
      }
      elements *= d;
    }
    if (elements !== t.data.length) {
      throw writeError(
        `tensor "${name}" has shape [${
          t.shape.join(", ")
        }] (${elements} elements) but ${t.data.length} values`,
      );
    }
  }
  const order = (d: SafetensorsDtype) => DTYPE_ORDER.indexOf(d);
  names.sort((a, b) => order(tensors[b]!.dtype) - order(tensors[a]!.dtype) || compareUtf8(a, b));

  // Build the header text by hand so key order is exactly the Python library's.
  const parts: string[] = [];
  if (metadata !== undefined) {
    const keys = Object.keys(metadata).sort(compareUtf8);
    for (const key of keys) {
      if (typeof metadata[key] !== "string") throw writeError(`metadata value for "${key}" must be a string`);
    }
    parts.push(
      `"__metadata__":{${keys.map((k) => `${JSON.stringify(k)}:${JSON.stringify(metadata[k])}`).join(",")}}`,
    );
  }
  let offset = 0;
  const chunks: Uint8Array[] = [];
  for (const name of names) {
    const t = tensors[name]!;
    const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    parts.push(
      `${JSON.stringify(name)}:{"dtype":"${t.dtype}","shape":[${
        t.shape.join(",")
      }],"data_offsets":[${offset},${offset + bytes.byteLength}]}`,
    );
    offset += bytes.byteLength;
    chunks.push(bytes);
  }
  const json = new TextEncoder().encode(`{${parts.join(",")}}`);
  const padded = Math.ceil(json.length / 8) * 8;
  const head = new Uint8Array(8 + padded);
  new DataView(head.buffer).setBigUint64(0, BigInt(padded), true);
  head.set(json, 8);
  head.fill(0x20, 8 + json.length);
  return [head, ...chunks];
}

/**
 * Encode tensors as the bytes of a safetensors file, in memory.
 *
 * Same layout as {@link writeSafetensors}; use it for small files or to hash/compare content.
 *
 * @param tensors Tensors by name.
 * @param metadata Optional `__metadata__` string map (PEFT and transformers write `{format: "pt"}`).
 * @returns The file's bytes.
 * @throws {PromptgateError} When a tensor's data does not match its dtype or shape.
 */
export function serializeSafetensors(
  tensors: Readonly<Record<string, TensorToWrite>>,
  metadata?: Readonly<Record<string, string>>,
): Uint8Array {
  const chunks = encodeChunks(tensors, metadata);
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.byteLength, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.byteLength;
  }
  return out;
}

/**
 * Write tensors to a safetensors file, atomically, byte-compatible with the Python library.
 *
 * Tensors are laid out as `safetensors.torch.save_file` does: sorted by dtype (widest first) then by
 * name, with the JSON header padded with spaces to a multiple of 8 bytes so every tensor is aligned.
 * The file is written to a temporary file in the same folder, flushed, and renamed over `path`.
 *
 * @param path The file to create or replace.
 * @param tensors Tensors by name; F16 and BF16 data are bit patterns in a Uint16Array.
 * @param metadata Optional `__metadata__` string map (PEFT and transformers write `{format: "pt"}`).
 * @returns Resolves when the file is durable.
 * @throws {PromptgateError} When a tensor's data does not match its dtype or shape, or the write fails.
 *
 * @example Save an adapter
 * ```ts ignore
 * import { writeSafetensors } from "./safetensors.ts";
 * await writeSafetensors("adapter_model.safetensors", {
 *   "base_model.model.model.layers.1.self_attn.adaption_gate": {
 *     dtype: "F32",
 *     shape: [1],
 *     data: new Float32Array([0]),
 *   },
 * }, { format: "pt" });
 * ```
 */
export async function writeSafetensors(
  path: string,
  tensors: Readonly<Record<string, TensorToWrite>>,
  metadata?: Readonly<Record<string, string>>,
): Promise<void> {
  await writeFileAtomic(path, encodeChunks(tensors, metadata));
}
