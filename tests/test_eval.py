"""Tests of the fidelity harness (evaluation): metrics on hand-made cases with known
answers, the equal-bytes arithmetic, the methods against the reference, activation capture
(MiniLM and a tiny random-weight Llama with GQA and RoPE) and the command line."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from evaluation import activations, budget, harness, methods, metrics, report
from spark_sglang import texts
from evaluation.__main__ import main
from spark_sglang.kernels import reference as R
from spark_sglang.kernels.layout import ROW_ID_BYTES, SparKConfig, bytes_per_token

# ---------------------------------------------------------------------------------------------
# Metrics: hand-made cases
# ---------------------------------------------------------------------------------------------


def test_relative_error_known_values():
    full = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])  # [M=2, Hq=1, D=2]
    comp = torch.tensor([[[3.0, 9.0]], [[1.0, 0.0]]])
    err = metrics.relative_error(comp, full)
    assert err.shape == (1, 2)
    assert err[0, 0].item() == pytest.approx(1.0)  # ||(0, 5)|| / ||(3, 4)||
    assert err[0, 1].item() == 0.0


def test_kl_known_values_and_zero_on_identity():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.75, 0.0])
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.kl_divergence(p, q).item() == pytest.approx(expected, rel=1e-6)
    assert metrics.kl_divergence(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert metrics.reverse_kl_divergence(p, q).item() == pytest.approx(
        0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5), rel=1e-6)


def test_kl_of_eviction_counts_the_missing_mass():
    """Eviction keeps exact keys, so q is p renormalised over the kept tokens."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.5, 0.3, 0.0]) / 0.8
    eps = 1e-6
    expected = 0.5 * math.log(0.8) + 0.3 * math.log(0.8) + 0.2 * math.log(0.2 / eps)
    assert metrics.kl_divergence(p, q, eps).item() == pytest.approx(expected, rel=1e-5)
    # a smaller floor only makes eviction's (strictly infinite) KL larger
    assert metrics.kl_divergence(p, q, 1e-9) > metrics.kl_divergence(p, q, eps)
    assert metrics.reverse_kl_divergence(p, q).item() == pytest.approx(-math.log(0.8), rel=1e-5)
    assert metrics.evicted_mass(p, q).item() == pytest.approx(0.2)


def test_topk_overlap_known_values():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert metrics.topk_overlap(p, torch.tensor([0.1, 0.2, 0.3, 0.4]), 2).item() == 0.0
    assert metrics.topk_overlap(p, torch.tensor([0.1, 0.2, 0.3, 0.4]), 4).item() == 1.0
    assert metrics.topk_overlap(p, torch.tensor([0.4, 0.1, 0.3, 0.2]), 2).item() == 0.5
    assert metrics.topk_overlap(p, p, 3).item() == 1.0
    with pytest.raises(ValueError):
        metrics.topk_overlap(p, p, 5)


def test_attend_matches_reference_attention_with_gqa_and_cap():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 4, 32, generator=g), torch.randn(9, 2, 32, generator=g),
               torch.randn(9, 2, 32, generator=g))
    for cap in (0.0, 3.0):
        out, probs = metrics.attend(q, k, v, 0.2, cap)
        ref, lse = R.attention(q, k, v, 0.2, logit_cap=cap)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(4, 5))
        logits = metrics.attention_logits(q, k, 0.2, logit_cap=cap)
        torch.testing.assert_close(torch.logsumexp(logits, -1).T, lse, rtol=1e-5, atol=1e-5)
    causal = metrics.attention_probs(q, k, 0.2, causal_offset=4)
    assert causal[:, 0, 5:].abs().max() == 0 and causal[:, 4, :].min() > 0


def test_full_attention_compare_matches_standalone_metrics():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(6, 4, 32, generator=g), torch.randn(20, 2, 32, generator=g),
               torch.randn(20, 2, 32, generator=g))
    full = metrics.FullAttention(q, k, v, 0.3, topk=5, kl_eps=1e-6)
    kc = R.simulate_keys(k, q, 0.5)
    out, probs = metrics.attend(q, kc, v, 0.3)
    probs[..., :3] = 0  # an "evicted" region too
    got = full.compare(out, probs)
    torch.testing.assert_close(got["rel_err"], metrics.relative_error(out, full.out))
    torch.testing.assert_close(got["kl"], metrics.kl_divergence(full.probs, probs, 1e-6),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["kl_rev"], metrics.reverse_kl_divergence(full.probs, probs),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["topk"], metrics.topk_overlap(full.probs, probs, 5))
    torch.testing.assert_close(got["evicted_mass"], metrics.evicted_mass(full.probs, probs))
    assert full.compare(out, probs, evicted=False)["evicted_mass"].abs().max() == 0
    same = full.compare(full.out, full.probs)
    assert same["rel_err"].max() == 0 and same["topk"].min() == 1
    assert same["kl"].abs().max() < 1e-5 and same["kl_rev"].abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Equal-bytes arithmetic
# ---------------------------------------------------------------------------------------------

MINILM_SHAPE = budget.CacheShape(num_layers=6, num_kv_heads=12, head_dim=32, kv_dtype=torch.bfloat16)


def test_dense_bytes():
    assert MINILM_SHAPE.dense() == 6 * 12 * 2 * 32 * 2 == 9216
    assert budget.CacheShape(32, 8, 128, torch.float16).dense() == 32 * 8 * 512


def test_spark_bytes_are_the_layouts_per_head_bytes_plus_side_data():
    n = 385
    for key_ratio, value_ratio, recovery in ((0.5, 0.0, "mean"), (0.8, 0.0, "zero"), (0.5, 0.5, "mean")):
        cfg = SparKConfig(key_ratio=key_ratio, value_ratio=value_ratio, recovery=recovery)
        layout = cfg.layout(32, torch.bfloat16)
        window_row = bytes_per_token(cfg, 32, 12, 6, torch.bfloat16)["window_row_bytes"]
        expected = 72 * (layout.key_bytes_per_head() + layout.value_bytes_per_head()) \
            + ROW_ID_BYTES + window_row / n
        got = budget.spark_bytes(MINILM_SHAPE, key_ratio, value_ratio, recovery, n)
        assert got == pytest.approx(expected)
    # side data is really counted: at D 128 "mean" records (64 kept x 2 B, 16 B bitmap, 8 B signs,
    # 2 B fill -> 160 padded to 16 B) cost more than "zero" ones (144) and than the kept entries
    mean = SparKConfig(key_ratio=0.5).layout(128, torch.bfloat16).key_bytes_per_head()
    zero = SparKConfig(key_ratio=0.5, recovery="zero").layout(128, torch.bfloat16).key_bytes_per_head()
    assert mean == 160 and zero == 144


def test_think_bytes_hand_computed():
    n = 385
    kept = 32 - int(0.5 * 32)
    expected = 72 * (kept * 2 + 32 * 2) + ROW_ID_BYTES + 72 * 32 / 8 / n
    assert budget.think_bytes(MINILM_SHAPE, 0.5, n) == pytest.approx(expected)
    assert budget.think_bytes(MINILM_SHAPE, 0.0) == 9216 + ROW_ID_BYTES


def test_eviction_equal_bytes_round_trip_and_index_bytes():
    target = budget.spark_bytes(MINILM_SHAPE, 0.5, 0.0, "mean", 385)
    f = budget.eviction_fraction(MINILM_SHAPE, target)
    assert f == pytest.approx(target / 9216)
    assert budget.eviction_bytes(MINILM_SHAPE, f) == pytest.approx(target)
    f4 = budget.eviction_fraction(MINILM_SHAPE, target, index_bytes=4)
    assert f4 == pytest.approx(target / (9216 + 72 * 4))
    assert budget.eviction_bytes(MINILM_SHAPE, f4, index_bytes=4) == pytest.approx(target)
    assert budget.eviction_fraction(MINILM_SHAPE, 2 * 9216) == 1.0
    assert budget.eviction_keep_count(385, 0.5) == 192  # round half to even: 192.5 -> 192
    assert budget.eviction_keep_count(385, 0.0) == 1
    assert budget.eviction_keep_count(385, 1.0) == 385


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


def _random_cache(n=40, hkv=3, group=2, d=32, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g),
            torch.randn(w, hkv * group, d, generator=g))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9])
def test_compress_all_equals_the_reference_per_method(ratio):
    k, v, wq = _random_cache()
    shared = methods.compress_all(k, v, wq, ratio)
    for method in methods.CHANNEL_METHODS:
        kc, vc = method.compress(k, v, wq, ratio)
        torch.testing.assert_close(shared[method.name][0], kc, rtol=0, atol=0)
        torch.testing.assert_close(shared[method.name][1], vc, rtol=0, atol=0)
    torch.testing.assert_close(shared["spark-mean-k"][0], R.simulate_keys(k, wq, ratio, "mean"))
    torch.testing.assert_close(shared["think-k"][0], R.think_keys(k, wq, ratio))
    torch.testing.assert_close(shared["spark-mean-kv"][1], R.simulate_values(v, ratio))
    if ratio == 0.0:
        for kc, _ in shared.values():
            torch.testing.assert_close(kc, k, rtol=0, atol=0)


def _peaked_keys(n=20, hkv=2, d=32, hot=(2, 5)):
    """Window queries all along e0; tokens in ``hot`` have a large e0 component."""
    k = torch.zeros(n, hkv, d)
    k[:, :, 1] = 1.0
    for t in hot:
        k[t, :, 0] = 10.0
    wq = torch.zeros(4, hkv, d)
    wq[:, :, 0] = 1.0
    return k, wq


def test_snapkv_keeps_the_tokens_the_window_attends():
    k, wq = _peaked_keys()
    votes = methods.snapkv_scores(k, wq, 1.0, window_in_context=False, causal=False, kernel_size=1)
    assert methods.keep_indices(votes, 2).T.tolist() == [[2, 5], [2, 5]]
    # max pooling spreads a hot token's vote to its neighbours (kernel 3: +-1)
    pooled = methods.snapkv_scores(k, wq, 1.0, False, False, kernel_size=3, pooling="max")
    assert torch.equal(pooled[1], pooled[2]) and torch.equal(pooled[3], pooled[2])
    assert pooled[8, 0] < pooled[2, 0]


def test_snapkv_always_keeps_a_window_inside_the_context():
    k, wq = _peaked_keys(n=20)
    votes = methods.snapkv_scores(k, wq, 1.0, window_in_context=True, causal=True, kernel_size=7)
    assert torch.isinf(votes[-4:]).all() and torch.isfinite(votes[:-4]).all()
    kept = methods.keep_indices(votes, 6)
    for head in range(2):
        assert set(kept[:, head].tolist()) >= {16, 17, 18, 19}
        # the other two lie within the pooled reach (+-3) of the hot tokens 2 and 5
        assert set(kept[:2, head].tolist()) <= set(range(0, 9))
    # a budget below the window keeps the window's last tokens
    assert methods.keep_indices(votes, 2)[:, 0].tolist() == [18, 19]


def test_keep_indices_ascending_and_ties_to_later_tokens():
    scores = torch.tensor([[1.0], [3.0], [1.0], [2.0], [1.0]])
    assert methods.keep_indices(scores, 3)[:, 0].tolist() == [1, 3, 4]


def test_eviction_that_keeps_everything_is_exact_and_probs_scatter_per_head():
    k, v, wq = _random_cache(n=12, hkv=2, group=2)
    q = torch.randn(3, 4, 32)
    full = metrics.FullAttention(q, k, v, 0.2, topk=4)
    votes = methods.snapkv_scores(k, wq, 0.2, False, False)
    idx = methods.keep_indices(votes, 12)
    out, probs = metrics.attend(q, methods.gather_tokens(k, idx), methods.gather_tokens(v, idx), 0.2)
    got = full.compare(out, methods.scatter_probs(probs, idx, 12))
    assert got["rel_err"].max() < 1e-5 and got["topk"].min() == 1 and got["evicted_mass"].max() == 0
    # different kept sets per KV head land on the right tokens of their query heads
    idx = torch.tensor([[0, 1], [3, 5]])
    kept = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4, 3, 2)
    spread = methods.scatter_probs(kept, idx, 6)
    assert spread[0, 0].tolist() == [0, 0, 0, 1, 0, 0] and spread[3, 2].tolist() == [0, 22, 0, 0, 0, 23]


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return activations.load_minilm()


@pytest.fixture(scope="module")
def documents():
    docs = texts.default_paths()
    if len(docs) < 2:
        pytest.skip("needs the system's licence texts (/usr/share/common-licenses, Python's LICENSE)")
    return texts.load_documents()


def test_default_texts_are_found_and_identified(documents):
    assert len(documents) >= 2
    assert all(len(doc.text) > 1000 and len(doc.sha256) == 64 for doc in documents)


def test_sample_spans_round_robin_non_overlapping():
    assert activations.sample_spans([10, 25, 3], 5, 5) == [(0, 0), (1, 0), (0, 5), (1, 5), (1, 10)]
    assert activations.sample_spans([4], 5, 3) == []


def test_minilm_capture_reproduces_the_models_attention(minilm):
    model = minilm.model
    ids = minilm.prefix + minilm.encode("The licensee may copy and distribute the Program.") + minilm.suffix
    seen = {}
    layer = model.encoder.layer[2].attention.self
    handle = layer.register_forward_hook(lambda mod, args, out: seen.update(out=out[0]))
    try:
        captured = activations.capture(model, ids, range(len(ids)), range(len(ids)))
    finally:
        handle.remove()
    assert len(captured) == 6 and model.config._attn_implementation == "sdpa"
    cap = captured[2]
    assert cap.q.shape == (len(ids), 12, 32) and cap.k.shape == cap.v.shape == (len(ids), 12, 32)
    assert cap.scaling == pytest.approx(32 ** -0.5)
    out, _ = R.attention(cap.q, cap.k, cap.v, 1.0)  # queries are pre-scaled
    torch.testing.assert_close(out.reshape(len(ids), -1), seen["out"][0], rtol=1e-4, atol=1e-5)


def test_minilm_samples_shapes_and_windows(minilm, documents):
    samples = activations.build_samples(minilm, documents, context_len=48, query_len=8, window=16,
                                        max_samples=3)
    assert len(samples) == 3 and len({s.source.split("@")[0] for s in samples}) == 3
    s = samples[0]
    assert s.keys.shape == (49, 72, 32) and s.values.shape == (49, 72, 32)
    assert s.queries.shape == (8, 72, 32)
    assert s.window_same.shape == s.window_new.shape == (16, 72, 32)
    assert not s.causal and s.num_layers == 6 and s.num_q_heads == s.num_kv_heads == 12
    assert not torch.allclose(s.window_same, s.window_new)
    with pytest.raises(ValueError, match="at most 512"):
        activations.build_samples(minilm, documents, context_len=500, query_len=64)


def _tiny_llama_dir(tmp_path, documents):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([d.text for d in documents[:2]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path, model


def test_causal_lm_capture_is_post_rope_and_reproduces_attention(tmp_path, documents):
    path, model = _tiny_llama_dir(tmp_path, documents)
    ids = list(range(3, 23))
    attn = model.model.layers[1].self_attn
    seen = {}
    hooks = [
        attn.o_proj.register_forward_pre_hook(lambda mod, args: seen.update(o_in=args[0])),
        attn.k_proj.register_forward_hook(lambda mod, args, out: seen.update(k_pre=out)),
    ]
    try:
        captured = activations.capture(model, ids, range(20), range(20))
    finally:
        for h in hooks:
            h.remove()
    cap = captured[1]
    assert cap.q.shape == (20, 4, 32) and cap.k.shape == (20, 2, 32)  # GQA kept un-repeated
    out, _ = R.attention(cap.q, cap.k, cap.v, 1.0, causal_offset=0)
    torch.testing.assert_close(out.reshape(20, -1), seen["o_in"][0], rtol=1e-4, atol=1e-5)
    k_pre = seen["k_pre"][0].view(20, 2, 32)
    torch.testing.assert_close(cap.k[0], k_pre[0])  # RoPE is the identity at position 0 ...
    assert not torch.allclose(cap.k[5:], k_pre[5:])  # ... and rotates later positions

    lm = activations.load_causal_lm(str(path))
    assert lm.causal and lm.prefix == [1]
    samples = activations.build_samples(lm, documents, context_len=40, query_len=8, window=8,
                                        max_samples=2)
    s = samples[0]
    assert s.keys.shape == (41, 4, 32) and s.queries.shape == (8, 8, 32) and s.causal
    results = harness.run(samples, harness.EvalConfig(ratios=(0.5,), topk=4))
    assert results.mean("same", "spark-mean-k", 0.5, "rel_err") > 0


# ---------------------------------------------------------------------------------------------
# Harness, report and command line
# ---------------------------------------------------------------------------------------------


def test_harness_equal_bytes_and_ordering(minilm, documents):
    samples = activations.build_samples(minilm, documents, context_len=64, query_len=8, window=16,
                                        max_samples=2)
    results = harness.run(samples, harness.EvalConfig(ratios=(0.3, 0.8)))
    n = results.num_tokens
    for setting in harness.SETTINGS:
        for ratio in (0.3, 0.8):
            for method in methods.CHANNEL_METHODS:
                own = results.cells[(setting, method.name, "", ratio)]["bytes"]
                ev = results.cells[(setting, methods.EVICTION, method.name, ratio)]["bytes"]
                # whole tokens only; a method costlier than dense (padded records at ratio 0.3)
                # is matched by eviction keeping everything
                assert abs(min(own, results.dense_bytes) - ev) <= 0.5 * results.dense_bytes / n
            # more pruning, more error; SparK's kept channels beat ThinK's at equal ratio
            assert results.mean(setting, "spark-mean-k", 0.8, "rel_err") > \
                results.mean(setting, "spark-mean-k", 0.3, "rel_err")
            assert results.mean(setting, "think-k", ratio, "rel_err") > \
                results.mean(setting, "spark-mean-k", ratio, "rel_err")
    rows = results.rows()
    # (settings x (4 channel + 4 eviction) + oracle (SparK + SnapKV) + none (SparK)) x ratios
    # x (all + 6 layers)
    assert len(rows) == (2 * 8 + 3) * 2 * 7
    for ratio in (0.3, 0.8):  # the oracle window is at least as good for SparK as the same question
        assert results.mean("oracle", "spark-mean-k", ratio, "rel_err") <= \
            1.05 * results.mean("same", "spark-mean-k", ratio, "rel_err")


def test_cli_help():
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_cli_writes_deterministic_reports_and_keeps_the_reading(tmp_path):
    out = tmp_path / "docs" / "fid"
    args = ["--out", str(out), "--samples", "2", "--ratios", "0.5,0.8", "--context-len", "64",
            "--query-len", "8", "--window", "16"]
    assert main(args) == 0
    md, csv_path, png = out.with_suffix(".md"), out.with_suffix(".csv"), out.with_suffix(".png")
    assert png.stat().st_size > 10_000
    first_csv = csv_path.read_text()
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {m.name for m in methods.CHANNEL_METHODS} | {"snapkv"}
    text = md.read_text()
    assert report.BEGIN in text and report.END in text and "| same | rel. error |" in text
    md.write_text(text.replace("(Hand-written interpretation goes here; regenerating keeps it.)",
                               "MY READING"))
    assert main(args) == 0
    assert csv_path.read_text() == first_csv
    again = md.read_text()
    assert "MY READING" in again and again.count(report.BEGIN) == 1
    assert again.replace("MY READING", "") == text.replace(
        "(Hand-written interpretation goes here; regenerating keeps it.)", "")
