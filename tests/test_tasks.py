"""RULER-style task suite: generators (determinism, needle placement, answers recoverable from the
prompt), the scorer on hand-made outputs, and one run through ``sglang.Engine`` on the tiny model."""

import re
from collections import Counter

import pytest

from evaluation import tasks as T

FILLERS = ["words", "noise", "licenses"]


def context_of(ex: T.Example) -> str:
    """The text between the instruction line and the question."""
    head = {"niah_single": T.NIAH_HEAD, "niah_multikey": T.NIAH_HEAD, "variable_tracking": T.VT_HEAD,
            "common_words": T.CWE_HEAD}[ex.task]  # fmt: skip
    assert ex.prompt.startswith(head)
    return ex.prompt[len(head) :].rsplit("\nQuestion:" if "Question:" in ex.prompt else "\nWhat is", 1)[0]


# ----------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("task", T.TASKS)
def test_generators_are_deterministic_from_the_seed(task):
    a, b = T.generate(task, 3, 200, seed=7), T.generate(task, 3, 200, seed=7)
    assert [(x.prompt, x.answers, x.match) for x in a] == [(x.prompt, x.answers, x.match) for x in b]
    assert len({x.prompt for x in a}) == 3  # examples differ from each other
    assert T.generate(task, 1, 200, seed=7)[0].prompt == a[0].prompt  # example i independent of count
    assert T.generate(task, 1, 200, seed=8)[0].prompt != a[0].prompt


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("words", [60, 300, 2000])
def test_context_length_in_words(task, words):
    ex = T.generate(task, 1, words, seed=1)[0]
    n = len(context_of(ex).split())
    assert n == ex.meta["context_words"]
    assert words * 0.9 <= n <= words + 45, (n, words)
    assert ex.prompt.endswith(("is", "are:")) and "\n" not in ex.prompt.rsplit("Answer:", 1)[1]


@pytest.mark.parametrize("filler", FILLERS)
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_needle_once_at_the_requested_depth(filler, depth):
    ex = T.niah_single(seed=3, index=0, context_words=400, depth=depth, filler=filler)
    context = context_of(ex)
    needle = T.NEEDLE.format(key=ex.meta["key"], value=ex.answers[0])
    assert context.count(needle) == 1 and context.count("special magic number") == 1
    assert context.count(ex.answers[0]) == 1 and not re.search(r"\d", context.replace(ex.answers[0], ""))
    before = len(context[: context.index(needle)].split())
    filler_words = len(context.split()) - len(needle.split())
    longest = max(len(s.split()) for s in re.split(r"(?<=[.!?])\s+", context))
    assert abs(before - depth * filler_words) <= longest / 2, (before, depth * filler_words, longest)
    assert ex.meta["depth"] == depth


def test_seeded_depths_spread_over_the_haystack():
    depths = [T.niah_single(seed=0, index=i, context_words=100).meta["depth"] for i in range(40)]
    assert min(depths) < 0.2 and max(depths) > 0.8


def parse_niah(ex: T.Example) -> str:
    needles = dict(re.findall(r"The special magic number for (\S+) is (\d+)\.", context_of(ex)))
    key = re.search(r"What is the special magic number for (\S+) mentioned", ex.prompt).group(1)
    return needles[key]


def parse_variables(ex: T.Example) -> set[str]:
    assignments = re.findall(r"VAR ([A-Z]{5}) = ([A-Z]{5}|\d+)\.", context_of(ex))
    value = re.search(r"assigned the value (\d+) in the text above", ex.prompt).group(1)
    equal, grew = {value}, True
    while grew:
        new = {name for name, source in assignments if source in equal}
        grew = not new <= equal
        equal |= new
    return equal - {value}


def parse_common(ex: T.Example) -> tuple[set[str], int, int]:
    counts = Counter(re.findall(r"\d+\. (\w+)", context_of(ex)))
    k = int(re.search(r"What are the (\d+) most common words", ex.prompt).group(1))
    ranked = counts.most_common()
    return {w for w, _ in ranked[:k]}, ranked[k - 1][1], ranked[k][1] if len(ranked) > k else 0


@pytest.mark.parametrize("filler", FILLERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_answers_recoverable_from_the_prompt(filler, seed):
    for ex in T.generate("niah_single", 2, 150, seed, filler) + T.generate("niah_multikey", 2, 150, seed, filler):
        assert ex.match == "any" and [parse_niah(ex)] == ex.answers
    multi = T.generate("niah_multikey", 1, 150, seed, filler)[0]
    assert len(set(re.findall(r"magic number for (\S+) is", context_of(multi)))) == 4  # 3 distractors
    for ex in T.generate("variable_tracking", 2, 150, seed, filler):
        assert ex.match == "all" and parse_variables(ex) == set(ex.answers) and len(ex.answers) == 5
    chains = T.variable_tracking(seed, 0, 300, chains=3, filler=filler)
    assert parse_variables(chains) == set(chains.answers) and len(chains.meta["chains"]) == 3
    for ex in T.generate("common_words", 2, 150, seed) + T.generate("common_words", 1, 3000, seed):
        top, kth, next_ = parse_common(ex)
        assert ex.match == "all" and top == set(ex.answers) and kth > next_  # no tie at the cut
    assert len(T.generate("common_words", 1, 3000, seed)[0].answers) == 10


def test_licence_filler_is_system_text_or_falls_back():
    ex = T.niah_single(seed=0, context_words=200, depth=0.5, filler="licenses")
    if T.filler_source("licenses") == "licenses":
        assert any(context_of(ex).startswith(s) for s in T.license_sentences())
        assert "sha256" in T.filler_id("licenses")
    else:
        assert ex.prompt == T.niah_single(seed=0, context_words=200, depth=0.5, filler="words").prompt


# ----------------------------------------------------------------------------------- scoring


def test_scorer_exact_case_and_multi_answer():
    assert T.score(" 1234567.", ["1234567"]) == 1.0
    assert T.score("1234567", ["1234567"]) == 1.0
    assert T.score(" 12345678", ["1234567"]) == 0.0  # whole words only
    assert T.score(" 7654321", ["1234567"]) == 0.0
    assert T.score("", ["1234567"]) == 0.0
    assert T.score("the word is WARM", ["warm"]) == 1.0  # case-insensitive
    assert T.score("Answer: tkpav", ["TKPAV"]) == 1.0
    assert T.score("warmer", ["warm"]) == 0.0
    names = ["TKPAV", "JOEZD", "DBQBL"]
    assert T.score(" TKPAV, JOEZD, DBQBL", names, "all") == 1.0
    assert T.score(" dbqbl joezd tkpav", names, "all") == 1.0  # any order
    assert T.score(" TKPAV, JOEZD", names, "all") == 0.0
    assert T.recall(" TKPAV, JOEZD", names) == pytest.approx(2 / 3)
    assert T.score(" JOEZD", names, "any") == 1.0
    ex = T.generate("variable_tracking", 1, 100)[0]
    assert ex.score(" " + ", ".join(reversed(ex.answers))) == 1.0 and ex.score(ex.answers[0]) == 0.0
    with pytest.raises(ValueError):
        T.score("x", ["x"], "most")


def test_agreement_functions():
    texts = ["a b", "c", "d"]
    assert T.agreement(texts, list(texts)) == 1.0
    assert T.agreement(["a b", "c", "x"], texts) == pytest.approx(2 / 3)
    assert T.token_agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == 1.0
    assert T.token_agreement([[1, 9, 3], [7, 5]], [[1, 2, 3], [4, 5]]) == pytest.approx((1 / 3 + 0) / 2)
    with pytest.raises(ValueError):
        T.agreement(["a"], ["a", "b"])


def test_cli_options():
    args = T.build_parser().parse_args([
        "--ratios", "0.5,0.8", "--value-ratio", "0,0.5", "--tasks", "niah_single,common_words",
        "--engine-arg", "chunked_prefill_size=-1",
    ])  # fmt: skip
    assert args.ratios == [0.5, 0.8] and args.value_ratios == [0.0, 0.5]
    assert args.tasks == ["niah_single", "common_words"] and args.engine_arg == [("chunked_prefill_size", -1)]
    for bad in (["--ratios", "1.0"], ["--tasks", "nope"], ["--engine-arg", "x"]):
        with pytest.raises(SystemExit):
            T.build_parser().parse_args(bad)
    assert T.spark_backend(0.5, 0.5, recovery="zero") == ("spark K0.5 V0.5", {
        "attention_backend": "spark", "spark_key_ratio": 0.5, "spark_value_ratio": 0.5, "spark_recovery": "zero"})


# ----------------------------------------------------------------------------------- engine


def test_run_suite_through_sglang_engine_on_the_tiny_model():
    backends = [T.dense_backend(), T.spark_backend(0.5)]
    names = [n for n, _ in backends]
    results = T.run_suite(None, backends, T.TASKS, num_examples=1, context_words=50, max_new_tokens=6, seed=0)
    assert results["config"]["tiny"] and results["config"]["reference"] == names[0]
    for task in T.TASKS:
        assert set(results["accuracy"][task]) == set(names)
        for name in names:
            outs = results["outputs"][name][task]
            assert len(outs) == len(results["examples"][task]) == 1
            assert all(isinstance(o["text"], str) and 1 <= len(o["output_ids"]) <= 6 for o in outs)
            for key in ("accuracy", "recall", "agreement", "token_agreement"):
                assert 0.0 <= results[key][task][name] <= 1.0
        dense_texts = [o["text"] for o in results["outputs"][names[0]][task]]
        assert results["agreement"][task][names[0]] == T.agreement(dense_texts, dense_texts) == 1.0
        assert results["token_agreement"][task][names[0]] == 1.0
        spark_texts = [o["text"] for o in results["outputs"][names[1]][task]]
        assert results["agreement"][task][names[1]] == T.agreement(spark_texts, dense_texts)
        assert results["prompt_tokens"][task] > 60
    report = T.markdown(results, 1.0, "python -m evaluation.tasks")
    assert "random weights" in report and report.count("| spark K0.5 |") == len(T.TASKS) + 1
