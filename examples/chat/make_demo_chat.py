"""Writes examples/chat/demo_chat.jsonl: 480 short conversations in OpenAI's `messages` form, written for this
repository (deterministic, seed 0), small enough to fine-tune the tiny demo model on a CPU in minutes:
additions, comparisons, reversed words and counting letters, each with a fixed answer phrasing, some with a
system turn, some with two exchanges.

    python examples/chat/make_demo_chat.py            # (re)writes demo_chat.jsonl beside this file
"""
import json
import os
import random

WORDS = ["cat", "tree", "house", "river", "stone", "light", "garden", "window", "paper", "music", "orange",
         "planet", "bridge", "cloud", "table", "letter", "summer", "forest", "silver", "market"]


def exchange(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        a, b = rng.sample(range(1, 100), 2)
        return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}."
    w = rng.choice(WORDS)
    if kind == 2:
        return f"Spell the word {w} backwards.", f"The word {w} backwards is {w[::-1]}."
    return f"How many letters are in the word {w}?", f"The word {w} has {len(w)} letters."


def conversation(rng: random.Random) -> dict:
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": "You are a careful assistant. Answer in one sentence."})
    for _ in range(1 if rng.random() < 0.7 else 2):
        q, a = exchange(rng)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def main():
    rng = random.Random(0)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_chat.jsonl")
    with open(path, "w") as f:
        for _ in range(480):
            f.write(json.dumps(conversation(rng)) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
