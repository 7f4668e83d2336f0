"""Tests of the equal-bytes frontier (evaluation.quant, evaluation.frontier).

Each quantizer against values worked out by hand from the restated SGLang code; the bytes; the
SparK settings against the reference; the exploratory selections; the continuation pass on a tiny
random-weight Llama (over the uncompressed cache it is the model's own perplexity, a compressed
cache changes it); the recommendation rule on made-up results; the command line."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from evaluation import frontier as F
from evaluation import methods, metrics, quant
from spark_sglang import texts
from spark_sglang.kernels import reference as R

FP8 = torch.float8_e4m3fn


def row(*values, dtype=torch.float32) -> torch.Tensor:
    """A one-token, one-head ``[1, 1, D]`` tensor."""
    return torch.tensor(values, dtype=dtype).view(1, 1, -1)


def flat(x: torch.Tensor) -> list[float]:
    return x.flatten().tolist()


# ---------------------------------------------------------------------------------------------
# Quantizers: hand-made inputs, values worked out by hand
# ---------------------------------------------------------------------------------------------


def test_fp8_e4m3_rounds_to_nearest_even_and_saturates():
    x = row(1.0625, 1.1875, 0.3, 448.0, 500.0, -1e6, 0.001)
    # 1.0625 / 1.1875: ties between neighbours 1/8 apart -> the even mantissa (1.0, 1.25);
    # 0.3 -> 0.3125 (spacing 1/32); beyond 448 -> 448 (torch's e4m3fn cast saturates);
    # 0.001 -> the subnormal 2^-9.
    assert flat(quant.fp8(x)) == [1.0, 1.25, 0.3125, 448.0, 448.0, -448.0, 2.0**-9]
    assert flat(quant.fp8(row(3.0, 2.125), scale=2.0)) == [3.0, 2.0]  # stored x / 2, read * 2


def test_fp8_e5m2_rounds_and_overflows_to_inf():
    x = row(1.125, 1.375, 57344.0, 61440.0, 1e6)
    assert flat(quant.fp8(x, dtype=torch.float8_e5m2)) == [1.0, 1.5, 57344.0, math.inf, math.inf]


def test_int8_is_symmetric_per_token_head_and_truncates():
    x = torch.cat([row(254.0, -3.0, 1.5, 0.0), row(0.0, 0.0, 0.0, 0.0)]).to(torch.bfloat16)
    # scale = 254 / 127 = 2; q = trunc(127, -1.5, 0.75, 0) = (127, -1, 0, 0); an all-zero row reads 0
    assert flat(quant.int8_per_token_head(x)) == [254.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_int8_rounds_scale_quotient_and_product_in_bf16():
    x = row(1.0, 0.5, dtype=torch.bfloat16)
    # scale = bf16(1/127) = 1.0078125 * 2^-7; 1/scale = 127.007 -> 127 -> 127 * scale = 0.99994
    # -> bf16 1.0; 0.5/scale = 63.504 -> bf16 63.5 -> 63 -> 0.4960327 -> bf16 0.49609375
    assert flat(quant.int8_per_token_head(x)) == [1.0, 0.49609375]


def test_int4_groups_truncate_and_round_in_bf16():
    x = row(7.0, -3.5, 0.875, -0.4375, dtype=torch.bfloat16)
    # groups of 2: scales 1 and 0.125; -3.5 -> -3, -0.4375 / 0.125 = -3.5 -> -3
    assert flat(quant.int4_per_token_group(x, group_size=2)) == [7.0, -3.0, 0.875, -0.375]
    x = row(1.0, 0.5, 0.0, 0.0, dtype=torch.bfloat16)
    # scale = bf16(1/7) = 0.142578125; 1.0 -> q 7 -> 0.998046875 -> bf16 (tie, even) 1.0;
    # 0.5 -> 3.5068 -> bf16 3.5 -> q 3 -> 0.427734375 (exact in bf16)
    assert flat(quant.int4_per_token_group(x, group_size=4)) == [1.0, 0.427734375, 0.0, 0.0]
    with pytest.raises(ValueError, match="do not divide"):
        quant.int4_per_token_group(x, group_size=3)


def _fp4_row() -> torch.Tensor:
    """Two FP4 blocks: amax 3 (scale 0.5 in both recipes), amax 4.5 (scales differ)."""
    first = [3.0, 0.125, 0.375, -0.625, 1.1, 0.5, 2.5, -0.01] + [0.0] * 8
    second = [4.5, 1.0] + [0.0] * 14
    return row(*first, *second)


def test_fp4_mx_block16_power_of_two_scale_and_ties_up():
    out = flat(quant.fp4_mx_block16(_fp4_row()))
    # block 1: e = ceil(log2(3 / 6)) = -1; x * 2 = 6, .25, .75, -1.25, 2.2, 1, 5, -.02 -> E2M1 with
    # ties up: 6, .5, 1, -1.5, 2, 1, 6, -0 -> times 0.5
    assert out[:8] == [3.0, 0.25, 0.5, -0.75, 1.0, 0.5, 3.0, 0.0]
    # block 2: e = ceil(log2(0.75)) = 0: 4.5 -> 4, 1 -> 1
    assert out[16:18] == [4.0, 1.0] and out[8:16] == [0.0] * 8 and out[18:] == [0.0] * 14


def test_nvfp4_fp8_block_scale_and_ties_to_even():
    out = flat(quant.nvfp4(_fp4_row()))
    # block 1: scale e4m3(3 / 6) = 0.5; 0.25 -> 0 (tie, even), 0.75 -> 1, 1.25 -> 1, 5 -> 4
    assert out[:8] == [3.0, 0.0, 0.5, -0.5, 1.0, 0.5, 2.0, 0.0]
    # block 2: scale e4m3(4.5 / 6) = 0.75: 4.5 -> 6 * 0.75; 1 / 0.75 = 1.33 -> 1.5 -> 1.125
    assert out[16:18] == [4.5, 1.125] and out[18:] == [0.0] * 14
    assert flat(quant.nvfp4(torch.zeros(1, 1, 16))) == [0.0] * 16


def test_bytes_per_token_head_for_one_of_k_or_v():
    assert [f.bytes_per_head(64) for f in quant.FORMATS] == [128, 64, 64, 66, 36, 36, 36]
    assert [f.bytes_per_head(128) for f in quant.FORMATS] == [256, 128, 128, 130, 72, 72, 72]
    assert [f.name for f in quant.FORMATS if not f.in_sglang] == ["int8", "int4"]


# ---------------------------------------------------------------------------------------------
# Methods: bytes, SparK against the reference, exploratory selections
# ---------------------------------------------------------------------------------------------

SMOLLM2 = F.Geometry(num_layers=30, num_kv_heads=3, head_dim=64, num_tokens=769)


def test_method_bytes_hand_computed():
    by_name = {m.name: m.bytes for m in F.build_methods(SMOLLM2)}
    row_id = 4 / 90  # the per-token int32 window row id, shared by 30 layers x 3 heads
    keys_stats = 64 * 2 / 128  # one bf16 window norm of 64 channels per 128 tokens
    assert by_name["bf16"] == 256 and by_name["fp8_e4m3"] == 128 and by_name["int4"] == 72
    # K 0.5 bf16 record: kept 32 x 2 = 64, mask 8 -> 72, sign word -> 76, fill -> 78, pad -> 80
    assert by_name["spark-k0.5-bf16"] == pytest.approx(80 + 128 + keys_stats + row_id)
    # FP8 K 0.8: kept 13 -> 16, mask -> 24, 2 sign words -> 32, fill -> 34, pad -> 48
    assert by_name["spark-k0.8-fp8"] == pytest.approx(48 + 64 + keys_stats + row_id)
    # K+V 0.5 FP8: value record 32 + mask 8 + fill 2 -> 48; two statistics per window row
    assert by_name["spark-kv0.5-fp8"] == pytest.approx(48 + 48 + 2 * keys_stats + row_id)
    # packed variants: kept + (bitmap + fill) / block + signs; pairs: 32-bit bitmap
    assert by_name["explore-block16-k0.5-fp8"] == pytest.approx(32 + 4 + 10 / 16 + 64 + 1 + row_id)
    assert by_name["explore-pairs-k0.5-fp8"] == pytest.approx(32 + 4 + 4 + 2 + 64 + 1 + row_id)
    # kept keys int4 (16 + bf16 scale) + bitmap + signs + fill; values int4 groups of 32
    assert by_name["explore-k0.5-int4-vint4"] == pytest.approx(18 + 8 + 4 + 2 + 36 + 1 + row_id)
    for name, target in (("snapkv@spark-k0.5-bf16", "spark-k0.5-bf16"),
                         ("snapkv@spark-kv0.5-fp8", "spark-kv0.5-fp8")):
        per_token = 256 if name.endswith("bf16") else 128
        assert abs(by_name[name] - by_name[target]) <= per_token / 769 / 2  # whole tokens


@pytest.fixture(scope="module")
def cache() -> F.CacheInput:
    g = torch.Generator().manual_seed(0)
    sample = F.Sample(
        source="random", continuation=[], start=40,
        keys=torch.randn(40, 4, 32, generator=g) * torch.linspace(0.1, 3.0, 32),
        values=torch.randn(40, 4, 32, generator=g), window=torch.randn(8, 8, 32, generator=g),
        queries=torch.randn(3, 8, 32, generator=g), num_layers=2, num_kv_heads=2)
    return F.CacheInput.of(sample)


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("ratio", [0.3, 0.8])
def test_spark_settings_equal_the_reference(cache, dtype, ratio):
    keys, values = F.spark_compress(ratio, ratio, dtype, cache)
    expected = R.simulate_keys_with_norm(cache.keys, cache.key_norm, ratio, "mean", dtype=dtype)
    assert keys.dtype == expected.dtype and torch.equal(keys, expected)
    packed = R.pack_values(cache.values, cache.value_bias, ratio, dtype=dtype)
    assert torch.equal(values, R.unpack_values(packed))
    dense = F.spark_compress(ratio, 0.0, dtype, cache)[1]
    assert torch.equal(dense.float(), R.from_storage(R.to_storage(cache.values, dtype)))


def test_fill_precision_changes_only_the_fill(cache):
    bf16_fill = F.fill_compress(0.8, torch.bfloat16, cache)[0]
    assert torch.equal(bf16_fill, F.spark_compress(0.8, 0.0, torch.bfloat16, cache)[0])
    fp32_fill = F.fill_compress(0.8, torch.float32, cache)[0]
    keep = cache.selection(0.8)[1]
    assert torch.equal(fp32_fill[keep], bf16_fill[keep])
    assert not torch.equal(fp32_fill, bf16_fill)  # some served keys round differently ...
    torch.testing.assert_close(fp32_fill.float(), bf16_fill.float(), rtol=2e-2, atol=0)  # ... barely


def test_block_selection_of_one_token_is_per_token_spark(cache):
    keys, values = F.block_mask_compress(0.5, 1, cache)
    assert torch.equal(keys, F.spark_compress(0.5, 0.0, FP8, cache)[0])
    assert torch.equal(values, quant.fp8(cache.values))


def test_block_selection_is_shared_and_ranks_summed_saliency():
    saliency = torch.rand(10, 2, 8, generator=torch.Generator().manual_seed(1))
    saliency[:4, 0, 5] = 10.0  # channel 5 dominates block 0 of head 0 ...
    saliency[:4, 0, 2] = 0.0  # ... channel 2 is its least salient
    keep, fill = F.block_selection(saliency, 0.5, 4)
    assert keep.shape == (10, 2, 8) and fill.shape == (10, 2) and fill.dtype == torch.bfloat16
    for start in (0, 4, 8):  # blocks of 4, the last one shorter
        assert (keep[start:start + 4] == keep[start]).all() and (fill[start:start + 4] == fill[start]).all()
    assert keep[0, 0, 5] and not keep[0, 0, 2] and int(keep[0, 0].sum()) == 4
    pruned = saliency[:4, 0][:, ~keep[0, 0]]
    assert float(fill[0, 0]) == pytest.approx(math.sqrt(float(pruned.mean())), rel=4e-3)


def test_pair_selection_prunes_rope_pairs_together():
    saliency = torch.tensor([[5.0, 1.0, 0.1, 3.0, 2.0, 0.2, 0.3, 4.0]])  # pairs (c, c + 4)
    keep = F.pair_selection(saliency, 0.5)
    # pair sums 7, 1.2, 0.4, 7 -> the two lowest pairs (1, 5) and (2, 6) are pruned
    assert keep.tolist() == [[True, False, False, True, True, False, False, True]]


def test_quantized_kept_keys_keep_the_reference_recovery(cache):
    keys, values = F.quantized_kept_compress(0.5, 8, quant.FP8_E4M3, cache)
    keep = cache.selection(0.5)[1]
    spark = R.simulate_keys_with_norm(cache.keys, cache.key_norm, 0.5, "mean", dtype=torch.float32)
    assert torch.equal(keys[~keep], spark[~keep])
    kept = cache.keys[keep].view(40, 4, 16)
    assert torch.equal(keys[keep].view(40, 4, 16), quant.int8_per_token_head(kept))
    assert torch.equal(values, quant.fp8(cache.values))
    assert F.kept_group(32) == 32 and F.kept_group(16) == 16


def test_snapkv_keeps_its_budget_per_head(cache):
    keys, values = F.snapkv_compress(10, quant.BF16, cache)
    assert keys.shape == values.shape == (10, 4, 32)
    scores = methods.snapkv_scores(cache.keys, cache.window, 1.0, True, True)
    index = methods.keep_indices(scores, 10)
    assert torch.equal(keys, methods.gather_tokens(cache.keys, index).float())


# ---------------------------------------------------------------------------------------------
# The continuation pass on a tiny random-weight Llama
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


TINY_IDS = torch.randint(3, 300, (49,), generator=torch.Generator().manual_seed(2)).tolist()


@pytest.fixture(scope="module")
def tiny_sample(tiny_llama) -> F.Sample:
    """40 context tokens after <bos>, then 9 continuation tokens (8 scored predictions)."""
    return F.capture_sample(tiny_llama, [1], TINY_IDS, context_len=40, window=8, source="random")


def test_sample_shapes(tiny_sample):
    s = tiny_sample
    assert s.start == 41 and s.continuation == TINY_IDS[40:]
    assert s.keys.shape == s.values.shape == (41, 4, 32)  # 2 layers x 2 KV heads
    assert s.window.shape == (8, 8, 32) and s.queries.shape == (8, 8, 32)


def test_uncompressed_continuation_is_the_models_own_prediction(tiny_llama, tiny_sample):
    s = tiny_sample
    with torch.no_grad():
        logits = tiny_llama(torch.tensor([[1] + TINY_IDS]), use_cache=False).logits[0].float()
    own = torch.log_softmax(logits[41:49], dim=-1)  # after Y[0..7], predicting Y[1..8]
    logprobs = F.continuation_logprobs(tiny_llama, s, s.keys, s.values)
    torch.testing.assert_close(logprobs, own, rtol=1e-5, atol=1e-5)
    targets = torch.tensor(TINY_IDS[41:])
    assert F.mean_nll(s, logprobs) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits[41:49], targets)), rel=1e-5)
    assert F.mean_kl(own, logprobs) == pytest.approx(0.0, abs=1e-6)


def test_fp8_ablation_quantizes_only_the_chosen_part(tiny_llama, tiny_sample):
    from evaluation import fp8_ablation as A

    heads = A.layer_mask(2, 2, lambda layer, layers: layer != 0)  # layer-major: layer 0 is heads 0, 1
    assert heads.tolist() == [False, False, True, True]
    cache = F.CacheInput.of(tiny_sample)
    part = A.partly_fp8(cache.keys, heads)
    assert torch.equal(part[:, :2], cache.keys[:, :2]) and not torch.equal(part[:, 2:], cache.keys[:, 2:])
    assert torch.equal(part[:, 2:], quant.FP8_E4M3.quantize(cache.keys)[:, 2:])
    results, magnitudes = A.run(tiny_llama, [tiny_sample])
    keys, values = F.quant_method(quant.FP8_E4M3, F.Geometry.of(tiny_sample)).compress(cache)
    reference = F.continuation_logprobs(tiny_llama, tiny_sample, tiny_sample.keys, tiny_sample.values)
    expected = F.mean_kl(reference, F.continuation_logprobs(tiny_llama, tiny_sample, keys, values))
    assert results["FP8 keys and values, every layer"][0] == [pytest.approx(expected)]  # the frontier's FP8
    assert magnitudes == pytest.approx([float(tiny_sample.keys[:, :2].abs().max()),
                                        float(tiny_sample.keys[:, 2:].abs().max())])
    assert len(A.table(results, magnitudes)) == 2 + len(A.VARIANTS) + 2


@pytest.mark.parametrize("compress", [
    lambda c: F.spark_compress(0.8, 0.0, torch.bfloat16, c),
    lambda c: F._quantize_both(quant.INT4, c),
], ids=["spark-k0.8", "int4"])
def test_a_compressed_context_changes_the_perplexity(tiny_llama, tiny_sample, compress):
    s = tiny_sample
    reference = F.continuation_logprobs(tiny_llama, s, s.keys, s.values)
    keys, values = compress(F.CacheInput.of(s))
    changed = F.continuation_logprobs(tiny_llama, s, keys, values)
    assert abs(F.mean_nll(s, changed) - F.mean_nll(s, reference)) > 1e-4
    assert F.mean_kl(reference, changed) > 1e-7  # near-uniform predictions: small, but not 0


def test_token_order_per_head_does_not_matter(tiny_llama, tiny_sample):
    """Evicted caches hold each head's own tokens in any order: attention must not care."""
    s = tiny_sample
    g = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(41, generator=g) for _ in range(4)], dim=1)  # [N, H]
    keys, values = methods.gather_tokens(s.keys, order), methods.gather_tokens(s.values, order)
    torch.testing.assert_close(F.continuation_logprobs(tiny_llama, s, keys, values),
                               F.continuation_logprobs(tiny_llama, s, s.keys, s.values),
                               rtol=1e-5, atol=1e-5)


def test_attention_output_is_the_metrics_attention(tiny_sample):
    s = tiny_sample
    expected, _ = metrics.attend(s.queries, s.keys[:30], s.values[:30], 1.0)
    torch.testing.assert_close(F.attention_output(s.queries, s.keys[:30], s.values[:30]), expected,
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Reading the results: frontier, recommendation, reports
# ---------------------------------------------------------------------------------------------


def _results(changes: dict[str, tuple[str, float, list[float]]]) -> F.Results:
    """Made-up results: method name -> (family, bytes, per-sample perplexity change in %); the KL
    is the change / 100 nats, the attention error 0.1."""
    chosen = [F.Method(name, name, family, nbytes, compress=None)
              for name, (family, nbytes, _) in changes.items()]
    scores = {}
    for name, (_, _, change) in changes.items():
        change = torch.tensor(change, dtype=torch.float64)
        scores[name] = {"nll": torch.log1p(change / 100), "kl": change / 100,
                        "attn_err": torch.full_like(change, 0.1)}
    return F.Results(SMOLLM2, chosen, ["a", "b", "c", "d"], torch.zeros(4, dtype=torch.float64),
                     scores)


FORMATS = {"bf16": (F.QUANT, 256.0, [0.0] * 4), "fp8": (F.QUANT, 128.0, [1.0] * 4),
           "fp8b": (F.QUANT, 128.0, [2.0] * 4), "fp4": (F.QUANT, 72.0, [5.0] * 4),
           "int4": (F.OUTSIDE_SGLANG, 72.0, [20.0] * 4)}


def test_frontier_is_the_pareto_front_of_the_formats():
    results = _results(FORMATS)
    assert [m.name for m in F.pareto(results, (F.QUANT, F.OUTSIDE_SGLANG))] == ["fp4", "fp8", "bf16"]
    assert F.frontier_at(results, 100.0) == pytest.approx(0.03)  # halfway from fp4 to fp8
    assert F.frontier_at(results, 60.0) is None
    torch.testing.assert_close(results.ppl_change("fp8"), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("spark_changes, picked", [
    ([0.5, 0.6, 0.4, 0.5], "spark"),  # better than FP8 by far more than two standard errors
    ([0.0, 2.0, 0.0, 1.0], "fp8"),  # better on average, within noise: the plain format wins
])
def test_recommendation_prefers_the_format_unless_spark_is_significantly_better(spark_changes, picked):
    results = _results({**FORMATS, "spark": (F.SPARK_FP8, 113.0, spark_changes)})
    pick, fmt, spark = F.recommend(results, 128.0)
    assert (pick.name, fmt.name, spark.name) == (picked, "fp8", "spark")
    pick, fmt, spark = F.recommend(results, 85.0)  # only FP4 fits
    assert (pick.name, fmt.name, spark) == ("fp4", "fp4", None)
    assert F.recommend(results, 50.0) == (None, None, None)
    table = F.recommendation_table(results)
    assert len(table) == 2 + len(F.TARGETS) and "nothing deployable fits" not in "".join(table)


def _tiny_llama_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([d.text for d in texts.load_documents()[:2]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    path = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_cli_writes_deterministic_reports_and_keeps_the_reading(tmp_path):
    out = tmp_path / "docs"
    args = ["--model", str(_tiny_llama_dir(tmp_path)), "--quick", "--contexts", "1",
            "--context-len", "40", "--continuation-len", "8", "--window", "8", "--out-dir", str(out)]
    assert F.main(args) == 0
    md, csv_path = out / "frontier-quick.md", out / "frontier-quick.csv"
    assert (out / "frontier-quick.png").stat().st_size > 10_000
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 * 2  # quick methods x (one sample + "all")
    bf16 = next(r for r in rows if r["method"] == "bf16" and r["sample"] == "all")
    assert float(bf16["tokens_vs_bf16"]) == 1.0 and abs(float(bf16["ppl_change_pct"])) < 0.5
    text = md.read_text()
    assert F.BEGIN in text and F.END in text and "| 2x tokens | 64.0 |" in text
    assert text.count("(sha256 ") == 1  # one context: only the document it came from is listed
    placeholder = "(Hand-written interpretation goes here; regenerating keeps it.)"
    md.write_text(text.replace(placeholder, "MY READING"))
    first_csv = csv_path.read_text()
    assert F.main(args) == 0
    assert csv_path.read_text() == first_csv
    assert md.read_text() == text.replace(placeholder, "MY READING")


def test_each_named_model_has_its_own_block_in_one_page():
    qwen = F.begin_marker("qwen2.5-coder-1.5b")
    assert F.begin_marker(None) == F.begin_marker("smollm2-135m") == F.begin_marker("/some/dir") == F.BEGIN
    assert qwen != F.BEGIN and "--model qwen2.5-coder-1.5b" in qwen
    engine_page = F.begin_marker("qwen2.5-coder-1.5b", "python -m evaluation.engine_perplexity")
    assert "`python -m evaluation.engine_perplexity --model qwen2.5-coder-1.5b`" in engine_page
    page = F.splice_block("", f"{F.BEGIN}\nsmol v1\n{F.END}", F.BEGIN, "SmolLM2")
    page = page.replace("(Hand-written interpretation goes here; regenerating keeps it.)", "MY READING")
    page = F.splice_block(page, f"{qwen}\nqwen v1\n{F.END}", qwen, "Qwen")
    assert page.index("smol v1") < page.index("## Qwen") < page.index("qwen v1") < page.index("## Reading")
    again = F.splice_block(page, f"{F.BEGIN}\nsmol v2\n{F.END}", F.BEGIN, "SmolLM2")
    again = F.splice_block(again, f"{qwen}\nqwen v2\n{F.END}", qwen, "Qwen")
    assert again == page.replace("smol v1", "smol v2").replace("qwen v1", "qwen v2")
    assert again.count("## Qwen") == 1 and "MY READING" in again
