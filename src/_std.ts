/**
 * The standard-library pieces promptgate uses, in one place. JSR (and so `@std/path`, `@std/cli`) cannot
 * be reached from our build machines, so these come from Deno's `node:` built-ins; switching to `@std/*`
 * later means changing this file only.
 *
 * @module
 */

export { basename, dirname, extname, isAbsolute, join, relative, resolve } from "node:path";
export { parseArgs } from "node:util";
export { homedir } from "node:os";
export { deflateSync, inflateSync } from "node:zlib";
