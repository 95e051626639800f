"""Built-in synthetic tasks with GSM8K-format answers: `arith` (arithmetic word problems) and
`wordops` (rule-based word puzzles, no arithmetic).

Every example is `Question: {question}\\nAnswer:` -> ` {worked steps}\\n#### {N}` with N a
non-negative integer, so lm-eval's gsm8k strict-match extraction grades both tasks.

Splits are disjoint by construction: a question's split is a function of its text alone
(`split_of`, a SHA-1 bucket: 10% test, 10% validation, 80% train), and each split's generator
keeps only questions from its own bucket. No seed or size can therefore leak a test question
into training. The seed picks which problems are drawn (`random.Random("{task}:{seed}:{split}")`,
stable across processes and Python versions).

`arith` mixes difficulty on three axes so that small adapters fall short where large ones do
not: the operation (+, -, x), operand size (each operand draws 1..max_digits digits, uniform
over digit counts; the smaller factor of a product has at most max(1, max_digits-2) digits, so
with the default 3 a product is at most 3 digits x 1 digit; two-step problems use operands of at
most max_digits-1 digits, keeping completions near 20-50 tokens), and one- vs two-step problems
(`two_step` of them chain two operations). Worked steps use GSM8K's calculator annotations,
`3 * 4 = <<3*4=12>>12`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence

from .examples import Example

OPERATIONS = ("+", "-", "*")
NAMES = [("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Lily", "she"), ("Sam", "he"), ("Mia", "she"),
         ("Omar", "he"), ("Zoe", "she"), ("Leo", "he"), ("Ivy", "she"), ("Raj", "he"), ("Nina", "she")]
OBJECTS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "cards", "stamps", "eggs"]
ITEMS = ["book", "toy", "lamp", "shirt", "ticket", "plant", "mug", "hat"]
CONTAINERS = ["boxes", "bags", "packs", "crates", "jars"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "chair", "music", "ocean", "pilot",
         "garden", "rocket", "silver", "candle", "forest", "jacket", "pencil", "window", "basket", "dragon",
         "cat", "dog", "sun", "map", "box", "cup", "egg", "fox", "hat", "key",
         "banana", "orange", "yellow", "purple", "castle", "bridge", "island", "valley", "winter", "summer",
         "bread", "honey", "onion", "sugar", "table", "plant", "train", "horse", "sheep", "zebra",
         "piano", "violin", "guitar", "drum", "flute", "mango", "peach", "grape", "melon", "kiwi"]
VOWELS = "aeiou"
BUCKETS = 10  # bucket 0 -> test, 1 -> validation, the rest -> train


def split_of(question: str) -> str:
    """The split a synthetic question belongs to, from its text alone (stable SHA-1 bucket)."""
    bucket = int(hashlib.sha1(question.encode("utf-8")).hexdigest()[:8], 16) % BUCKETS
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


# -- arith --------------------------------------------------------------------------------------
def _calc(a: int, op: str, b: int, money: bool = False) -> tuple[str, int]:
    """One GSM8K-style calculation: `a op b = <<a op b=r>>r`, with the result."""
    r = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {'$' if money else ''}<<{a}{op}{b}={r}>>{r}", r


def _who(rng):
    name, pron = rng.choice(NAMES)
    return name, pron, pron.capitalize()


def _add_objects(rng, num, fac):
    (name, _, He), obj = _who(rng), rng.choice(OBJECTS)
    a, b = num(), num()
    step, r = _calc(a, "+", b)
    return (f"{name} has {a} {obj}. {He} gets {b} more {obj}. How many {obj} does {name} have now?",
            f"{name} has {step} {obj} now.", r)


def _add_money(rng, num, fac):
    name, he, He = _who(rng)
    a, b = num(), num()
    step, r = _calc(a, "+", b, money=True)
    return (f"{name} earned ${a} on Monday and ${b} on Tuesday. How many dollars did {he} earn in total?",
            f"{He} earned {step} in total.", r)


def _sub_objects(rng, num, fac):
    (name, _, He), obj = _who(rng), rng.choice(OBJECTS)
    a, b = sorted((num(), num()), reverse=True)  # answers stay non-negative
    other = rng.choice([n for n, _ in NAMES if n != name])
    step, r = _calc(a, "-", b)
    return (f"{name} had {a} {obj}. {He} gave {b} of them to {other}. How many {obj} does {name} have left?",
            f"{name} has {step} {obj} left.", r)


def _sub_money(rng, num, fac):
    (name, he, He), item = _who(rng), rng.choice(ITEMS)
    a, b = sorted((num(), num()), reverse=True)
    step, r = _calc(a, "-", b, money=True)
    return (f"{name} had ${a} and spent ${b} on a {item}. How many dollars does {he} have left?",
            f"{He} has {step} left.", r)


def _mul_objects(rng, num, fac):
    (name, _, _), obj, box = _who(rng), rng.choice(OBJECTS), rng.choice(CONTAINERS)
    a, b = num(), fac()
    step, r = _calc(a, "*", b)
    return (f"{name} buys {a} {box} of {obj}. Each holds {b} {obj}. How many {obj} does {name} buy?",
            f"{name} buys {step} {obj}.", r)


def _mul_money(rng, num, fac):
    (name, _, _), item = _who(rng), rng.choice(ITEMS)
    a, b = fac(), num()
    step, r = _calc(a, "*", b, money=True)
    return (f"A {item} costs ${b}. {name} buys {a} of them. How many dollars does {name} spend?",
            f"{name} spends {step}.", r)


def _add_then_sub(rng, num, fac):
    (name, he, He), obj = _who(rng), rng.choice(OBJECTS)
    a, b = num(), num()
    first, d = _calc(a, "+", b)
    c = min(num(), d)
    other = rng.choice([n for n, _ in NAMES if n != name])
    second, r = _calc(d, "-", c)
    return (f"{name} has {a} {obj}. {He} buys {b} more and gives {c} to {other}. How many {obj} does {name} have now?",
            f"{He} has {first} {obj}.\nThen {he} has {second} {obj}.", r)


def _mul_then_add(rng, num, fac):
    (name, _, He), obj, box = _who(rng), rng.choice(OBJECTS), rng.choice(CONTAINERS)
    a, b, c = fac(), num(), num()
    first, d = _calc(a, "*", b)
    second, r = _calc(d, "+", c)
    return (f"{name} buys {a} {box} with {b} {obj} in each. {He} already had {c} {obj}. "
            f"How many {obj} does {name} have now?",
            f"The {box} hold {first} {obj}.\n{name} has {second} {obj}.", r)


# (operations used, template); two-step templates run when all their operations are enabled.
ONE_STEP = [("+", _add_objects), ("+", _add_money), ("-", _sub_objects), ("-", _sub_money),
            ("*", _mul_objects), ("*", _mul_money)]
TWO_STEP = [("+-", _add_then_sub), ("*+", _mul_then_add)]


def _number(rng: random.Random, digits: int) -> int:
    lo = 2 if digits == 1 else 10 ** (digits - 1)  # 0 and 1 make trivial problems
    return rng.randint(lo, 10**digits - 1)


# -- wordops ------------------------------------------------------------------------------------
def _vowels(rng):
    w = rng.choice(WORDS)
    vs = [ch for ch in w if ch in VOWELS]
    return f'How many vowels are in the word "{w}"?', f"The vowels in {w} are {', '.join(vs)}.", len(vs)


def _letter_count(rng):
    w = rng.choice(WORDS)
    letter = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    n = w.count(letter)
    return (f'How many times does the letter "{letter}" appear in "{w}"?',
            f"Spelled out: {' '.join(w)}.\nThe letter {letter} appears {n} time{'' if n == 1 else 's'}.", n)


def _word_list(rng):
    words = rng.sample(WORDS, rng.randint(3, 5))
    return words, rng.choice(words)


def _sort_position(rng):
    words, target = _word_list(rng)
    s = sorted(words)
    k = s.index(target) + 1
    return (f'Sort these words alphabetically: {", ".join(words)}. What is the position of "{target}"?',
            f"Sorted: {', '.join(s)}.\n{target} is word {k}.", k)


def _reverse_position(rng):
    words, target = _word_list(rng)
    rev = words[::-1]
    k = rev.index(target) + 1
    return (f'Reverse this list: {", ".join(words)}. What is the position of "{target}" now?',
            f"Reversed: {', '.join(rev)}.\n{target} is word {k}.", k)


def _longest(rng):
    words, _ = _word_list(rng)
    m = max(len(w) for w in words)
    lengths = ", ".join(f"{w} {len(w)}" for w in words)
    return (f"How many letters does the longest of these words have: {', '.join(words)}?",
            f"Lengths: {lengths}.\nThe longest has {m} letters.", m)


def _starts_with(rng):
    words, _ = _word_list(rng)
    letter = rng.choice(words)[0] if rng.random() < 0.7 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    hits = [w for w in words if w.startswith(letter)]
    return (f'How many of these words start with "{letter}": {", ".join(words)}?',
            f"Words starting with {letter}: {', '.join(hits) if hits else 'none'}.", len(hits))


WORDOPS = {"vowels": _vowels, "letter_count": _letter_count, "sort_position": _sort_position,
           "reverse_position": _reverse_position, "longest": _longest, "starts_with": _starts_with}


# -- generation ---------------------------------------------------------------------------------
def _collect(task: str, split: str, n: int, seed: int, draw: Callable[[random.Random], tuple[str, str, int]]) -> list[Example]:
    rng = random.Random(f"{task}:{seed}:{split}")
    seen: set[str] = set()
    out: list[Example] = []
    budget = 2000 + 100 * n  # ~10 draws per kept test/validation question; the rest guards tiny problem spaces
    for _ in range(budget):
        if len(out) == n:
            return out
        question, steps, result = draw(rng)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        out.append(Example(prompt=f"Question: {question}\nAnswer:", completion=f" {steps}\n#### {result}", answer=str(result)))
    if len(out) == n:
        return out
    raise ValueError(f"{task}: found only {len(out)} distinct {split} problems of the {n} requested; "
                     f"ask for fewer (num_train/num_eval/validation_size) or widen the task (e.g. arith_max_digits).")


def generate_arith(split: str, n: int, seed: int = 0, max_digits: int = 3,
                   operations: Sequence[str] = OPERATIONS, two_step: float = 0.3) -> list[Example]:
    """Arithmetic word problems with GSM8K-style worked answers (`... = <<a+b=c>>c ... #### c`).

    Args:
        split: `train` | `validation` | `test`; the three are disjoint (see `split_of`).
        n: how many distinct problems to return.
        seed: which problems are drawn; the same (split, n, seed, knobs) always gives the same list.
        max_digits: operands have 1..max_digits digits (uniform over digit counts).
        operations: the subset of `+ - *` to use.
        two_step: fraction of problems that chain two operations (when all their operations are enabled).

    Returns:
        `n` Examples whose `answer` is the final non-negative integer as a string.
    """
    ops = set(operations)
    one = [t for o, t in ONE_STEP if o in ops]
    two = [t for o, t in TWO_STEP if set(o) <= ops]
    if not one:
        raise ValueError(f"operations={list(operations)} enables no arith template; use a subset of {list(OPERATIONS)}.")

    def draw(rng: random.Random):
        chained = bool(two) and rng.random() < two_step
        top = max(1, max_digits - 1) if chained else max_digits  # chained problems keep their answers short
        num = lambda: _number(rng, rng.randint(1, top))  # noqa: E731
        fac = lambda: _number(rng, rng.randint(1, max(1, max_digits - 2)))  # noqa: E731
        return rng.choice(two if chained else one)(rng, num, fac)

    return _collect("arith", split, n, seed, draw)


def generate_wordops(split: str, n: int, seed: int = 0, tasks: Sequence[str] | None = None) -> list[Example]:
    """Rule-based word puzzles (count vowels/letters, position after sorting or reversing a list,
    longest word, words starting with a letter), each ending `#### N`.

    Args:
        split: `train` | `validation` | `test`; disjoint as for `generate_arith`.
        n: how many distinct problems to return.
        seed: which problems are drawn.
        tasks: subset of `WORDOPS` names (default: all, drawn uniformly).

    Returns:
        `n` Examples with integer answers, so gsm8k exact match grades them.
    """
    names = list(tasks) if tasks is not None else list(WORDOPS)
    unknown = [t for t in names if t not in WORDOPS]
    if unknown or not names:
        raise ValueError(f"Unknown wordops tasks {unknown or names}. Available: {', '.join(WORDOPS)}")
    return _collect("wordops", split, n, seed, lambda rng: WORDOPS[rng.choice(names)](rng))
