/**
 * Tests for src/io/hf_config.ts: the golden transformers-5 configs normalise to the expected shapes,
 * transformers-4 layouts (rope_theta + rope_scaling) give the same result, every validation error names
 * its field, and the RoPE inverse frequencies follow transformers' formulas (default, linear, dynamic NTK,
 * llama3) — checked against independent float64 implementations (Meta's llama3 `apply_scaling`).
 */

import assert from "node:assert/strict";
import { join } from "../src/_std.ts";
import { InvalidFileError, UnsupportedConfigError } from "../src/errors.ts";
import {
  computeRopeInvFreq,
  loadModelConfig,
  type ModelConfig,
  normalizeConfig,
  readGenerationConfig,
  SUPPORTED_MODEL_TYPES,
} from "../src/io/hf_config.ts";

const ROOT = new URL("..", import.meta.url).pathname;

function goldenModel(name: string): string {
  const local = join(ROOT, "tests/fixtures/golden", name, "model");
  try {
    Deno.statSync(local);
    return local;
  } catch {
    return join(ROOT, "../shared/golden/peft-0.21", name, "model");
  }
}

/** A minimal llama config (transformers 4 layout) with overrides. */
function llama(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    model_type: "llama",
    vocab_size: 128,
    hidden_size: 64,
    intermediate_size: 160,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    max_position_embeddings: 2048,
    ...overrides,
  };
}

/** Pick the fields that describe the architecture (no raw). */
function shape(c: ModelConfig) {
  const { raw: _raw, ...rest } = c;
  return rest;
}

Deno.test("golden llama_basic config: transformers 5 rope_parameters, MHA, untied", async () => {
  const c = await loadModelConfig(goldenModel("llama_basic"));
  assert.deepEqual(shape(c), {
    family: "llama",
    modelType: "llama",
    vocabSize: 256,
    hiddenSize: 64,
    intermediateSize: 128,
    numLayers: 3,
    numHeads: 4,
    numKvHeads: 4,
    headDim: 16,
    maxPositions: 128,
    normEps: 1e-6,
    norm: "rmsnorm",
    activation: "silu",
    tieWordEmbeddings: false,
    attentionBias: false,
    mlpBias: false,
    ropeTheta: 10000,
    rope: {
      type: "default",
      factor: 1,
      lowFreqFactor: null,
      highFreqFactor: null,
      originalMaxPositionEmbeddings: null,
    },
    slidingWindow: null,
    scaleAttnWeights: true,
    scaleAttnByInverseLayerIdx: false,
    reorderAndUpcastAttn: false,
    bosTokenId: 1,
    eosTokenId: 2,
    padTokenId: null,
  });
  assert.equal(c.raw["transformers_version"], "5.17.0");
});

Deno.test("golden llama_gqa_pad and mistral_gqa configs: grouped-query attention, tying, sliding window", async () => {
  const gqa = await loadModelConfig(goldenModel("llama_gqa_pad"));
  assert.equal(gqa.numKvHeads, 2);
  assert.equal(gqa.tieWordEmbeddings, true);
  const mistral = await loadModelConfig(goldenModel("mistral_gqa"));
  assert.equal(mistral.family, "mistral");
  assert.equal(mistral.numHeads, 8);
  assert.equal(mistral.numKvHeads, 2);
  assert.equal(mistral.headDim, 8);
  assert.equal(mistral.slidingWindow, null, "sliding_window: null disables the window");
  assert.equal(mistral.attentionBias, false);
  assert.equal(mistral.ropeTheta, 10000);
});

Deno.test("golden gpt2 configs: learned positions, LayerNorm, gelu_new, n_inner null → 4·n_embd", async () => {
  for (const name of ["gpt2_basic", "gpt2_pad"]) {
    const c = await loadModelConfig(goldenModel(name));
    assert.equal(c.family, "gpt2");
    assert.equal(c.hiddenSize, 64);
    assert.equal(c.intermediateSize, 256);
    assert.equal(c.numHeads, 4);
    assert.equal(c.numKvHeads, 4);
    assert.equal(c.headDim, 16);
    assert.equal(c.maxPositions, 128);
    assert.equal(c.numLayers, name === "gpt2_basic" ? 3 : 4);
    assert.equal(c.norm, "layernorm");
    assert.equal(c.normEps, 1e-5);
    assert.equal(c.activation, "gelu_new");
    assert.equal(c.tieWordEmbeddings, true);
    assert.equal(c.attentionBias, true);
    assert.equal(c.mlpBias, true);
    assert.equal(c.rope, null);
    assert.equal(c.ropeTheta, null);
    assert.equal(c.scaleAttnWeights, true);
    assert.equal(c.eosTokenId, 50256);
    assert.equal(c.padTokenId, null);
    assert.throws(() => computeRopeInvFreq(c), /learned position embeddings/);
  }
});

Deno.test("generation_config.json: read when present, null when absent, an error when malformed", async () => {
  const g = await readGenerationConfig(goldenModel("llama_basic"));
  assert.ok(g !== null);
  assert.equal(g.bosTokenId, 1);
  assert.equal(g.eosTokenId, 2);
  assert.equal(g.padTokenId, null);
  assert.equal(g.maxLength, null);
  const dir = await Deno.makeTempDir();
  try {
    assert.equal(await readGenerationConfig(dir), null);
    await Deno.writeTextFile(
      join(dir, "generation_config.json"),
      '{"eos_token_id": [128001, 128009], "max_length": 4096, "do_sample": true, "temperature": 0.6, "top_p": 0.9}',
    );
    const l3 = await readGenerationConfig(dir);
    assert.deepEqual(l3?.eosTokenId, [128001, 128009]);
    assert.equal(l3?.maxLength, 4096);
    assert.equal(l3?.doSample, true);
    assert.equal(l3?.temperature, 0.6);
    assert.equal(l3?.topP, 0.9);
    await Deno.writeTextFile(join(dir, "generation_config.json"), "{not json");
    await assert.rejects(
      () => readGenerationConfig(dir),
      (e: unknown) => e instanceof InvalidFileError && /not valid JSON/.test(e.message),
    );
    await assert.rejects(() => loadModelConfig(dir), /no config\.json in/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("transformers 4 layout (rope_theta + rope_scaling) and the transformers 5 layout normalise the same", () => {
  const v4 = normalizeConfig(llama({
    rope_theta: 500000,
    rope_scaling: {
      rope_type: "llama3",
      factor: 8,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    },
  }));
  const v5 = normalizeConfig(llama({
    rope_parameters: {
      rope_type: "llama3",
      rope_theta: 500000,
      factor: 8,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    },
  }));
  assert.deepEqual(shape(v4), shape(v5));
  assert.deepEqual(v4.rope, {
    type: "llama3",
    factor: 8,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  });
  assert.equal(v4.ropeTheta, 500000);
  // Legacy "type" key, and llama3's original length defaulting to max_position_embeddings.
  const linear = normalizeConfig(llama({ rope_scaling: { type: "linear", factor: 4 } }));
  assert.deepEqual(linear.rope, {
    type: "linear",
    factor: 4,
    lowFreqFactor: null,
    highFreqFactor: null,
    originalMaxPositionEmbeddings: null,
  });
  const l3 = normalizeConfig(
    llama({ rope_scaling: { rope_type: "llama3", factor: 8, low_freq_factor: 1, high_freq_factor: 4 } }),
  );
  assert.equal(l3.rope?.originalMaxPositionEmbeddings, 2048);
});

Deno.test("defaults follow transformers: head_dim, kv heads, eps, theta, mistral sliding window", () => {
  const c = normalizeConfig(llama({ num_key_value_heads: undefined }));
  assert.equal(c.numKvHeads, 4, "num_key_value_heads defaults to num_attention_heads");
  assert.equal(c.headDim, 16);
  assert.equal(c.normEps, 1e-6);
  assert.equal(c.ropeTheta, 10000);
  assert.equal(c.bosTokenId, 1);
  assert.equal(c.eosTokenId, 2);
  const nemo = normalizeConfig(
    llama({ hidden_size: 5120, num_attention_heads: 32, num_key_value_heads: 8, head_dim: 128 }),
  );
  assert.equal(nemo.headDim, 128, "an explicit head_dim need not divide hidden_size");
  const m = normalizeConfig({ ...llama(), model_type: "mistral" });
  assert.equal(m.slidingWindow, 4096, "MistralConfig's default window");
  assert.equal(
    normalizeConfig({ ...llama(), model_type: "mistral", sliding_window: 1024 }).slidingWindow,
    1024,
  );
  assert.deepEqual(normalizeConfig(llama({ eos_token_id: [128001, 128008] })).eosTokenId, [128001, 128008]);
  assert.equal(normalizeConfig(llama({ hidden_act: "swish" })).activation, "silu");
  assert.equal(normalizeConfig(llama({ attention_bias: true, mlp_bias: true })).attentionBias, true);
});

Deno.test("unsupported model_type: the error lists the supported ones", () => {
  assert.deepEqual([...SUPPORTED_MODEL_TYPES], ["llama", "mistral", "gpt2"]);
  for (const modelType of ["qwen2", "constructor", "__proto__", "toString"]) {
    assert.throws(() => normalizeConfig(llama({ model_type: modelType })), (e: unknown) => {
      assert.ok(e instanceof UnsupportedConfigError, modelType);
      assert.match(
        e.message,
        new RegExp(`model_type "${modelType}".*supported model types: llama, mistral, gpt2`),
      );
      return true;
    });
  }
  assert.throws(() => normalizeConfig(llama({ model_type: undefined })), /no "model_type" string/);
  assert.throws(() => normalizeConfig([1, 2]), /must hold a JSON object/);
});

Deno.test("validation errors name the field and what it must be", () => {
  const cases: [Record<string, unknown>, RegExp][] = [
    [llama({ hidden_size: undefined }), /has no "hidden_size"; it is required/],
    [llama({ num_attention_heads: "4" }), /field "num_attention_heads" must be a positive integer, got "4"/],
    [llama({ num_hidden_layers: 0 }), /field "num_hidden_layers" must be a positive integer, got 0/],
    [llama({ vocab_size: 1.5 }), /field "vocab_size" must be a positive integer/],
    [llama({ hidden_size: 66 }), /hidden size 66 is not divisible by the number of attention heads 4/],
    [llama({ num_key_value_heads: 3 }), /num_attention_heads 4 is not divisible by num_key_value_heads 3/],
    [llama({ rms_norm_eps: -1 }), /field "rms_norm_eps" must be a number > 0/],
    [llama({ tie_word_embeddings: "yes" }), /field "tie_word_embeddings" must be true or false/],
    [llama({ eos_token_id: [1, "x"] }), /field "eos_token_id" must be a token id or a list of token ids/],
    [llama({ rope_scaling: { rope_type: "linear" } }), /has no "factor"/],
    [
      llama({ rope_scaling: { rope_type: "llama3", factor: 8, low_freq_factor: 4, high_freq_factor: 1 } }),
      /high_freq_factor > low_freq_factor/,
    ],
    [llama({ head_dim: 15, hidden_size: 60 }), /head_dim 15 must be even/],
  ];
  for (const [raw, pattern] of cases) {
    assert.throws(() => normalizeConfig(raw), (e: unknown) => {
      assert.ok(e instanceof InvalidFileError, `${pattern}: got ${e}`);
      assert.match(e.message, pattern);
      return true;
    });
  }
});

Deno.test("unsupported options are refused with a clear error", () => {
  const cases: [Record<string, unknown>, RegExp][] = [
    [
      llama({ rope_scaling: { rope_type: "yarn", factor: 4 } }),
      /RoPE scaling "yarn".*supported: default, linear, dynamic, llama3/,
    ],
    [llama({ rope_parameters: { rope_type: "longrope", rope_theta: 10000 } }), /RoPE scaling "longrope"/],
    [llama({ rope_parameters: { full_attention: { rope_type: "default" } } }), /per-layer-type RoPE/],
    [
      llama({ rope_parameters: { rope_type: "default", rope_theta: 1e4, partial_rotary_factor: 0.5 } }),
      /partial_rotary_factor/,
    ],
    [
      llama({ hidden_act: "quick_gelu" }),
      /"quick_gelu", an activation promptgate does not implement; supported: silu/,
    ],
    [
      {
        model_type: "gpt2",
        vocab_size: 10,
        n_embd: 8,
        n_head: 2,
        n_layer: 1,
        n_positions: 16,
        scale_attn_by_inverse_layer_idx: true,
      },
      /scale_attn_by_inverse_layer_idx.*does not implement/,
    ],
    [
      {
        model_type: "gpt2",
        vocab_size: 10,
        n_embd: 8,
        n_head: 2,
        n_layer: 1,
        n_positions: 16,
        add_cross_attention: true,
      },
      /add_cross_attention/,
    ],
  ];
  for (const [raw, pattern] of cases) {
    assert.throws(() => normalizeConfig(raw), (e: unknown) => {
      assert.ok(e instanceof UnsupportedConfigError, `${pattern}: got ${e}`);
      assert.match(e.message, pattern);
      return true;
    });
  }
});

/** Default RoPE in float64: 1 / theta^(2i/d). */
function defaultInvFreq(theta: number, dim: number): number[] {
  return Array.from({ length: dim / 2 }, (_, i) => 1 / theta ** ((2 * i) / dim));
}

function assertClose(got: ArrayLike<number>, want: ArrayLike<number>, rel: number, what: string): void {
  assert.equal(got.length, want.length, what);
  for (let i = 0; i < want.length; i++) {
    const g = got[i]!;
    const w = want[i]!;
    assert.ok(Math.abs(g - w) <= rel * Math.abs(w), `${what}[${i}]: got ${g}, want ${w} (rel tol ${rel})`);
  }
}

Deno.test("RoPE default: 1/theta^(2i/d); float32 mode is within one float32 rounding of float64", () => {
  const c = normalizeConfig(
    llama({ hidden_size: 512, num_attention_heads: 4, num_key_value_heads: 4, rope_theta: 10000 }),
  );
  const exact = computeRopeInvFreq(c, { precision: "float64" });
  assertClose(exact, defaultInvFreq(10000, 128), 1e-15, "float64");
  const f32 = computeRopeInvFreq(c);
  assertClose(f32, exact, 2 ** -22, "float32");
  assert.ok(f32.every((x) => Math.fround(x) === x), "float32 mode returns float32 values");
  assert.equal(f32[0], 1);
});

Deno.test("RoPE linear: the default frequencies divided by factor", () => {
  const c = normalizeConfig(llama({ rope_scaling: { type: "linear", factor: 4 } }));
  assertClose(
    computeRopeInvFreq(c, { precision: "float64" }),
    defaultInvFreq(10000, 16).map((x) => x / 4),
    1e-15,
    "linear",
  );
});

Deno.test("RoPE dynamic NTK: unscaled up to max_position_embeddings, larger base beyond", () => {
  const c = normalizeConfig(
    llama({ max_position_embeddings: 2048, rope_scaling: { type: "dynamic", factor: 2 } }),
  );
  const dim = 16;
  assertClose(computeRopeInvFreq(c, { precision: "float64" }), defaultInvFreq(10000, dim), 1e-15, "at init");
  assertClose(
    computeRopeInvFreq(c, { precision: "float64", seqLen: 1000 }),
    defaultInvFreq(10000, dim),
    1e-15,
    "short",
  );
  const L = 8192;
  const base = 10000 * ((2 * L) / 2048 - (2 - 1)) ** (dim / (dim - 2));
  assertClose(
    computeRopeInvFreq(c, { precision: "float64", seqLen: L }),
    defaultInvFreq(base, dim),
    1e-15,
    "long",
  );
  assertClose(computeRopeInvFreq(c, { seqLen: L }), defaultInvFreq(base, dim), 2 ** -21, "long, float32");
});

Deno.test("RoPE llama3 (Llama 3.1 8B settings): equals Meta's apply_scaling reference", () => {
  const c = normalizeConfig(llama({
    hidden_size: 4096,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    max_position_embeddings: 131072,
    rope_parameters: {
      rope_type: "llama3",
      rope_theta: 500000,
      factor: 8,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    },
  }));
  // Meta's reference (llama-models, apply_scaling), written independently in float64.
  const reference = defaultInvFreq(500000, 128).map((freq) => {
    const wavelen = (2 * Math.PI) / freq;
    if (wavelen < 8192 / 4) return freq;
    if (wavelen > 8192 / 1) return freq / 8;
    const smooth = (8192 / wavelen - 1) / (4 - 1);
    return ((1 - smooth) * freq) / 8 + smooth * freq;
  });
  const exact = computeRopeInvFreq(c, { precision: "float64" });
  assertClose(exact, reference, 1e-14, "float64");
  assertClose(computeRopeInvFreq(c), reference, 2 ** -21, "float32");
  // The highest frequencies are untouched, the lowest divided by the factor, and some are blended.
  assert.equal(exact[0], reference[0]);
  assertClose([exact[63]!], [defaultInvFreq(500000, 128)[63]! / 8], 1e-15, "lowest");
  const blended = reference.filter((x, i) =>
    x !== defaultInvFreq(500000, 128)[i] && x !== defaultInvFreq(500000, 128)[i]! / 8
  );
  assert.ok(blended.length > 0, "some frequencies are in the smooth band");
});

interface RopeReference {
  transformers_version: string;
  cases: { name: string; config: Record<string, unknown>; seq_len: number | null; inv_freq: number[] }[];
}

const ropeReferencePath = join(ROOT, "tests/fixtures/io/rope_reference.json");
const ropeReference: RopeReference | null = await Deno.readTextFile(ropeReferencePath).then(
  (text) => JSON.parse(text),
  () => null,
);

Deno.test({
  name: ropeReference === null
    ? "RoPE inverse frequencies match transformers (rope_reference.json missing: run " +
      "python3 tests/fixtures/io/make_rope_reference.py where torch and transformers are installed)"
    : `RoPE inverse frequencies match transformers ${ropeReference.transformers_version} (float32 buffers)`,
  ignore: ropeReference === null,
  fn: () => {
    for (const c of ropeReference!.cases) {
      const config = normalizeConfig(c.config);
      const options = c.seq_len === null ? {} : { seqLen: c.seq_len };
      // PyTorch's float32 pow may differ from a correctly rounded one by an ulp (2^-23 relative).
      assertClose(computeRopeInvFreq(config, options), c.inv_freq, 2 ** -22, c.name);
    }
  },
});
