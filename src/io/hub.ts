/**
 * Where a model comes from: a local folder, or a Hugging Face hub id resolved through the standard HF
 * cache (the layout Python's `huggingface_hub` uses, so both share downloads).
 *
 * {@link resolveModelSource} returns a local folder. A hub id `org/name` is looked up at a revision
 * (default `main`), and only the files promptgate needs are downloaded into
 * `<cache>/models--org--name/{blobs,snapshots/<sha>,refs/<revision>}`: the configs, the tokenizer files
 * and the safetensors weights (for a sharded checkpoint, exactly the shards its index names, never
 * duplicate `consolidated.safetensors` or `.bin` weights). Downloads go through `@huggingface/hub`
 * (`modelInfo`, `listFiles`, `downloadFile`), are written atomically, and show a progress bar on a
 * terminal. In offline mode (`HF_HUB_OFFLINE=1`) the cache alone answers.
 *
 * @module
 */

import { dirname, isAbsolute, join, relative, resolve } from "../_std.ts";
import { homedir } from "../_std.ts";
import type { HubApiError as HubApiErrorType } from "@huggingface/hub";
import { InvalidFileError, PromptgateError } from "../errors.ts";
import { writeFileAtomic } from "./atomic_write.ts";

/** Top-level files of a model repository that promptgate downloads (weights are chosen separately). */
export const MODEL_FILES: readonly string[] = Object.freeze([
  "config.json",
  "generation_config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "chat_template.jinja",
]);

/** Progress of a snapshot download, reported once per chunk and once when each file completes. */
export interface DownloadProgress {
  /** The hub id being downloaded. */
  repo: string;
  /** The file being downloaded. */
  file: string;
  /** Bytes of this file received so far. */
  fileBytes: number;
  /** Size of this file in bytes. */
  fileSize: number;
  /** Bytes received so far over all files of this download. */
  bytes: number;
  /** Bytes to download in all (files already in the cache excluded). */
  totalBytes: number;
  /** 1-based index of this file among the files to download. */
  fileIndex: number;
  /** Number of files to download. */
  fileCount: number;
  /** True on the event that reports this file complete. */
  fileDone: boolean;
}

/** Options for {@link resolveModelSource}. */
export interface ResolveModelOptions {
  /** Branch, tag or 40-hex commit (default `"main"`). */
  revision?: string;
  /** Cache folder (default: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`). */
  cacheDir?: string;
  /** Access token for private or gated models (default: `HF_TOKEN`, else the token `huggingface-cli login` saved). */
  token?: string;
  /** Use only the cache, never the network (default: `HF_HUB_OFFLINE` is 1/true/yes/on). */
  offline?: boolean;
  /** Called with download progress; replaces the default bar / log lines on stderr. */
  onProgress?: (progress: DownloadProgress) => void;
  /** No progress output at all (ignored when `onProgress` is given). */
  quiet?: boolean;
  /** The fetch to use (a proxy, or a fake hub in tests). */
  fetch?: typeof fetch;
  /** Hub address (default: `HF_ENDPOINT`, else https://huggingface.co). */
  hubUrl?: string;
}

const COMMIT_HASH = /^[0-9a-f]{40}$/;
const REPO_PART = /^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$/;

/** Read an environment variable; undefined when unset or when permission to read it was not granted. */
function env(name: string): string | undefined {
  try {
    return Deno.env.get(name);
  } catch {
    return undefined;
  }
}

function isTruthy(value: string | undefined): boolean {
  return value !== undefined && ["1", "true", "yes", "on"].includes(value.trim().toLowerCase());
}

function homeFolder(): string {
  const home = env("HOME") ?? env("USERPROFILE");
  if (home !== undefined && home !== "") return home;
  try {
    return homedir();
  } catch {
    throw new PromptgateError(
      "cannot find the home folder for the Hugging Face cache; set HF_HUB_CACHE (or HF_HOME), or pass cacheDir.",
    );
  }
}

function hfHome(): string {
  return env("HF_HOME") ?? join(env("XDG_CACHE_HOME") ?? join(homeFolder(), ".cache"), "huggingface");
}

/**
 * The Hugging Face hub cache folder, chosen as `huggingface_hub` chooses it.
 *
 * `HF_HUB_CACHE` (or the older `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, else
 * `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
 *
 * @returns The cache folder (it may not exist yet).
 */
export function hubCacheDir(): string {
  return env("HF_HUB_CACHE") ?? env("HUGGINGFACE_HUB_CACHE") ?? join(hfHome(), "hub");
}

/**
 * Check a hub model id of the form `org/name`.
 *
 * @param id The id, e.g. `"TinyLlama/TinyLlama-1.1B-Chat-v1.0"`.
 * @returns The same id.
 * @throws {PromptgateError} When it is not a valid `org/name` id.
 */
export function checkHubId(id: string): string {
  const parts = id.split("/");
  const ok = parts.length === 2 && parts.every((p) => REPO_PART.test(p)) && !id.includes("--") &&
    !id.includes("..") && !id.endsWith(".git");
  if (!ok) {
    throw new PromptgateError(
      `"${id}" is neither an existing local folder nor a Hugging Face model id of the form org/name ` +
        `(letters, digits, '-', '_' and '.', e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0). Check the path or the id.`,
    );
  }
  return id;
}

function checkRevision(revision: string): string {
  const ok = revision.length > 0 && revision.length <= 255 && /^[A-Za-z0-9_.\-/]+$/.test(revision) &&
    !revision.split("/").some((part) => part === "" || part === "." || part === "..");
  if (!ok) {
    throw new PromptgateError(
      `revision "${revision}" is not a valid branch, tag or commit name; use e.g. "main", "v1.0" or a 40-character commit hash.`,
    );
  }
  return revision;
}

/** `<cache>/models--org--name`, the repository's folder in the cache. */
function repoFolder(cacheDir: string, id: string): string {
  return join(cacheDir, `models--${id.split("/").join("--")}`);
}

async function statOrNull(path: string): Promise<Deno.FileInfo | null> {
  try {
    return await Deno.stat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound || error instanceof Deno.errors.NotADirectory) return null;
    throw error;
  }
}

/** A shard name from an index must be a plain file name; the index comes from the network. */
function isPlainFileName(name: unknown): name is string {
  return typeof name === "string" && name.length > 0 && name.length <= 255 && !/[/\\\0]/.test(name) &&
    name !== "." && name !== ".." && !isAbsolute(name);
}

/** The shard files a `model.safetensors.index.json` names. */
function shardNames(indexText: string, where: string): string[] {
  let index: unknown;
  try {
    index = JSON.parse(indexText);
  } catch (error) {
    throw new InvalidFileError(`${where} is not valid JSON; delete it and download the model again.`, {
      cause: error,
    });
  }
  const map = (index as { weight_map?: unknown } | null)?.weight_map;
  if (typeof map !== "object" || map === null || Array.isArray(map)) {
    throw new InvalidFileError(
      `${where} has no "weight_map" object; delete it and download the model again.`,
    );
  }
  const names = new Set<string>();
  for (const shard of Object.values(map)) {
    if (!isPlainFileName(shard)) {
      throw new InvalidFileError(
        `${where} names shard ${
          JSON.stringify(shard)
        }, which is not a plain file name; the index is damaged or unsafe.`,
      );
    }
    names.add(shard);
  }
  return [...names];
}

/** The files missing from a snapshot folder for it to be loadable (empty when complete). */
async function missingFiles(folder: string): Promise<string[]> {
  const missing: string[] = [];
  if ((await statOrNull(join(folder, "config.json"))) === null) missing.push("config.json");
  const indexPath = join(folder, "model.safetensors.index.json");
  if ((await statOrNull(indexPath)) !== null) {
    for (const shard of shardNames(await Deno.readTextFile(indexPath), indexPath)) {
      if ((await statOrNull(join(folder, shard))) === null) missing.push(shard);
    }
  } else if ((await statOrNull(join(folder, "model.safetensors"))) === null) {
    missing.push("model.safetensors (or model.safetensors.index.json)");
  }
  return missing;
}

/** The cached snapshot commit for a revision: the revision itself if it is a commit, else `refs/<revision>`. */
async function cachedCommit(storage: string, revision: string): Promise<string | null> {
  if (COMMIT_HASH.test(revision)) return revision;
  try {
    const sha = (await Deno.readTextFile(join(storage, "refs", revision))).trim();
    return COMMIT_HASH.test(sha) ? sha : null;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound || error instanceof Deno.errors.NotADirectory) return null;
    throw error;
  }
}

/** The cached snapshot folder for a revision if it is complete, else the reason it cannot be used. */
async function fromCache(
  storage: string,
  revision: string,
): Promise<{ folder: string } | { reason: string }> {
  const sha = await cachedCommit(storage, revision);
  if (sha === null) return { reason: `no ${join(storage, "refs", revision)}` };
  const folder = join(storage, "snapshots", sha);
  if ((await statOrNull(folder)) === null) return { reason: `no snapshot folder ${folder}` };
  const missing = await missingFiles(folder);
  if (missing.length > 0) return { reason: `the snapshot ${folder} lacks ${missing.join(", ")}` };
  return { folder };
}

function notInCache(id: string, revision: string, cacheDir: string, reason: string): PromptgateError {
  return new PromptgateError(
    `${id} (revision ${revision}) is not in the Hugging Face cache at ${cacheDir} (${reason}), and offline ` +
      `mode is on (HF_HUB_OFFLINE=1 or offline: true). Download it once with network access (unset ` +
      `HF_HUB_OFFLINE; promptgate downloads it, or run \`huggingface-cli download ${id}\`), point HF_HUB_CACHE ` +
      `or HF_HOME at a cache that has it, or pass a local model folder instead.`,
  );
}

function unreachable(hubUrl: string, id: string, cause: unknown): PromptgateError {
  const reason = cause instanceof Error ? cause.message : String(cause);
  return new PromptgateError(
    `could not reach the Hugging Face hub (${hubUrl}) to get ${id}: ${reason}. Check the network ` +
      `connection, set HF_HUB_OFFLINE=1 to use the cache, or pass a local model folder.`,
    { cause },
  );
}

function isHubApiError(error: unknown): error is HubApiErrorType {
  return error instanceof Error && typeof (error as { statusCode?: unknown }).statusCode === "number" &&
    typeof (error as { url?: unknown }).url === "string";
}

function hubRefused(error: HubApiErrorType, id: string, revision: string): PromptgateError {
  const status = error.statusCode;
  if (status === 401 || status === 403) {
    return new PromptgateError(
      `the Hugging Face hub refused access to ${id} (HTTP ${status}): the model is private or gated, or ` +
        `does not exist. Check the id; for a gated model accept its terms on its hub page and set HF_TOKEN ` +
        `to a token with read access.`,
      { cause: error },
    );
  }
  if (status === 404) {
    return new PromptgateError(
      `${id} (revision ${revision}) was not found on the Hugging Face hub (HTTP 404). Check the model id ` +
        `and revision, or pass a local model folder.`,
      { cause: error },
    );
  }
  return new PromptgateError(
    `the Hugging Face hub answered HTTP ${status} for ${id}: ${error.message}. Try again later, or set ` +
      `HF_HUB_OFFLINE=1 to use the cache.`,
    { cause: error },
  );
}

/** The access token: the option, else HF_TOKEN, else the file `huggingface-cli login` writes. */
async function accessToken(option: string | undefined): Promise<string | undefined> {
  const token = option ?? env("HF_TOKEN") ?? env("HUGGING_FACE_HUB_TOKEN") ?? await (async () => {
    try {
      return (await Deno.readTextFile(env("HF_TOKEN_PATH") ?? join(hfHome(), "token"))).trim() || undefined;
    } catch {
      return undefined;
    }
  })();
  if (token !== undefined && !token.startsWith("hf_")) {
    throw new PromptgateError(
      'the Hugging Face access token (HF_TOKEN or the token option) must start with "hf_"; copy it again ' +
        "from your hub account settings.",
    );
  }
  return token;
}

function formatBytes(n: number): string {
  if (n < 1000) return `${n} B`;
  const units = ["kB", "MB", "GB", "TB"];
  let v = n;
  let u = -1;
  do {
    v /= 1000;
    u++;
  } while (v >= 1000 && u < units.length - 1);
  return `${v.toFixed(v < 10 ? 2 : 1)} ${units[u]}`;
}

/** The parts of cli-progress we use (the package ships no types). */
interface ProgressBar {
  start(total: number, start: number, payload?: Record<string, unknown>): void;
  update(value: number, payload?: Record<string, unknown>): void;
  stop(): void;
}

/**
 * The default progress display: a cli-progress bar when stderr is a terminal, otherwise one plain line
 * when each file starts and every 25% of a large file.
 */
async function defaultProgress(): Promise<(p: DownloadProgress) => void> {
  let terminal = false;
  try {
    terminal = Deno.stderr.isTerminal();
  } catch {
    terminal = false;
  }
  if (terminal) {
    const cliProgress = (await import("cli-progress")).default as {
      SingleBar: new (options: Record<string, unknown>, preset?: unknown) => ProgressBar;
      Presets: Record<string, unknown>;
    };
    let bar: ProgressBar | null = null;
    return (p) => {
      const payload = { file: p.file, done: formatBytes(p.bytes), size: formatBytes(p.totalBytes) };
      if (bar === null) {
        bar = new cliProgress.SingleBar({
          format: `${p.repo} |{bar}| {percentage}% {done}/{size} {file}`,
          hideCursor: true,
          clearOnComplete: false,
        }, cliProgress.Presets["shades_classic"]);
        bar.start(Math.max(p.totalBytes, 1), 0, payload);
      }
      bar.update(p.bytes, payload);
      if (p.fileDone && p.fileIndex === p.fileCount) {
        bar.stop();
        bar = null;
      }
    };
  }
  let lastQuarter = 0;
  return (p) => {
    if (p.fileBytes === 0 && !p.fileDone) {
      lastQuarter = 0;
      console.error(
        `downloading ${p.repo}: ${p.file} (${
          formatBytes(p.fileSize)
        }, file ${p.fileIndex} of ${p.fileCount})`,
      );
    } else if (p.fileSize >= 50_000_000 && !p.fileDone) {
      const quarter = Math.floor((4 * p.fileBytes) / p.fileSize);
      if (quarter > lastQuarter && quarter < 4) {
        lastQuarter = quarter;
        console.error(`downloading ${p.repo}: ${p.file} ${quarter * 25}%`);
      }
    }
    if (p.fileDone && p.fileIndex === p.fileCount) {
      console.error(`downloaded ${p.repo}: ${p.fileCount} files, ${formatBytes(p.totalBytes)}`);
    }
  };
}

interface RepoFile {
  path: string;
  size: number;
  etag: string;
}

/**
 * Resolve a model source to a local folder, downloading it into the HF cache if needed.
 *
 * - An existing folder is returned as is (absolute).
 * - Otherwise `source` must be a hub id `org/name`. Offline, the cached snapshot of `revision` is
 *   returned (`refs/<revision>` → `snapshots/<sha>`), or an error says how to get it. Online, the
 *   revision's commit is looked up and the configs, tokenizer files and safetensors weights are
 *   downloaded where missing; a commit-hash revision whose snapshot is complete needs no network. If the
 *   hub cannot be reached but the cache has a complete snapshot, that snapshot is used (with a warning),
 *   as `huggingface_hub` does.
 *
 * @param source A local folder or a hub id such as `TinyLlama/TinyLlama-1.1B-Chat-v1.0`.
 * @param options Revision, cache folder, token, offline mode, progress and transport settings.
 * @returns The absolute path of a folder holding config.json, tokenizer files and safetensors weights.
 * @throws {PromptgateError} When the source is neither a folder nor a valid id, the hub cannot be reached
 *   and the cache cannot answer, access is refused, or the repository has no safetensors weights.
 *
 * @example Use a cached model without network
 * ```ts ignore
 * import { resolveModelSource } from "./hub.ts";
 * const folder = await resolveModelSource("TinyLlama/TinyLlama-1.1B-Chat-v1.0", { offline: true });
 * ```
 */
export async function resolveModelSource(source: string, options: ResolveModelOptions = {}): Promise<string> {
  const local = await statOrNull(source);
  if (local?.isDirectory) return resolve(source);
  if (local !== null) {
    throw new PromptgateError(
      `${source} is a file; pass the model folder that holds config.json and the weights.`,
    );
  }
  if (/^[.~/\\]|[\\]|^[A-Za-z]:/.test(source) || source.endsWith("/")) {
    throw new PromptgateError(`local model folder ${source} does not exist; check the path.`);
  }
  const id = checkHubId(source);
  const revision = checkRevision(options.revision ?? "main");
  const cacheDir = resolve(options.cacheDir ?? hubCacheDir());
  const storage = repoFolder(cacheDir, id);
  const offline = options.offline ?? isTruthy(env("HF_HUB_OFFLINE"));
  if (offline) {
    const cached = await fromCache(storage, revision);
    if ("folder" in cached) return cached.folder;
    throw notInCache(id, revision, cacheDir, cached.reason);
  }
  if (COMMIT_HASH.test(revision)) {
    const cached = await fromCache(storage, revision);
    if ("folder" in cached) return cached.folder;
  }
  const report = options.onProgress ?? (options.quiet ? () => {} : await defaultProgress());
  return await download(id, revision, storage, options, report);
}

async function download(
  id: string,
  revision: string,
  storage: string,
  options: ResolveModelOptions,
  report: (p: DownloadProgress) => void,
): Promise<string> {
  const hub = await import("@huggingface/hub");
  const hubUrl = (options.hubUrl ?? env("HF_ENDPOINT") ?? hub.HUB_URL).replace(/\/+$/, "");
  const token = await accessToken(options.token);
  const common: { hubUrl: string; fetch?: typeof fetch; accessToken?: string } = { hubUrl };
  if (options.fetch !== undefined) common.fetch = options.fetch;
  if (token !== undefined) common.accessToken = token;
  const repo = { type: "model" as const, name: id };

  // 1. The commit the revision points at. A network failure here may fall back to the cache.
  let sha: string;
  try {
    const info = await hub.modelInfo({ name: id, revision, additionalFields: ["sha"], ...common });
    sha = String((info as { sha?: unknown }).sha ?? "");
  } catch (error) {
    if (isHubApiError(error)) throw hubRefused(error, id, revision);
    const cached = await fromCache(storage, revision);
    if ("folder" in cached) {
      if (options.quiet !== true) {
        console.error(
          `warning: could not reach the Hugging Face hub (${(error as Error).message}); using the cached ` +
            `snapshot of ${id} at ${cached.folder}.`,
        );
      }
      return cached.folder;
    }
    throw unreachable(hubUrl, id, error);
  }
  if (!COMMIT_HASH.test(sha)) {
    throw new PromptgateError(
      `the Hugging Face hub gave no valid commit for ${id}@${revision}; try again later.`,
    );
  }
  const snapshot = join(storage, "snapshots", sha);

  // 2. Which files to fetch: the small files we use, then the weights.
  const listing = new Map<string, RepoFile>();
  try {
    for await (const entry of hub.listFiles({ repo, revision: sha, ...common })) {
      if (entry.type !== "file" || entry.path.includes("/")) continue;
      const etag = entry.lfs?.oid ?? entry.xetHash ?? entry.oid ?? "";
      listing.set(entry.path, { path: entry.path, size: entry.lfs?.size ?? entry.size, etag });
    }
  } catch (error) {
    if (isHubApiError(error)) throw hubRefused(error, id, revision);
    throw unreachable(hubUrl, id, error);
  }
  if (!listing.has("config.json")) {
    throw new PromptgateError(
      `${id}@${revision} has no config.json, so it is not a transformers model repository; check the id.`,
    );
  }
  const small = MODEL_FILES.filter((name) => listing.has(name));
  const fetchFiles = async (names: string[]) => {
    const files = names.map((n) => listing.get(n)!);
    const todo: RepoFile[] = [];
    for (const file of files) {
      const pointer = join(snapshot, file.path);
      const have = await statOrNull(pointer);
      if (have === null || have.size !== file.size) todo.push(file);
    }
    const totalBytes = todo.reduce((n, f) => n + f.size, 0);
    let bytes = 0;
    for (let i = 0; i < todo.length; i++) {
      const file = todo[i]!;
      const base = {
        repo: id,
        file: file.path,
        fileSize: file.size,
        totalBytes,
        fileIndex: i + 1,
        fileCount: todo.length,
      };
      report({ ...base, fileBytes: 0, bytes, fileDone: false });
      await fetchFile(hub, repo, sha, storage, file, common, hubUrl, id, (fileBytes) => {
        report({ ...base, fileBytes, bytes: bytes + fileBytes, fileDone: false });
      });
      bytes += file.size;
      report({ ...base, fileBytes: file.size, bytes, fileDone: true });
    }
  };
  let weights: string[];
  if (listing.has("model.safetensors.index.json")) {
    await fetchFiles([...small, "model.safetensors.index.json"]);
    const indexPath = join(snapshot, "model.safetensors.index.json");
    weights = shardNames(await Deno.readTextFile(indexPath), indexPath);
    const absent = weights.filter((w) => !listing.has(w));
    if (absent.length > 0) {
      throw new PromptgateError(
        `${id}@${revision}: model.safetensors.index.json names shards the repository does not have ` +
          `(${absent.join(", ")}); the repository is incomplete. Try another revision.`,
      );
    }
  } else if (listing.has("model.safetensors")) {
    weights = ["model.safetensors"];
  } else {
    const bin = [...listing.keys()].some((n) => n.endsWith(".bin"));
    throw new PromptgateError(
      `${id}@${revision} has no model.safetensors or model.safetensors.index.json` +
        (bin
          ? "; it only has PyTorch .bin weights, which promptgate does not load. Convert them with transformers " +
            "(from_pretrained, then save_pretrained(path, safe_serialization=True)) and pass the folder."
          : "; promptgate needs safetensors weights."),
    );
  }
  await fetchFiles([...small, ...weights]);

  // 3. Record where the revision points, as huggingface_hub does.
  if (revision !== sha) {
    const ref = join(storage, "refs", revision);
    await Deno.mkdir(dirname(ref), { recursive: true });
    await writeFileAtomic(ref, sha);
  }
  return snapshot;
}

type Hub = typeof import("@huggingface/hub");

/**
 * The chunks of a download stream, counted as they pass. Stream failures are network failures (turned
 * into errors by `onError`); disk failures surface from writeFileAtomic as write errors.
 */
async function* countedChunks(
  stream: ReadableStream<Uint8Array>,
  expected: number,
  onBytes: (n: number) => void,
  onError: (error: unknown) => PromptgateError,
  onShort: () => PromptgateError,
): AsyncGenerator<Uint8Array> {
  const reader = stream.getReader();
  let received = 0;
  for (;;) {
    let next: ReadableStreamReadResult<Uint8Array>;
    try {
      next = await reader.read();
    } catch (error) {
      throw onError(error);
    }
    if (next.done) break;
    received += next.value.byteLength;
    onBytes(received);
    yield next.value;
  }
  if (received !== expected) throw onShort();
}

/** Download one file into `blobs/<etag>` (unless there already) and link it from the snapshot. */
async function fetchFile(
  hub: Hub,
  repo: { type: "model"; name: string },
  sha: string,
  storage: string,
  file: RepoFile,
  common: { hubUrl: string; fetch?: typeof fetch; accessToken?: string },
  hubUrl: string,
  id: string,
  onBytes: (n: number) => void,
): Promise<void> {
  if (!/^[A-Za-z0-9]{8,128}$/.test(file.etag)) {
    throw new PromptgateError(
      `the Hugging Face hub gave no usable id for ${id}/${file.path}; try again later.`,
    );
  }
  const blob = join(storage, "blobs", file.etag);
  const pointer = join(storage, "snapshots", sha, file.path);
  await Deno.mkdir(dirname(blob), { recursive: true });
  await Deno.mkdir(dirname(pointer), { recursive: true });
  const existing = await statOrNull(blob);
  if (existing === null || existing.size !== file.size) {
    let data: Blob | null;
    try {
      data = await hub.downloadFile({ repo, path: file.path, revision: sha, ...common });
    } catch (error) {
      if (isHubApiError(error)) throw hubRefused(error, id, sha);
      throw unreachable(hubUrl, id, error);
    }
    if (data === null) {
      throw new PromptgateError(`${id}/${file.path} vanished from the hub during the download; try again.`);
    }
    const chunks = countedChunks(
      data.stream(),
      file.size,
      onBytes,
      (error) => unreachable(hubUrl, id, error),
      () =>
        new PromptgateError(
          `${id}/${file.path}: the download was cut off before its ${file.size} bytes; try again.`,
        ),
    );
    await writeFileAtomic(blob, chunks);
  }
  await Deno.remove(pointer).catch(() => {});
  try {
    await Deno.symlink(relative(dirname(pointer), blob), pointer);
  } catch {
    // Symlinks need privileges on Windows: keep a copy instead, as huggingface_hub does.
    await Deno.copyFile(blob, pointer);
  }
}
