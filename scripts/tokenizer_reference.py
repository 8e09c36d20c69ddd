#!/usr/bin/env python3
"""Reference token ids from the Rust `tokenizers` library, for tests/tokenizer_test.ts.

promptgate tokenizes with the pure-JS port `@huggingface/tokenizers`; this script records what the
reference implementation (Python bindings of the Rust library, `tokenizers.Tokenizer.from_file`) gives
for the same `tokenizer.json` and test strings, so the test can compare id for id.

For each fixture folder it writes `<folder>/reference.json`:

    {
      "generator": "scripts/tokenizer_reference.py",
      "tokenizers_version": "0.23.2",
      "tokenizer_json_sha256": "<sha256 of the tokenizer.json the ids came from>",
      "strings_sha256": "<sha256 of the strings file>",
      "cases": [
        {"text": ..., "ids_with_special": [...], "ids_without_special": [...],
         "decoded_with_special": ..., "decoded_skip_special": ...},
        ...
      ]
    }

Usage (needs only `tokenizers` and the standard library; no network):

    python3 scripts/tokenizer_reference.py tests/fixtures/tokenizers/gpt2 tests/fixtures/tokenizers/mistral

The test strings come from tests/fixtures/tokenizers/strings.json (override with --strings).
"""

import argparse
import hashlib
import json
import pathlib
import sys

from tokenizers import Tokenizer, __version__ as tokenizers_version

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_STRINGS = REPO / "tests" / "fixtures" / "tokenizers" / "strings.json"


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_for(folder: pathlib.Path, texts: list, strings_sha: str) -> dict:
    tokenizer_path = folder / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    cases = []
    for text in texts:
        with_special = tokenizer.encode(text, add_special_tokens=True).ids
        without_special = tokenizer.encode(text, add_special_tokens=False).ids
        cases.append(
            {
                "text": text,
                "ids_with_special": with_special,
                "ids_without_special": without_special,
                "decoded_with_special": tokenizer.decode(with_special, skip_special_tokens=False),
                "decoded_skip_special": tokenizer.decode(with_special, skip_special_tokens=True),
            }
        )
    return {
        "generator": "scripts/tokenizer_reference.py",
        "tokenizers_version": tokenizers_version,
        "tokenizer_json_sha256": sha256(tokenizer_path),
        "strings_sha256": strings_sha,
        "cases": cases,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=pathlib.Path, help="fixture folders holding tokenizer.json")
    parser.add_argument("--strings", type=pathlib.Path, default=DEFAULT_STRINGS, help="JSON list of test strings")
    args = parser.parse_args()
    texts = json.loads(args.strings.read_text(encoding="utf-8"))
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        print(f"{args.strings} must hold a JSON list of strings", file=sys.stderr)
        return 2
    strings_sha = sha256(args.strings)
    for folder in args.folders:
        if not (folder / "tokenizer.json").is_file():
            print(f"{folder} has no tokenizer.json", file=sys.stderr)
            return 2
        reference = reference_for(folder, texts, strings_sha)
        out = folder / "reference.json"
        out.write_text(json.dumps(reference, ensure_ascii=True, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}: {len(reference['cases'])} cases, tokenizers {tokenizers_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
