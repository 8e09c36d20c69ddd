/**
 * Crash-safe file writes. Everything promptgate saves (checkpoints, adapters, configs, metrics, cached
 * downloads) goes through {@link writeFileAtomic}: the bytes go to a temporary file in the target's
 * folder, are flushed to disk, and the temporary file is renamed over the target. A reader therefore sees
 * either the old file or the complete new one, never a torn write, even if the process is killed or the
 * machine loses power mid-save.
 *
 * @module
 */

import { basename, dirname, join, resolve } from "../_std.ts";
import { PromptgateError } from "../errors.ts";

/** What {@link writeFileAtomic} accepts: bytes, text (written as UTF-8), or a (possibly async) sequence of chunks. */
export type AtomicWriteData =
  | Uint8Array
  | string
  | Iterable<Uint8Array>
  | AsyncIterable<Uint8Array>;

/** Options for {@link writeFileAtomic}. */
export interface AtomicWriteOptions {
  /** Permission bits of the new file (default: 0o644, less the umask). */
  mode?: number;
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let written = 0;
  while (written < bytes.length) written += await file.write(bytes.subarray(written));
}

/**
 * Write a file atomically: to a temporary file in the same folder, fsync, then rename over `path`.
 *
 * The folder must exist. On failure the temporary file is removed and the previous content of `path`
 * (if any) is left untouched. Chunks are written as they come, so a multi-gigabyte stream never has to
 * be held in memory at once.
 *
 * @param path The file to create or replace.
 * @param data The content: bytes, a string (UTF-8), or an iterable / async iterable of byte chunks.
 * @param options Optional file mode.
 * @returns Resolves once the new content is durable under `path`.
 * @throws {PromptgateError} When the folder is missing or not writable, or the disk is full.
 *
 * @example Save a JSON config
 * ```ts ignore
 * import { writeFileAtomic } from "./atomic_write.ts";
 * await writeFileAtomic("runs/adapter_config.json", JSON.stringify({ adapter_len: 10 }, null, 2));
 * ```
 */
export async function writeFileAtomic(
  path: string,
  data: AtomicWriteData,
  options: AtomicWriteOptions = {},
): Promise<void> {
  const target = resolve(path);
  const folder = dirname(target);
  const suffix = crypto.randomUUID().slice(0, 8);
  const temp = join(folder, `.${basename(target)}.${suffix}.tmp`);
  let file: Deno.FsFile | null = null;
  try {
    file = await Deno.open(temp, { write: true, createNew: true, mode: options.mode ?? 0o644 });
    if (typeof data === "string") {
      await writeAll(file, new TextEncoder().encode(data));
    } else if (data instanceof Uint8Array) {
      await writeAll(file, data);
    } else if (Symbol.asyncIterator in data) {
      for await (const chunk of data) await writeAll(file, chunk);
    } else {
      for (const chunk of data) await writeAll(file, chunk);
    }
    await file.sync();
    file.close();
    file = null;
    await Deno.rename(temp, target);
  } catch (error) {
    if (file !== null) {
      try {
        file.close();
      } catch {
        // Already closed: nothing to release.
      }
    }
    await Deno.remove(temp).catch(() => {});
    if (error instanceof PromptgateError) throw error;
    const reason = error instanceof Error ? error.message : String(error);
    throw new PromptgateError(
      `could not write ${target}: ${reason}. Check that the folder ${folder} exists and is writable ` +
        `and that the disk has free space.`,
      { cause: error },
    );
  }
  await syncFolder(folder);
}

/**
 * Flush the folder entry so the rename itself survives a power loss. Not every platform can open a
 * folder for syncing (Windows cannot); the file content is already durable, so failures are ignored.
 */
async function syncFolder(folder: string): Promise<void> {
  let dir: Deno.FsFile | null = null;
  try {
    dir = await Deno.open(folder, { read: true });
    await dir.sync();
  } catch {
    // Best effort only.
  } finally {
    dir?.close();
  }
}
