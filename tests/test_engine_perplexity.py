"""``evaluation.engine_perplexity``'s plumbing through ``sglang.Engine`` on the tiny random
Llama: the continuation's prompt log-probs come back, request 2 reads the context from the radix
cache, the dense engine equals a transformers forward pass, and SparK moves the log-probs."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from evaluation import engine_perplexity as E
from spark_sglang.tiny_model import build_tiny_llama

CONTEXT, CONTINUATION, WINDOW = 40, 12, 8  # Y has CONTINUATION + 1 tokens
SETTINGS = {s.name: s for s in E.SETTINGS}


@pytest.fixture(scope="module")
def model_path():
    return build_tiny_llama()


@pytest.fixture(scope="module")
def spans(model_path):
    """Two samples of random token ids after ``<bos>``."""
    model = AutoModelForCausalLM.from_pretrained(model_path)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, CONTEXT + CONTINUATION + 1), generator=generator)
    return [E.Span(f"random-{i}", [model.config.bos_token_id], row.tolist(), CONTEXT) for i, row in enumerate(ids)]


def serve(model_path, spans, name):
    with E.engine_environment():
        return E.run_engine(model_path, SETTINGS[name], spans, WINDOW)


@pytest.fixture(scope="module")
def dense(model_path, spans):
    return serve(model_path, spans, "dense")


@torch.no_grad()
def transformers_logprobs(model_path, span: E.Span) -> torch.Tensor:
    """``[C]`` log-probs of ``Y[1:]`` from one float32 forward pass over context + ``Y``."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = span.context + span.continuation
    logits = model(torch.tensor([ids])).logits[0, len(span.context) : len(ids) - 1]
    return torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(span.continuation[1:])[:, None])[:, 0]


def test_dense_engine_returns_cached_continuation_logprobs_equal_to_transformers(model_path, spans, dense):
    for span, served in zip(spans, dense):
        assert served.logprobs.shape == (CONTINUATION,)
        assert served.cached_tokens == len(span.context)  # page size 1 on CPU
        torch.testing.assert_close(served.logprobs, transformers_logprobs(model_path, span), rtol=0, atol=1e-4)


def test_spark_engine_differs_from_dense_and_stays_finite(model_path, spans, dense):
    spark = serve(model_path, spans, "spark-k0.5")
    for span, served, reference in zip(spans, spark, dense):
        assert served.cached_tokens == len(span.context)
        assert torch.isfinite(served.logprobs).all()
        assert (served.logprobs - reference.logprobs).abs().max() > 1e-3


def test_logprobs_of_other_tokens_are_refused():
    meta = {"input_token_logprobs": [(None, 5, None), (-1.0, 6, None), (-2.0, 7, None)]}
    torch.testing.assert_close(E.continuation_logprobs(meta, [5, 6, 7]), torch.tensor([-1.0, -2.0], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="continuation"):
        E.continuation_logprobs(meta, [5, 6, 8])
