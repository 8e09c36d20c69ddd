/**
 * A byte-level test tokenizer for the 256-token golden models (which ship without one): byte b is id b,
 * so any text round-trips. {@link byteTokenizerJson} is the same tokenizer as a HF `tokenizer.json`
 * (byte-level BPE without merges) for code that loads a model folder's tokenizer.
 *
 * @module
 */

import type { TextTokenizer } from "../../src/train/data.ts";

/** Byte ids, BOS 1, EOS 2 (as the golden llama config says), no padding id. */
export const byteTokenizer: TextTokenizer = {
  encode: (text) => [...new TextEncoder().encode(text)],
  decode: (ids) => new TextDecoder().decode(new Uint8Array(ids.filter((i) => i !== 1 && i !== 2))),
  bosTokenId: 1,
  eosTokenId: 2,
  padTokenId: null,
  chatTemplate: null,
};

/** GPT-2's byte → printable character table. */
function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let i = 33; i <= 126; i++) bs.push(i);
  for (let i = 161; i <= 172; i++) bs.push(i);
  for (let i = 174; i <= 255; i++) bs.push(i);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  const out = new Array<string>(256);
  bs.forEach((b, i) => (out[b] = String.fromCodePoint(cs[i]!)));
  return out;
}

/** @returns A `tokenizer.json` object whose ids are the bytes. */
export function byteTokenizerJson(): Record<string, unknown> {
  const table = bytesToUnicode();
  const vocab: Record<string, number> = {};
  table.forEach((c, b) => (vocab[c] = b));
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [],
    normalizer: null,
    pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: null,
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: [],
    },
  };
}
