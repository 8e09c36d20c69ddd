/**
 * Tests for src/io/hub.ts, with no real network: a fake HF cache laid out in a temp folder (offline
 * resolution through refs/<revision>, a 40-hex revision, a missing model) and a fake hub served through
 * the custom `fetch` that `@huggingface/hub` accepts (downloads only the needed files, cache reuse,
 * sharded checkpoints, network and HTTP errors, tokens, a cut-off download).
 */

import assert from "node:assert/strict";
import { join } from "../src/_std.ts";
import { PromptgateError } from "../src/errors.ts";
import { loadModelConfig } from "../src/io/hf_config.ts";
import { checkHubId, type DownloadProgress, hubCacheDir, resolveModelSource } from "../src/io/hub.ts";
import { openCheckpoint } from "../src/io/safetensors.ts";

// Keep the developer's own hub settings out of these tests.
for (const name of ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"]) {
  Deno.env.delete(name);
}
Deno.env.set("HF_TOKEN_PATH", "/nonexistent/promptgate-test-token");

const ROOT = new URL("..", import.meta.url).pathname;
const HUB = "https://hub.test";
const SHA = "0123456789abcdef0123456789abcdef01234567";
const SHA2 = "fedcba9876543210fedcba9876543210fedcba98";

function goldenModel(name: string): string {
  const local = join(ROOT, "tests/fixtures/golden", name, "model");
  try {
    Deno.statSync(local);
    return local;
  } catch {
    return join(ROOT, "../shared/golden/peft-0.21", name, "model");
  }
}

async function hex(algorithm: "SHA-1" | "SHA-256", bytes: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest(algorithm, new Uint8Array(bytes));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

interface FakeRepo {
  sha: string;
  files: Map<string, Uint8Array>;
  /** Names stored with LFS (etag = sha256) rather than git (etag = sha1). */
  lfs: Set<string>;
  /** Require this bearer token. */
  token?: string;
}

/** A fake Hugging Face hub answering the three endpoints `@huggingface/hub` uses. */
class FakeHub {
  repos = new Map<string, FakeRepo>();
  requests: string[] = [];
  /** Make every request fail like an unreachable host. */
  down = false;
  /** Serve this many bytes fewer than the file size for full downloads. */
  truncate = 0;

  addRepo(
    id: string,
    files: Record<string, Uint8Array | string>,
    options: { sha?: string; token?: string } = {},
  ): void {
    const repo: FakeRepo = { sha: options.sha ?? SHA, files: new Map(), lfs: new Set() };
    if (options.token !== undefined) repo.token = options.token;
    for (const [name, content] of Object.entries(files)) {
      const bytes = typeof content === "string" ? new TextEncoder().encode(content) : content;
      repo.files.set(name, bytes);
      if (name.endsWith(".safetensors") || name.endsWith(".bin")) repo.lfs.add(name);
    }
    this.repos.set(id, repo);
  }

  /** Request paths (no query) that fetched file content (not the 1-byte probes). */
  downloads(): string[] {
    return this.requests.filter((r) => r.startsWith("GET-FULL ")).map((r) => r.slice(9));
  }

  fetch: typeof fetch = async (input, init) => {
    const url = new URL(input instanceof Request ? input.url : String(input));
    const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined));
    if (this.down) throw new TypeError("error sending request for url (" + url + "): Connection refused");
    const json = (status: number, body: unknown) =>
      new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });
    let m = url.pathname.match(/^\/api\/models\/([^/]+\/[^/]+)\/revision\/(.+)$/);
    if (m) {
      this.requests.push(`INFO ${m[1]}@${decodeURIComponent(m[2]!)}`);
      const repo = this.repos.get(m[1]!);
      if (repo === undefined) return json(404, { error: "Repository not found" });
      if (repo.token !== undefined && headers.get("Authorization") !== `Bearer ${repo.token}`) {
        return json(401, { error: "Access to model is restricted" });
      }
      return json(200, {
        _id: "1",
        id: m[1],
        sha: repo.sha,
        private: false,
        gated: false,
        downloads: 0,
        likes: 0,
        lastModified: "2026-01-01T00:00:00.000Z",
      });
    }
    m = url.pathname.match(/^\/api\/models\/([^/]+\/[^/]+)\/tree\/([^/]+)$/);
    if (m) {
      this.requests.push(`TREE ${m[1]}@${m[2]}`);
      const repo = this.repos.get(m[1]!)!;
      const entries = [];
      for (const [path, bytes] of repo.files) {
        const entry: Record<string, unknown> = {
          type: "file",
          path,
          size: bytes.length,
          oid: await hex("SHA-1", bytes),
        };
        if (repo.lfs.has(path)) {
          entry.lfs = { oid: await hex("SHA-256", bytes), size: bytes.length, pointerSize: 134 };
        }
        entries.push(entry);
      }
      return json(200, entries);
    }
    m = url.pathname.match(/^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/);
    if (m) {
      const repo = this.repos.get(m[1]!)!;
      const bytes = repo.files.get(decodeURIComponent(m[3]!));
      if (bytes === undefined) {
        return new Response("not found", { status: 404, headers: { "X-Error-Code": "EntryNotFound" } });
      }
      const etag = repo.lfs.has(m[3]!) ? await hex("SHA-256", bytes) : await hex("SHA-1", bytes);
      if (headers.get("Range") === "bytes=0-0") {
        this.requests.push(`GET-PROBE ${m[3]}`);
        return new Response(bytes.slice(0, 1), {
          status: 206,
          headers: { "Content-Range": `bytes 0-0/${bytes.length}`, "ETag": `"${etag}"` },
        });
      }
      this.requests.push(`GET-FULL ${m[3]}`);
      return new Response(bytes.slice(0, bytes.length - this.truncate), {
        status: 200,
        headers: { "ETag": `"${etag}"` },
      });
    }
    return new Response("unexpected request " + url, { status: 500 });
  };
}

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "promptgate_hub_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** The files of the golden llama model plus files promptgate must not download. */
async function llamaRepoFiles(): Promise<Record<string, Uint8Array | string>> {
  const dir = goldenModel("llama_basic");
  return {
    "config.json": await Deno.readFile(join(dir, "config.json")),
    "generation_config.json": await Deno.readFile(join(dir, "generation_config.json")),
    "model.safetensors": await Deno.readFile(join(dir, "model.safetensors")),
    "tokenizer_config.json": "{}",
    "README.md": "# a model card",
    "pytorch_model.bin": new Uint8Array(1000),
    "consolidated.safetensors": new Uint8Array(2000),
  };
}

async function listDir(dir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(dir)) names.push(e.name);
  return names.sort();
}

Deno.test("a local folder is used as is, without touching the network", async () => {
  const hub = new FakeHub();
  const dir = goldenModel("llama_basic");
  assert.equal(await resolveModelSource(dir, { fetch: hub.fetch }), dir);
  assert.deepEqual(hub.requests, []);
  await assert.rejects(
    () => resolveModelSource(join(dir, "config.json")),
    /is a file; pass the model folder/,
  );
  await assert.rejects(
    () => resolveModelSource("./no/such/folder"),
    /local model folder \.\/no\/such\/folder does not exist/,
  );
});

Deno.test("hub ids must be org/name", () => {
  assert.equal(checkHubId("TinyLlama/TinyLlama-1.1B-Chat-v1.0"), "TinyLlama/TinyLlama-1.1B-Chat-v1.0");
  for (const bad of ["gpt2x", "a/b/c", "org/na me", "org--x/y", "org/x..y", "org/-x", "org/x.git", "/abs"]) {
    assert.throws(() => checkHubId(bad), (e: unknown) => {
      assert.ok(e instanceof PromptgateError, bad);
      assert.match(
        e.message,
        /neither an existing local folder nor a Hugging Face model id of the form org\/name/,
      );
      return true;
    });
  }
});

Deno.test("download: only configs, tokenizer files and safetensors weights, in the HF cache layout", async () => {
  await withTempDir(async (cache) => {
    const hub = new FakeHub();
    hub.addRepo("acme/tiny-llama", await llamaRepoFiles());
    const events: DownloadProgress[] = [];
    const folder = await resolveModelSource("acme/tiny-llama", {
      cacheDir: cache,
      fetch: hub.fetch,
      hubUrl: HUB,
      offline: false,
      onProgress: (p) => events.push(p),
    });
    const storage = join(cache, "models--acme--tiny-llama");
    assert.equal(folder, join(storage, "snapshots", SHA));
    assert.deepEqual(await listDir(folder), [
      "config.json",
      "generation_config.json",
      "model.safetensors",
      "tokenizer_config.json",
    ]);
    assert.deepEqual(hub.downloads().sort(), [
      "config.json",
      "generation_config.json",
      "model.safetensors",
      "tokenizer_config.json",
    ]);
    assert.equal((await Deno.readTextFile(join(storage, "refs", "main"))).trim(), SHA);
    // Snapshot entries are relative symlinks into blobs/, named by etag (sha256 for LFS files).
    const weights = await Deno.readFile(join(goldenModel("llama_basic"), "model.safetensors"));
    const target = await Deno.readLink(join(folder, "model.safetensors"));
    assert.equal(target, join("..", "..", "blobs", await hex("SHA-256", weights)));
    assert.equal(
      await Deno.readLink(join(folder, "config.json")),
      join(
        "..",
        "..",
        "blobs",
        await hex("SHA-1", await Deno.readFile(join(goldenModel("llama_basic"), "config.json"))),
      ),
    );
    // The folder is a loadable model.
    assert.equal((await loadModelConfig(folder)).numLayers, 3);
    const ckpt = await openCheckpoint(folder);
    assert.equal(ckpt.tensors.size, 30);
    ckpt.close();
    // Progress: every file reported done once; bytes add up to the total.
    const done = events.filter((e) => e.fileDone);
    assert.equal(done.length, 4);
    const last = done[done.length - 1]!;
    assert.equal(last.bytes, last.totalBytes);
    assert.equal(last.fileIndex, last.fileCount);
    assert.ok(events.some((e) => e.file === "model.safetensors" && !e.fileDone && e.fileBytes > 0));
    // A second resolve asks for the commit again but downloads nothing.
    hub.requests = [];
    assert.equal(
      await resolveModelSource("acme/tiny-llama", {
        cacheDir: cache,
        fetch: hub.fetch,
        hubUrl: HUB,
        offline: false,
        quiet: true,
      }),
      folder,
    );
    assert.deepEqual(hub.downloads(), []);
    // A commit revision with a complete snapshot needs no network at all.
    hub.requests = [];
    assert.equal(
      await resolveModelSource("acme/tiny-llama", {
        revision: SHA,
        cacheDir: cache,
        fetch: hub.fetch,
        hubUrl: HUB,
        offline: false,
        quiet: true,
      }),
      folder,
    );
    assert.deepEqual(hub.requests, []);
  });
});

Deno.test("download: a sharded checkpoint fetches exactly the shards its index names", async () => {
  await withTempDir(async (cache) => {
    const hub = new FakeHub();
    const index = {
      metadata: { total_size: 8 },
      weight_map: { "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors" },
    };
    const shard = (name: string) => {
      const header = new TextEncoder().encode(
        JSON.stringify({ [name]: { dtype: "F32", shape: [1], data_offsets: [0, 4] } }),
      );
      const out = new Uint8Array(8 + header.length + 4);
      new DataView(out.buffer).setBigUint64(0, BigInt(header.length), true);
      out.set(header, 8);
      return out;
    };
    hub.addRepo("acme/sharded", {
      "config.json": await Deno.readFile(join(goldenModel("llama_basic"), "config.json")),
      "model.safetensors.index.json": JSON.stringify(index),
      "model-00001-of-00002.safetensors": shard("a"),
      "model-00002-of-00002.safetensors": shard("b"),
      "consolidated.safetensors": new Uint8Array(64),
      "model.safetensors": new Uint8Array(64), // stale single file next to an index: not needed
    });
    const folder = await resolveModelSource("acme/sharded", {
      cacheDir: cache,
      fetch: hub.fetch,
      hubUrl: HUB,
      offline: false,
      quiet: true,
    });
    assert.deepEqual(hub.downloads().sort(), [
      "config.json",
      "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors",
      "model.safetensors.index.json",
    ]);
    const ckpt = await openCheckpoint(folder);
    assert.deepEqual([...ckpt.tensors.keys()].sort(), ["a", "b"]);
    ckpt.close();
  });
});

Deno.test("download: an index naming a shard outside the folder is refused", async () => {
  await withTempDir(async (cache) => {
    const hub = new FakeHub();
    hub.addRepo("acme/evil", {
      "config.json": "{}",
      "model.safetensors.index.json": JSON.stringify({ weight_map: { a: "../../../../evil.safetensors" } }),
    });
    await assert.rejects(
      () =>
        resolveModelSource("acme/evil", {
          cacheDir: cache,
          fetch: hub.fetch,
          hubUrl: HUB,
          offline: false,
          quiet: true,
        }),
      /names shard "\.\.\/\.\.\/\.\.\/\.\.\/evil\.safetensors", which is not a plain file name/,
    );
  });
});

Deno.test("download: a repository with only .bin weights gets an error that says how to convert", async () => {
  await withTempDir(async (cache) => {
    const hub = new FakeHub();
    hub.addRepo("acme/old", { "config.json": "{}", "pytorch_model.bin": new Uint8Array(10) });
    await assert.rejects(
      () =>
        resolveModelSource("acme/old", {
          cacheDir: cache,
          fetch: hub.fetch,
          hubUrl: HUB,
          offline: false,
          quiet: true,
        }),
      /only has PyTorch \.bin weights.*safe_serialization=True/,
    );
  });
});

Deno.test("download: a cut-off transfer fails clearly and leaves no partial blob", async () => {
  await withTempDir(async (cache) => {
    const hub = new FakeHub();
    hub.addRepo("acme/tiny-llama", await llamaRepoFiles());
    hub.truncate = 10;
    await assert.rejects(
      () =>
        resolveModelSource("acme/tiny-llama", {
          cacheDir: cache,
          fetch: hub.fetch,
          hubUrl: HUB,
          offline: false,
          quiet: true,
        }),
      /the download was cut off before its \d+ bytes; try again/,
    );
    const blobs = await listDir(join(cache, "models--acme--tiny-llama", "blobs"));
    assert.deepEqual(blobs, [], "no blob and no temporary file is left");
  });
});

Deno.test("network down: a clear error without a cache, the cached snapshot with one", async () => {
  await withTempDir(async (cache) => {
    const hub = new FakeHub();
    hub.addRepo("acme/tiny-llama", await llamaRepoFiles());
    hub.down = true;
    await assert.rejects(
      () =>
        resolveModelSource("acme/tiny-llama", {
          cacheDir: cache,
          fetch: hub.fetch,
          hubUrl: HUB,
          offline: false,
          quiet: true,
        }),
      (e: unknown) => {
        assert.ok(e instanceof PromptgateError);
        assert.match(
          e.message,
          /could not reach the Hugging Face hub \(https:\/\/hub\.test\) to get acme\/tiny-llama: .*Connection refused/,
        );
        assert.match(e.message, /set HF_HUB_OFFLINE=1 to use the cache, or pass a local model folder/);
        return true;
      },
    );
    hub.down = false;
    const folder = await resolveModelSource("acme/tiny-llama", {
      cacheDir: cache,
      fetch: hub.fetch,
      hubUrl: HUB,
      offline: false,
      quiet: true,
    });
    hub.down = true;
    assert.equal(
      await resolveModelSource("acme/tiny-llama", {
        cacheDir: cache,
        fetch: hub.fetch,
        hubUrl: HUB,
        offline: false,
        quiet: true,
      }),
      folder,
    );
  });
});

Deno.test("HTTP errors: unknown model (404) and gated model without or with a token", async () => {
  await withTempDir(async (cache) => {
    const hub = new FakeHub();
    hub.addRepo("acme/gated", await llamaRepoFiles(), { token: "hf_secret" });
    const opts = { cacheDir: cache, fetch: hub.fetch, hubUrl: HUB, offline: false, quiet: true };
    await assert.rejects(
      () => resolveModelSource("acme/nothing", opts),
      /acme\/nothing \(revision main\) was not found on the Hugging Face hub \(HTTP 404\)/,
    );
    await assert.rejects(
      () => resolveModelSource("acme/gated", opts),
      /refused access to acme\/gated \(HTTP 401\).*set HF_TOKEN/,
    );
    await assert.rejects(
      () => resolveModelSource("acme/gated", { ...opts, token: "secret" }),
      /must start with "hf_"/,
    );
    const folder = await resolveModelSource("acme/gated", { ...opts, token: "hf_secret" });
    assert.ok((await listDir(folder)).includes("model.safetensors"));
    Deno.env.set("HF_TOKEN", "hf_secret");
    try {
      assert.equal(await resolveModelSource("acme/gated", opts), folder, "HF_TOKEN is passed to the hub");
    } finally {
      Deno.env.delete("HF_TOKEN");
    }
  });
});

/** Lay out a cached snapshot by hand, as huggingface_hub would leave it. */
async function fakeCache(
  cache: string,
  id: string,
  sha: string,
  refs: Record<string, string>,
  files: Record<string, string>,
) {
  const storage = join(cache, `models--${id.replace("/", "--")}`);
  const snapshot = join(storage, "snapshots", sha);
  await Deno.mkdir(snapshot, { recursive: true });
  await Deno.mkdir(join(storage, "blobs"), { recursive: true });
  for (const [name, content] of Object.entries(files)) {
    const blob = join(storage, "blobs", await hex("SHA-1", new TextEncoder().encode(content)));
    await Deno.writeTextFile(blob, content);
    await Deno.symlink(
      join("..", "..", "blobs", await hex("SHA-1", new TextEncoder().encode(content))),
      join(snapshot, name),
    );
  }
  for (const [ref, target] of Object.entries(refs)) {
    await Deno.mkdir(join(storage, "refs", ref, ".."), { recursive: true });
    await Deno.writeTextFile(join(storage, "refs", ref), target);
  }
  return snapshot;
}

Deno.test("offline: resolves refs/<revision> and 40-hex revisions from the cache with no network", async () => {
  await withTempDir(async (cache) => {
    const hub = new FakeHub();
    const files = { "config.json": "{}", "model.safetensors": "weights" };
    const main = await fakeCache(cache, "acme/m", SHA, { main: SHA + "\n", "v1.0": SHA2 }, files);
    const old = await fakeCache(cache, "acme/m", SHA2, {}, files);
    const opts = { cacheDir: cache, fetch: hub.fetch, offline: true };
    assert.equal(await resolveModelSource("acme/m", opts), main);
    assert.equal(await resolveModelSource("acme/m", { ...opts, revision: "v1.0" }), old);
    assert.equal(await resolveModelSource("acme/m", { ...opts, revision: SHA2 }), old);
    Deno.env.set("HF_HUB_OFFLINE", "1");
    try {
      assert.equal(
        await resolveModelSource("acme/m", { cacheDir: cache, fetch: hub.fetch }),
        main,
        "HF_HUB_OFFLINE=1",
      );
    } finally {
      Deno.env.delete("HF_HUB_OFFLINE");
    }
    assert.deepEqual(hub.requests, []);
  });
});

Deno.test("offline: a model missing from the cache, or only partly there, is an error that says how to get it", async () => {
  await withTempDir(async (cache) => {
    const opts = { cacheDir: cache, offline: true };
    await assert.rejects(() => resolveModelSource("acme/absent", opts), (e: unknown) => {
      assert.ok(e instanceof PromptgateError);
      assert.match(e.message, /acme\/absent \(revision main\) is not in the Hugging Face cache at /);
      assert.match(e.message, /offline mode is on \(HF_HUB_OFFLINE=1 or offline: true\)/);
      assert.match(e.message, /huggingface-cli download acme\/absent/);
      return true;
    });
    await assert.rejects(
      () => resolveModelSource("acme/absent", { ...opts, revision: SHA }),
      /no snapshot folder/,
    );
    await fakeCache(cache, "acme/partial", SHA, { main: SHA }, {
      "config.json": "{}",
      "model.safetensors.index.json": JSON.stringify({
        weight_map: { a: "model-00001-of-00002.safetensors" },
      }),
    });
    await assert.rejects(
      () => resolveModelSource("acme/partial", opts),
      /lacks model-00001-of-00002\.safetensors/,
    );
  });
});

Deno.test("cache folder: HF_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub", () => {
  const saved = Object.fromEntries(
    ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HOME"].map((
      k,
    ) => [k, Deno.env.get(k)]),
  );
  try {
    for (const k of Object.keys(saved)) Deno.env.delete(k);
    Deno.env.set("HOME", "/home/u");
    assert.equal(hubCacheDir(), "/home/u/.cache/huggingface/hub");
    Deno.env.set("XDG_CACHE_HOME", "/xdg");
    assert.equal(hubCacheDir(), "/xdg/huggingface/hub");
    Deno.env.set("HF_HOME", "/hf");
    assert.equal(hubCacheDir(), "/hf/hub");
    Deno.env.set("HF_HUB_CACHE", "/cache");
    assert.equal(hubCacheDir(), "/cache");
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) Deno.env.delete(k);
      else Deno.env.set(k, v);
    }
  }
});

Deno.test("progress off a terminal: one plain line per file and a summary on stderr", async (t) => {
  if (Deno.stderr.isTerminal()) {
    await t.step({
      name: "skipped: stderr is a terminal (the bar is drawn instead)",
      ignore: true,
      fn: () => {},
    });
    return;
  }
  await withTempDir(async (cache) => {
    const hub = new FakeHub();
    hub.addRepo("acme/tiny-llama", await llamaRepoFiles());
    const lines: string[] = [];
    const original = console.error;
    console.error = (...args: unknown[]) => lines.push(args.join(" "));
    try {
      await resolveModelSource("acme/tiny-llama", {
        cacheDir: cache,
        fetch: hub.fetch,
        hubUrl: HUB,
        offline: false,
      });
    } finally {
      console.error = original;
    }
    assert.deepEqual(lines.filter((l) => l.startsWith("downloading")).length, 4);
    assert.match(
      lines.find((l) => l.includes("model.safetensors"))!,
      /^downloading acme\/tiny-llama: model\.safetensors \(627\.\d kB, file \d of 4\)$/,
    );
    assert.match(lines[lines.length - 1]!, /^downloaded acme\/tiny-llama: 4 files, \d+\.\d kB$/);
  });
});
