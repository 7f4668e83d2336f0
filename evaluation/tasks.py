"""Task-level fidelity through ``sglang.Engine``: a long-context suite in the manner of RULER.

Four synthetic tasks, generated locally and deterministically from a seed (no download), with a
target context length in *words* (whitespace-separated, so the same examples serve any tokenizer)
and a chat-free plain-text prompt that ends with an answer prefix:

* ``niah_single`` — one needle "The special magic number for KEY is VALUE." at a seeded depth of
  a haystack of filler sentences; the question asks for VALUE;
* ``niah_multikey`` — several needles with different keys at seeded depths; one key is asked for,
  the others are distractors;
* ``variable_tracking`` — a chain "VAR A = 12345. VAR B = A. VAR C = B. ..." spread through the
  filler (plus optional distractor chains); the question asks for every variable equal to 12345;
* ``common_words`` — a numbered list of words where ``k`` words repeat many times and the rest
  two times at most; the question asks for the ``k`` most common words.

Scoring is exact match on the generated text, case-insensitive, on whole words (``1234567`` does
not match inside ``12345678``): single-answer tasks need the answer, multi-answer tasks need all of
them (``recall``, RULER's partial credit, is reported next to it). :func:`run_suite` starts one
``sglang.Engine`` per backend configuration (dense ``triton`` first, then ``spark`` at the given
ratios), runs every prompt as one batch at temperature 0, and reports per task and backend the
accuracy and how often each backend's text equals the dense backend's.

Default run (embedded tiny model with random weights, 1 example per task, about 80 words of
context, key ratios 0.5 and 0.8; about 3 minutes on a 2-core CPU, where the Triton interpreter makes
SparK's prefill the slow part; its accuracy is ~0 by construction, only the agreement with dense is
meaningful there)::

    python -m evaluation.tasks --out docs/tasks.md

A real model on a GPU (K only and K+V at 0.5 / 0.8, roughly 4k / 8k / 16k tokens of context: the
report gives the measured prompt tokens; one run per length; chunked prefill off, so each prompt is
prefilled in one piece and SparK scores its channels with the question's window)::

    for W in 3000 6000 12000; do
      python -m evaluation.tasks --model-path meta-llama/Llama-3.1-8B-Instruct \\
          --ratios 0.5,0.8 --value-ratios 0,0.5 --examples 50 --context-words $W \\
          --max-new-tokens 64 --engine-arg chunked_prefill_size=-1 \\
          --out docs/tasks_llama3.1-8b_${W}w.md
    done
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # SparK's Triton kernels run in the interpreter on CPU; must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TASKS = ("niah_single", "niah_multikey", "variable_tracking", "common_words")
FILLERS = ("words", "noise", "licenses")

# --------------------------------------------------------------------------------------------
# Built-in vocabulary (no digits, no "magic", no "VAR"): filler sentences, needle keys, word lists.
# --------------------------------------------------------------------------------------------

NOUNS = """
apple anchor arrow autumn badge bakery balcony banner barrel basket beacon blanket bottle bridge
bucket cabin camera candle canyon carpet castle cellar chair chapel cliff clock cloud coast comet
compass cottage courtyard crystal curtain daisy desert diamond dolphin door dragon drum eagle engine
falcon feather fence field forest fountain garden garlic glacier harbor helmet hill horizon island
jacket jungle kettle kitchen ladder lake lantern lemon library lighthouse lizard meadow mirror
monastery mountain museum needle ocean orchard owl paddle palace parrot pebble pencil pepper piano
pillow planet pocket pond puzzle quarry rabbit railway ribbon river rocket saddle sailor salmon
scarf shadow shelf shovel signal silver sparrow spider spoon squirrel stable statue storm stream
street sugar summit tablet teapot temple theater thunder tiger tower tractor trumpet tunnel turtle
umbrella valley velvet village violin wagon walnut wardrobe window winter wizard wolf workshop
""".split()

ADJECTIVES = """
ancient bitter bold brave breezy bright brisk calm careful cheerful clever cold cozy crisp curious
damp dusty eager early faint fair fancy fierce fragile fresh gentle giant glossy golden graceful
grand gray green happy heavy hollow humble icy jolly kind large lazy little lively lonely loud lucky
mellow merry mighty misty modest narrow noble odd old pale patient plain polite proud quick quiet
rapid rare rough round royal rusty sandy shiny silent simple sleepy slow smooth soft sour steady
sturdy sunny swift tall tender tidy tiny vast warm wild wise wooden young
""".split()

VERBS = """
admired borrowed built carried chased cleaned covered crossed decorated delivered described
discovered drew examined filled followed found gathered guarded held hid lifted measured mended
moved noticed opened painted passed placed polished pulled pushed reached repaired rescued
returned shared showed studied touched traced visited washed watched
""".split()

PLACES = """
near beside behind above below across inside outside beyond around
""".split()

TIMES = ["yesterday", "today", "before dawn", "at noon", "at dusk", "in spring", "in summer", "in autumn",
         "in winter", "every morning"]

# RULER's "noise" haystack.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

COMMON_LICENSES = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "LGPL-2.1", "GFDL-1.3", "MPL-2.0", "Apache-2.0", "Artistic")

WORD_RE = r"(?<![a-z0-9]){}(?![a-z0-9])"


# --------------------------------------------------------------------------------------------
# Examples and scoring
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One prompt. ``answers``: acceptable strings; ``match``: "any" (one of them) or "all"."""

    task: str
    prompt: str
    answers: list[str]
    match: str = "any"
    meta: dict = field(default_factory=dict)

    def score(self, prediction: str) -> float:
        return score(prediction, self.answers, self.match)

    def recall(self, prediction: str) -> float:
        return recall(prediction, self.answers)


def _found(prediction: str, answer: str) -> bool:
    return re.search(WORD_RE.format(re.escape(answer.lower().strip())), prediction.lower()) is not None


def score(prediction: str, answers: list[str], match: str = "any") -> float:
    """1.0 if the generated text holds the answer (any one of ``answers``, or all of them for
    ``match="all"``) as a whole word, case-insensitive; else 0.0."""
    if match not in ("any", "all"):
        raise ValueError(f"match must be 'any' or 'all', not {match!r}")
    hits = [_found(prediction, a) for a in answers]
    return float(any(hits) if match == "any" else all(hits))


def recall(prediction: str, answers: list[str]) -> float:
    """Fraction of ``answers`` found (RULER's ``string_match_all`` partial credit)."""
    return sum(_found(prediction, a) for a in answers) / len(answers)


def agreement(texts: list[str], reference: list[str]) -> float:
    """Fraction of outputs whose text equals the reference output exactly."""
    if len(texts) != len(reference):
        raise ValueError(f"{len(texts)} outputs against {len(reference)} reference outputs")
    return sum(a == b for a, b in zip(texts, reference)) / len(texts) if texts else float("nan")


def token_agreement(ids: list[list[int]], reference: list[list[int]]) -> float:
    """Mean fraction of the reference's generated tokens matched before the first difference."""
    if len(ids) != len(reference):
        raise ValueError(f"{len(ids)} outputs against {len(reference)} reference outputs")
    fractions = []
    for a, b in zip(ids, reference):
        same = 0
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
        fractions.append(same / len(b) if b else float(a == b))
    return sum(fractions) / len(fractions) if fractions else float("nan")


# --------------------------------------------------------------------------------------------
# Filler
# --------------------------------------------------------------------------------------------


def _word_sentence(rng: random.Random) -> str:
    a, n, v, p, t = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(PLACES), rng.choice(TIMES)
    a2, n2, n3 = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(NOUNS)
    form = rng.randrange(4)
    if form == 0:
        s = f"the {a} {n} {v} the {n2} {p} the {n3}"
    elif form == 1:
        s = f"a {a} {n} {v} a {a2} {n2} {t}"
    elif form == 2:
        s = f"{t} the {n} {p} the {a} {n2} was {a2}"
    else:
        s = f"someone {v} the {a} {n} and the {n2} {p} the {n3}"
    return s[0].upper() + s[1:] + "."


_LICENSE_CACHE: dict[str, list[str]] = {}


def license_sentences() -> list[str]:
    """Sentences of the licence texts in /usr/share/common-licenses without digits (so the
    needles hold the only numbers); empty if the folder is missing."""
    if "s" not in _LICENSE_CACHE:
        sentences = []
        for name in LICENSE_FILES:
            path = COMMON_LICENSES / name
            if not path.is_file():
                continue
            text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
            for s in re.split(r"(?<=[.!?])\s+", text):
                if 6 <= len(s.split()) <= 40 and not re.search(r"[0-9]|magic|\bVAR\b", s) and s[0].isupper():
                    sentences.append(s)
        _LICENSE_CACHE["s"] = sentences
    return _LICENSE_CACHE["s"]


def filler_source(filler: str) -> str:
    """The filler actually used: ``licenses`` falls back to ``words`` when the texts are absent."""
    if filler not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, not {filler!r}")
    if filler == "licenses" and len(license_sentences()) < 50:
        return "words"
    return filler


def filler_id(filler: str) -> str:
    """How the filler is identified in reports (licence text: SHA-256 of the sentence pool)."""
    source = filler_source(filler)
    if source == "licenses":
        digest = hashlib.sha256("\n".join(license_sentences()).encode()).hexdigest()[:12]
        return f"licenses ({COMMON_LICENSES}, {len(license_sentences())} sentences, sha256 {digest})"
    if filler == "licenses":
        return "words (built-in; licence texts not found)"
    names = {"words": "words (built-in word list, seeded sentences)", "noise": "noise (RULER's repeated sentences)"}
    return names[source]


def haystack(rng: random.Random, n_words: int, filler: str = "words") -> list[str]:
    """Filler sentences totalling at least ``n_words`` words (none when ``n_words <= 0``)."""
    source = filler_source(filler)
    out, count = [], 0
    if source == "licenses":
        pool = license_sentences()
        i = rng.randrange(len(pool))  # contiguous text from a seeded start
    noise = re.split(r"(?<=\.)\s+", NOISE)
    while count < n_words:
        if source == "words":
            s = _word_sentence(rng)
        elif source == "noise":
            s = noise[len(out) % len(noise)]
        else:
            s = pool[i % len(pool)]
            i += 1
        out.append(s)
        count += len(s.split())
    return out


def insert_at_depths(sentences: list[str], items: list[tuple[float, str]]) -> tuple[str, list[int]]:
    """Insert each ``(depth, sentence)`` at the sentence boundary whose count of filler words before
    it is nearest ``depth`` x all filler words (0 = start, 1 = end); items at one boundary keep their
    order. Returns the text and the boundary (sentence index) of each item."""
    before = [0]
    for s in sentences:
        before.append(before[-1] + len(s.split()))
    slots = [min(range(len(before)), key=lambda b: (abs(before[b] - d * before[-1]), b)) for d, _ in items]
    order = sorted(range(len(items)), key=lambda j: (slots[j], j))
    merged, k = [], 0
    for b in range(len(sentences) + 1):
        while k < len(order) and slots[order[k]] == b:
            merged.append(items[order[k]][1])
            k += 1
        if b < len(sentences):
            merged.append(sentences[b])
    return " ".join(merged), slots


def _keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in keys:
            keys.append(key)
    return keys


def _numbers(rng: random.Random, n: int, digits: int) -> list[str]:
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10**digits), n)]


def _var_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def _task_rng(task: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{task}:{seed}:{index}")  # str seeds hash deterministically (sha512)


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

NIAH_HEAD = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
NIAH_TAIL = (
    "\nWhat is the special magic number for {key} mentioned in the provided text?\n"
    "Answer: The special magic number for {key} mentioned in the provided text is"
)
NEEDLE = "The special magic number for {key} is {value}."


def niah_single(seed: int = 0, index: int = 0, context_words: int = 150, *, depth: float | None = None,
                filler: str = "words") -> Example:  # fmt: skip
    """One needle at ``depth`` (seeded uniform in [0, 1] when None) of a filler haystack."""
    return niah_multikey(seed, index, context_words, num_keys=1, depths=None if depth is None else [depth],
                         filler=filler, _task="niah_single")  # fmt: skip


def niah_multikey(seed: int = 0, index: int = 0, context_words: int = 150, *, num_keys: int = 4,
                  depths: list[float] | None = None, filler: str = "words",
                  _task: str = "niah_multikey") -> Example:  # fmt: skip
    """``num_keys`` needles with distinct keys and values at seeded depths; one key is asked for."""
    rng = _task_rng(_task, seed, index)
    keys, values = _keys(rng, num_keys), _numbers(rng, num_keys, 7)
    depths = list(depths) if depths is not None else [rng.random() for _ in range(num_keys)]
    if len(depths) != num_keys:
        raise ValueError(f"{len(depths)} depths for {num_keys} needles")
    asked = rng.randrange(num_keys)
    needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    filler_words = context_words - sum(len(s.split()) for s in needles)
    context, slots = insert_at_depths(haystack(rng, filler_words, filler), list(zip(depths, needles)))
    prompt = NIAH_HEAD + context + NIAH_TAIL.format(key=keys[asked])
    meta = {"key": keys[asked], "depth": depths[asked], "depths": depths, "keys": keys, "values": values,
            "context_words": len(context.split())}  # fmt: skip
    return Example(_task, prompt, [values[asked]], "any", meta)


VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_TAIL = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text above.\n"
    "Answer: According to the chain(s) of variables assignment in the text above, {n} variables are "
    "assigned the value {value}, they are:"
)


def variable_tracking(seed: int = 0, index: int = 0, context_words: int = 150, *, hops: int = 4,
                      chains: int = 1, filler: str = "words") -> Example:  # fmt: skip
    """``chains`` chains of ``hops + 1`` variables ("VAR A = 12345. VAR B = A. ..."), each chain's
    statements in order at sorted seeded depths; the first chain is asked for."""
    rng = _task_rng("variable_tracking", seed, index)
    names = _var_names(rng, chains * (hops + 1))
    values = _numbers(rng, chains, 5)
    items = []
    for c in range(chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        statements = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = {a}." for a, b in zip(chain, chain[1:])]
        items += list(zip(sorted(rng.random() for _ in statements), statements))
    filler_words = context_words - sum(len(s.split()) for _, s in items)
    context, _ = insert_at_depths(haystack(rng, filler_words, filler), items)
    answers = names[: hops + 1]
    prompt = VT_HEAD + context + VT_TAIL.format(value=values[0], n=len(answers))
    meta = {"value": values[0], "chains": [names[c * (hops + 1) : (c + 1) * (hops + 1)] for c in range(chains)],
            "context_words": len(context.split())}  # fmt: skip
    return Example("variable_tracking", prompt, answers, "all", meta)


CWE_HEAD = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_TAIL = (
    "\nQuestion: What are the {k} most common words in the above list?\n"
    "Answer: The top {k} words that appear most often in the list are:"
)


def _cwe_vocabulary(rng: random.Random, n: int) -> list[str]:
    words = sorted(set(NOUNS) | set(ADJECTIVES))
    rng.shuffle(words)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    while len(words) < n:  # seeded pseudo-words when the built-in list is too short
        w = "".join(rng.choice(syllables) for _ in range(3))
        if w not in words:
            words.append(w)
    return words[:n]


def common_words(seed: int = 0, index: int = 0, context_words: int = 150, *, top_k: int = 10,
                 common_freq: int = 30, uncommon_freq: int = 2) -> Example:  # fmt: skip
    """A numbered list ("1. word 2. word ...", two words per entry) of ``context_words // 2``
    entries: ``top_k`` words ``common_freq`` times each (both shrink to fit short contexts), the
    rest at most ``uncommon_freq`` times; the question asks for the ``top_k`` most common."""
    rng = _task_rng("common_words", seed, index)
    entries = max(context_words // 2, 1)
    top_k = max(1, min(top_k, entries // (2 * (uncommon_freq + 2))))
    common_freq = max(uncommon_freq + 2, min(common_freq, entries // (2 * top_k)))
    rest = max(entries - top_k * common_freq, 0)
    n_uncommon = -(-rest // uncommon_freq)
    vocab = _cwe_vocabulary(rng, top_k + n_uncommon)
    common, uncommon = vocab[:top_k], vocab[top_k:]
    words = [w for w in common for _ in range(common_freq)]
    words += [w for w in uncommon for _ in range(uncommon_freq)][:rest]
    rng.shuffle(words)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    prompt = CWE_HEAD + context + CWE_TAIL.format(k=top_k)
    meta = {"top_k": top_k, "common_freq": common_freq, "uncommon_freq": uncommon_freq, "entries": len(words),
            "context_words": len(context.split())}  # fmt: skip
    return Example("common_words", prompt, common, "all", meta)


GENERATORS = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
}


def generate(task: str, num_examples: int, context_words: int, seed: int = 0, filler: str = "words") -> list[Example]:
    """``num_examples`` examples of ``task``; example ``i`` depends only on (task, seed, i)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    kwargs = {} if task == "common_words" else {"filler": filler}
    return [GENERATORS[task](seed, i, context_words, **kwargs) for i in range(num_examples)]


# --------------------------------------------------------------------------------------------
# Running through sglang.Engine
# --------------------------------------------------------------------------------------------


def dense_backend() -> tuple[str, dict]:
    return ("dense (triton)", {"attention_backend": "triton"})


def spark_backend(key_ratio: float, value_ratio: float = 0.0, **options) -> tuple[str, dict]:
    name = f"spark K{key_ratio:g}" + (f" V{value_ratio:g}" if value_ratio else "")
    return (name, {"attention_backend": "spark", "spark_key_ratio": key_ratio, "spark_value_ratio": value_ratio,
                   **{f"spark_{k}": v for k, v in options.items()}})  # fmt: skip


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"


def model_dtype(model_path: str, requested: str | None) -> str:
    if requested and requested != "auto":
        return requested
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            config = json.load(f)
        return str(config.get("torch_dtype") or config.get("dtype") or "auto")
    except OSError:
        return "auto"


def run_suite(model_path: str | None = None, backends: list[tuple[str, dict]] | None = None,
              tasks: list[str] | tuple[str, ...] = TASKS, num_examples: int = 1, context_words: int = 80,
              max_new_tokens: int = 8, seed: int = 0, *, filler: str = "words",
              engine_overrides: dict | None = None, log=print) -> dict:  # fmt: skip
    """Run every task's prompts as one batch through one ``sglang.Engine`` per backend.

    ``backends``: ``(name, engine keywords)`` pairs (default: dense ``triton``, then ``spark`` at key
    ratio 0.5); the first is the reference for agreement. Every engine gets
    :func:`spark_sglang.demo.engine_kwargs` (CPU: float32, no CUDA graph; on a GPU the
    static memory fraction is left to SGLang), then ``engine_overrides``, then the backend's own.
    Greedy (temperature 0), ``max_new_tokens`` each.

    Returns ``{"config", "backends", "examples", "outputs", "scores", "accuracy", "recall",
    "agreement", "token_agreement", "prompt_tokens", "seconds", "generate_seconds"}``, the scores
    indexed ``[task][backend]`` (``outputs`` and ``scores``: ``[backend][task]``, one per example).
    """
    from spark_sglang.demo import engine_kwargs  # imports sglang: after TRITON_INTERPRET is set
    from spark_sglang.tiny_model import DEFAULT_DIR, build_tiny_llama

    tiny = model_path is None or os.path.abspath(model_path) == os.path.abspath(DEFAULT_DIR)
    model_path = model_path or build_tiny_llama()
    backends = list(backends) if backends is not None else [dense_backend(), spark_backend(0.5)]
    names = [name for name, _ in backends]
    if len(set(names)) != len(names):
        raise ValueError(f"backend names must be distinct: {names}")
    tasks = list(tasks)
    examples = {task: generate(task, num_examples, context_words, seed, filler) for task in tasks}
    flat = [(task, ex) for task in tasks for ex in examples[task]]
    prompts = [ex.prompt for _, ex in flat]

    import sglang as sgl

    base = engine_kwargs(model_path)
    if torch.cuda.is_available():
        base.pop("mem_fraction_static", None)  # the demo's 5% is for the tiny model only
    base.update(engine_overrides or {})
    outputs: dict[str, dict[str, list[dict]]] = {}
    prompt_tokens: dict[str, float] = {}
    seconds: dict[str, float] = {}
    generate_seconds: dict[str, float] = {}
    dtype = None
    for name, kwargs in backends:
        log(f"[tasks] {name}: starting sglang.Engine ({len(prompts)} prompts)")
        t0 = time.perf_counter()
        engine = sgl.Engine(**{**base, **kwargs})
        try:
            info = engine.get_server_info()
            dtype = dtype or info.get("dtype")
            t1 = time.perf_counter()
            params = {"temperature": 0, "max_new_tokens": max_new_tokens}
            results = engine.generate(prompt=prompts, sampling_params=params)
            t2 = time.perf_counter()
        finally:
            engine.shutdown()
        if len(results) != len(prompts):
            raise RuntimeError(f"{name}: {len(results)} outputs for {len(prompts)} prompts")
        outputs[name] = {task: [] for task in tasks}
        for (task, _), r in zip(flat, results):
            outputs[name][task].append({"text": r["text"], "output_ids": list(r["output_ids"]),
                                        "prompt_tokens": r["meta_info"]["prompt_tokens"]})  # fmt: skip
        seconds[name], generate_seconds[name] = t2 - t0, t2 - t1
        log(f"[tasks] {name}: start {t1 - t0:.1f} s, generate {t2 - t1:.1f} s")
        if name == names[0]:
            for task in tasks:
                counts = [o["prompt_tokens"] for o in outputs[name][task]]
                prompt_tokens[task] = sum(counts) / len(counts) if counts else 0.0

    ref = names[0]
    def per_example(fn) -> dict:
        return {n: {t: [fn(ex, o["text"]) for ex, o in zip(examples[t], outputs[n][t])] for t in tasks} for n in names}

    scores, recalls = per_example(Example.score), per_example(Example.recall)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    accuracy = {t: {n: mean(scores[n][t]) for n in names} for t in tasks}
    recall_ = {t: {n: mean(recalls[n][t]) for n in names} for t in tasks}
    agree = {t: {n: agreement([o["text"] for o in outputs[n][t]], [o["text"] for o in outputs[ref][t]])
                 for n in names} for t in tasks}  # fmt: skip
    tok_agree = {t: {n: token_agreement([o["output_ids"] for o in outputs[n][t]],
                                        [o["output_ids"] for o in outputs[ref][t]]) for n in names}
                 for t in tasks}  # fmt: skip
    config = {
        "model": model_path, "tiny": tiny, "device": device_name(), "dtype": model_dtype(model_path, dtype),
        "seed": seed, "tasks": tasks, "num_examples": num_examples, "context_words": context_words,
        "max_new_tokens": max_new_tokens, "filler": filler_id(filler), "reference": ref,
        "engine_overrides": engine_overrides or {},
    }  # fmt: skip
    return {
        "config": config, "backends": backends, "examples": examples, "outputs": outputs, "scores": scores,
        "accuracy": accuracy, "recall": recall_, "agreement": agree, "token_agreement": tok_agree,
        "prompt_tokens": prompt_tokens, "seconds": seconds, "generate_seconds": generate_seconds,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

TINY_NOTE = (
    "**The model here is the embedded tiny Llama with random weights: it cannot read, so its "
    "accuracy is ~0 on every task by construction and says nothing about SparK.** What this run "
    "shows is the plumbing (prompts generated, batched through `sglang.Engine` per backend, scored) "
    "and the *agreement with dense*: how often SparK's greedy text (and how many of its leading "
    "tokens) equal the dense backend's. Random weights amplify any change of a logit, so agreement "
    "here is a pessimistic stress test, not an estimate for a trained model."
)

GPU_COMMAND = """\
for W in 3000 6000 12000; do   # about 4k / 8k / 16k Llama-3 tokens of context
  python -m evaluation.tasks --model-path meta-llama/Llama-3.1-8B-Instruct \\
      --ratios 0.5,0.8 --value-ratios 0,0.5 --examples 50 --context-words $W \\
      --max-new-tokens 64 --engine-arg chunked_prefill_size=-1 \\
      --out docs/tasks_llama3.1-8b_${W}w.md
done"""

ABOUT = """\
A long-context suite in the manner of [RULER](https://arxiv.org/abs/2404.06654), generated locally
and deterministically from a seed by `evaluation/tasks.py` (no download), run through
`sglang.Engine` once per backend: dense (`triton`) as the reference, then `spark` at each key ratio
(and value ratio). All prompts of a backend go in one batch, greedy (temperature 0).

| task | what the model must do | answer |
| --- | --- | --- |
| `niah_single` | find "The special magic number for KEY is VALUE." hidden at a seeded depth of filler text | VALUE |
| `niah_multikey` | same with 4 needles of different keys; one key is asked for | its VALUE |
| `variable_tracking` | follow "VAR A = 12345. VAR B = A. ..." (5 variables) spread through filler | all 5 names |
| `common_words` | a numbered word list; name the k most common words (k = 10, fewer in short lists) | all k words |

Context length is set in words (`--context-words`), not tokens, so the same examples serve any
tokenizer; the table gives the mean prompt length in the model's tokens. Prompts are plain text
(no chat template) ending with an answer prefix ("Answer: The special magic number for KEY
mentioned in the provided text is"). **accuracy**: the generated text holds the answer (all answers
for the multi-answer tasks) as a whole word, case-insensitive. **recall**: fraction of the answers
found (RULER's partial credit). **text = dense**: fraction of prompts whose generated text equals
the dense backend's exactly. **tokens = dense**: mean fraction of dense's generated tokens
reproduced before the first difference."""


def _fmt(x: float) -> str:
    return "—" if x != x else f"{x:.2f}"


def markdown(results: dict, runtime_s: float | None = None, command: str | None = None) -> str:
    c = results["config"]
    names = [n for n, _ in results["backends"]]
    model = (f"embedded tiny Llama (`{os.path.basename(c['model'].rstrip('/'))}`, random weights)" if c["tiny"]
             else f"`{c['model']}`")  # fmt: skip
    lines = ["# Task-level fidelity through SGLang: RULER-style long-context tasks", "", ABOUT, ""]
    lines += ["## This run", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [
        f"- machine: {c['device']}",
        f"- model: {model}, dtype {c['dtype']}",
        f"- seed {c['seed']}, {c['num_examples']} example{'s' * (c['num_examples'] != 1)} per task, about "
        f"{c['context_words']} words of "
        f"context, {c['max_new_tokens']} new tokens, filler: {c['filler']}",
        f"- backends: {', '.join(names)} (reference for agreement: {c['reference']})",
    ]
    if c.get("engine_overrides"):
        lines.append(f"- engine arguments: `{json.dumps(c['engine_overrides'])}`")
    if runtime_s is not None:
        per = ", ".join(f"{n} {s:.0f} s" for n, s in results["seconds"].items())
        lines.append(f"- runtime: {runtime_s:.0f} s in all ({per}, engine start included)")
    lines.append("")
    if c["tiny"]:
        lines += [TINY_NOTE, ""]
    if c["device"].startswith("CPU") and len(names) > 1:
        t = results.get("generate_seconds", {})
        lines += ["On CPU every Triton kernel runs in the interpreter and SparK's prefill is the slow part "
                  f"(generation here: {', '.join(f'{n} {t[n]:.0f} s' for n in names if n in t)}), hence the "
                  "small defaults. The tiny model's tokenizer was trained on Python source, so English "
                  "costs it about 3 tokens a word and the instructions about 200 tokens.", ""]  # fmt: skip
    lines += ["| task | prompt tokens | backend | accuracy | recall | text = dense | tokens = dense |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for t in c["tasks"]:
        for n in names:
            lines.append(f"| {t} | {results['prompt_tokens'][t]:.0f} | {n} | {_fmt(results['accuracy'][t][n])} | "
                         f"{_fmt(results['recall'][t][n])} | {_fmt(results['agreement'][t][n])} | "
                         f"{_fmt(results['token_agreement'][t][n])} |")  # fmt: skip
    for n in names:  # unweighted mean over tasks
        row = [sum(results[k][t][n] for t in c["tasks"]) / len(c["tasks"])
               for k in ("accuracy", "recall", "agreement", "token_agreement")]  # fmt: skip
        lines.append(f"| **mean** | | {n} | " + " | ".join(_fmt(x) for x in row) + " |")
    lines += ["", "## Real models on a GPU", "",
              "One command per context length, K only and K+V at ratios 0.5 and 0.8 "
              "(Llama-3.1-8B-Instruct; any SGLang model that the `spark` backend accepts works):", "",
              "```bash", GPU_COMMAND, "```", "",
              "`chunked_prefill_size=-1` turns chunked prefill off, so each prompt is prefilled in one "
              "piece and SparK scores every context token's channels with the question's window (with "
              "chunked prefill each chunk uses its own window: the early context would be compressed "
              "against a mid-context window). Leave it out to measure the serving default instead. "
              "Words to tokens is roughly 1.3 for Llama-3 on this filler (not measured here: the "
              "report's *prompt tokens* column gives the real length). The radix "
              "cache stays on: a prompt may reuse the shared instruction header from it, compressed "
              "under an earlier prompt's window, as in serving. `--examples 50` gives a ±7-point "
              "standard error at 50% accuracy; RULER uses 500. These GPU commands have not been run "
              "yet in this repository.", ""]  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers") from None
    if not values or any(not 0 <= r < 1 for r in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every ratio must satisfy 0 <= r < 1")
    return values


def _tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad}; choose from {', '.join(TASKS)}")
    return tasks


def _engine_arg(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--engine-arg {text!r}: write KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.tasks",
        description="RULER-style long-context tasks through sglang.Engine: dense (triton) vs SparK.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model-path", default=None, help="model to serve (default: the embedded tiny Llama)")
    p.add_argument("--ratios", type=_floats, default=[0.5, 0.8], help="SparK key ratios, comma-separated")
    p.add_argument("--value-ratios", "--value-ratio", dest="value_ratios", type=_floats, default=[0.0],
                   help="SparK value ratios, comma-separated; each is combined with every key ratio")  # fmt: skip
    p.add_argument("--recovery", default="mean", choices=["mean", "zero"])
    p.add_argument("--tasks", type=_tasks, default=list(TASKS), help="comma-separated: " + ",".join(TASKS))
    p.add_argument("--examples", type=int, default=1, help="examples per task")
    p.add_argument("--context-words", type=int, default=80, help="target context length in words")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--filler", default="words", choices=FILLERS, help="haystack text (licenses: system licence texts)")
    p.add_argument("--engine-arg", type=_engine_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra sglang.Engine keyword for every backend (JSON value), repeatable")  # fmt: skip
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--json", default=None, help="write per-example outputs and scores here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    backends = [dense_backend()] + [spark_backend(k, v, recovery=args.recovery)
                                    for v in args.value_ratios for k in args.ratios]  # fmt: skip
    t0 = time.perf_counter()
    results = run_suite(args.model_path, backends, args.tasks, args.examples, args.context_words,
                        args.max_new_tokens, args.seed, filler=args.filler,
                        engine_overrides=dict(args.engine_arg))  # fmt: skip
    runtime = time.perf_counter() - t0
    command = "python -m evaluation.tasks " + " ".join(sys.argv[1:] if argv is None else argv)
    report = markdown(results, runtime, command.strip())
    print("\n" + report)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
        print(f"\nwrote {args.out}")
    if args.json:
        dump = {k: results[k] for k in ("config", "accuracy", "recall", "agreement", "token_agreement",
                                        "prompt_tokens", "seconds", "generate_seconds")}  # fmt: skip
        dump["examples"] = [
            {"task": t, "answers": ex.answers, "meta": ex.meta,
             "outputs": {n: results["outputs"][n][t][i]["text"] for n in results["outputs"]},
             "scores": {n: results["scores"][n][t][i] for n in results["scores"]}}
            for t in results["config"]["tasks"] for i, ex in enumerate(results["examples"][t])
        ]  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)
    return results


if __name__ == "__main__":
    main()
