"""Built-in arithmetic word problems in GSM8K's answer format: worked lines, then `#### N`.

The embedded default dataset: deterministic for a seed, several story templates, 1 to 3 steps,
every intermediate result a non-negative integer. A problem is a dict with `question`, `answer`
and `steps`, the same schema as GSM8K's jsonl plus the step count.
"""

from __future__ import annotations

import random

NAMES = ["Ava", "Ben", "Carla", "Dev", "Ella", "Finn", "Gia", "Hugo", "Iris", "Jon", "Kai", "Lena",
         "Max", "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Zoe"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "coins", "cards",
         "stamps", "eggs", "balloons", "crayons", "buttons", "flowers", "toys"]
CONTAINERS = ["box", "bag", "jar", "basket", "crate", "tray"]


def _add(rng: random.Random, name: str, item: str, x: int, hi: int):
    n = rng.randint(1, hi)
    verb, done = rng.choice([("buys", "bought"), ("finds", "found"), ("gets", "got"),
                             ("picks up", "picked up")])
    return (f"Then {name} {verb} {n} more {item}.",
            f"{name} {done} {n} more, so {name} has {x} + {n} = {x + n} {item}.", x + n)


def _sub(rng: random.Random, name: str, item: str, x: int, hi: int):
    if x < 2:
        return _add(rng, name, item, x, hi)
    n = rng.randint(1, x - 1)
    friend = rng.choice([f for f in NAMES if f != name])
    verb, done = rng.choice([(f"gives {n} {item} to {friend}", f"gave {n} away"),
                             (f"loses {n} {item}", f"lost {n}"),
                             (f"sells {n} {item}", f"sold {n}")])
    return (f"Then {name} {verb}.", f"{name} {done}, so {name} has {x} - {n} = {x - n} {item}.",
            x - n)


def _mul(rng: random.Random, name: str, item: str, x: int, hi: int):
    if x > hi:
        return _sub(rng, name, item, x, hi)
    n = rng.randint(2, 4)
    word = {2: "doubles", 3: "triples", 4: "quadruples"}[n]
    return (f"Then {name} {word} the number of {item}.",
            f"{name} {word} them, so {name} has {x} * {n} = {x * n} {item}.", x * n)


def _div(rng: random.Random, name: str, item: str, x: int, hi: int):
    divisors = [d for d in (2, 3, 4, 5) if x % d == 0 and x // d > 0]
    if not divisors:
        return _add(rng, name, item, x, hi)
    n = rng.choice(divisors)
    return (f"Then {name} splits the {item} into {n} equal piles and keeps one pile.",
            f"{name} keeps one of {n} piles, so {name} has {x} / {n} = {x // n} {item}.", x // n)


ACTIONS = [_add, _sub, _mul, _div]


def _story(rng: random.Random, steps: int, hi: int) -> dict:
    """Someone starts with some items and changes the amount `steps` times."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    x = rng.randint(2, hi)
    question = [f"{name} has {x} {item}."]
    lines = []
    for _ in range(steps):
        sentence, line, x = rng.choice(ACTIONS)(rng, name, item, x, hi)
        question.append(sentence)
        lines.append(line)
    question.append(f"How many {item} does {name} have now?")
    return _problem(question, lines, x, steps)


def _groups(rng: random.Random, steps: int, hi: int) -> dict:
    """Containers of equal size; then items added or removed."""
    name, item, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
    per, count = rng.randint(2, min(12, hi)), rng.randint(2, 9)
    x = per * count
    question = [f"{name} has {count} {box}es of {item}." if box.endswith("x")
                else f"{name} has {count} {box}s of {item}.",
                f"Each {box} holds {per} {item}."]
    lines = [f"{name} has {count} * {per} = {x} {item}."]
    for _ in range(steps - 1):
        sentence, line, x = rng.choice([_add, _sub])(rng, name, item, x, hi)
        question.append(sentence)
        lines.append(line)
    question.append(f"How many {item} does {name} have now?")
    return _problem(question, lines, x, steps)


def _compare(rng: random.Random, steps: int, hi: int) -> dict:
    """Two people; the second has more or fewer; optionally the total and a change."""
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    x = rng.randint(5, max(5, hi))
    more = rng.random() < 0.5
    n = rng.randint(1, hi) if more else rng.randint(1, x - 1)
    y = x + n if more else x - n
    question = [f"{a} has {x} {item}.",
                f"{b} has {n} {'more' if more else 'fewer'} {item} than {a}."]
    lines = [f"{b} has {x} {'+' if more else '-'} {n} = {y} {item}."]
    if steps == 1:
        question.append(f"How many {item} does {b} have?")
        return _problem(question, lines, y, steps)
    total = x + y
    lines.append(f"Together they have {x} + {y} = {total} {item}.")
    if steps == 2:
        question.append(f"How many {item} do {a} and {b} have together?")
        return _problem(question, lines, total, steps)
    k = rng.randint(1, total - 1)
    question.append(f"They give {k} {item} to their teacher.")
    lines.append(f"After giving {k} away they have {total} - {k} = {total - k} {item}.")
    question.append(f"How many {item} do {a} and {b} have left?")
    return _problem(question, lines, total - k, steps)


def _shopping(rng: random.Random, steps: int, hi: int) -> dict:
    """Prices and quantities; then change from a bill, or a second purchase."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    price, qty = rng.randint(1, 9), rng.randint(2, 9)
    cost = price * qty
    question = [f"{name} buys {qty} {item} that cost ${price} each."]
    lines = [f"The {item} cost {qty} * {price} = ${cost}."]
    answer = cost
    if steps >= 2:
        extra = rng.randint(1, hi)
        question.append(f"{name} also pays ${extra} for a bag.")
        lines.append(f"In total {name} spends {cost} + {extra} = ${cost + extra}.")
        answer = cost + extra
    if steps >= 3:
        bill = rng.choice([b for b in (20, 50, 100, 200) if b >= answer])
        question.append(f"{name} pays with a ${bill} bill.")
        lines.append(f"The change is {bill} - {answer} = ${bill - answer}.")
        answer = bill - answer
        question.append("How much change does " + name + " get?")
    else:
        question.append(f"How much does {name} spend in dollars?")
    return _problem(question, lines, answer, steps)


TEMPLATES = [_story, _groups, _compare, _shopping]


def _problem(question: list[str], lines: list[str], answer: int, steps: int) -> dict:
    return {"question": " ".join(question), "answer": "\n".join(lines) + f"\n#### {answer}",
            "steps": steps}


def make_problem(rng: random.Random, max_steps: int = 3, max_number: int = 50) -> dict:
    """One problem; `max_number` bounds the starting amounts and the numbers added or compared."""
    steps = rng.randint(1, max_steps)
    return rng.choice(TEMPLATES)(rng, steps, max(5, max_number))


def make_problems(n: int, seed: int = 0, max_steps: int = 3, max_number: int = 50) -> list[dict]:
    """`n` problems, the same for the same seed."""
    rng = random.Random(seed)
    return [make_problem(rng, max_steps, max_number) for _ in range(n)]


def make_split(n_train: int, n_eval: int, seed: int = 0, max_steps: int = 3, max_number: int = 50):
    """Train and held-out problems; no held-out question appears in the training set."""
    train = make_problems(n_train, seed, max_steps, max_number)
    seen = {p["question"] for p in train}
    rng = random.Random(seed + 1_000_003)
    held_out = []
    while len(held_out) < n_eval:
        problem = make_problem(rng, max_steps, max_number)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            held_out.append(problem)
    return train, held_out
