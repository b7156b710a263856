"""The passkey retrieval prompt as runtime/passkey.cpp builds it (Mohtashami & Jaggi 2023, as
Yuan et al. 2024 run it), for training a model that retrieves (scripts/train_default.py
--passkey). No dependencies: the construction only."""
import random
import re

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n")
QUESTION = "\nWhat is the pass key? The pass key is "


def words(docs):
    """Each word with the whitespace after it; a document's last word ends with a space."""
    out = []
    for d in docs:
        ws = re.findall(r"\S+\s*", d)
        if ws and not ws[-1][-1].isspace():
            ws[-1] += " "
        out += ws
    return out


def prompt(ws, n, depth, key):
    """Background words ws[:n] with the key sentence at word int(n * depth)."""
    at = int(n * depth)
    target = f"The pass key is {key}. Remember it. {key} is the pass key."
    before, after = "".join(ws[:at]).rstrip(), "".join(ws[at:n]).rstrip()
    content = (before + " " if before else "") + target + (" " + after if after else "")
    return INSTRUCTION + content + QUESTION


def example(ws, rng, max_words, digits=7):
    """A random prompt (background from a random place, random length and depth) and its key."""
    key = "".join(rng.choice("0123456789") for _ in range(digits))
    n = rng.randint(0, max_words)
    start = rng.randrange(0, max(1, len(ws) - n))
    return prompt(ws[start:start + n], n, rng.random(), key), key


if __name__ == "__main__":  # a look at one example
    print(example(words(["The quick brown fox jumps over the lazy dog. " * 20]), random.Random(0), 30)[0])
