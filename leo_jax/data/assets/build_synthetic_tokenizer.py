"""Builds the byte-level BPE tokenizer shipped for the synthetic data set, deterministically.

    python -m leo_jax.data.assets.build_synthetic_tokenizer [--out PATH]

The vocabulary is the 256 byte symbols plus whole-word merges for every word the synthetic generator
and the conversation templates can write, so each such word is one token and any other text still
encodes (byte fallback). Special tokens cover ChatML, Llama 3, BOS/EOS/pad and the image tokens, so
every template in leo_jax.data.templates works with it. BPE merges are learned here (most frequent
pair, ties broken by the pair's text) rather than by the `tokenizers` trainer, whose tie-breaking is
not guaranteed stable across runs or versions: the same code always writes the same file.
"""
from __future__ import annotations

import argparse
import collections

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from leo_jax.data import synthetic, templates
from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH

SPECIAL_TOKENS = (
    "<pad>", "<s>", "</s>",
    "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    templates.IMG_START, templates.IMG_END, templates.IMG_CONTEXT,
)


def _corpus_words() -> list[str]:
    """Pre-tokenized words (byte-level alphabet) of everything the synthetic set and templates write,
    each alphabetic word both with and without its leading space, sorted."""
    texts = synthetic.corpus_texts() + [
        "system", "user", "assistant", "USER:", " ASSISTANT:", templates.VICUNA_SYSTEM_PROMPT, "\n", "\n\n"]
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = set()
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            words.add(word)
            stripped = word[1:] if word.startswith("Ġ") else word
            if stripped.isalpha():
                words.update({stripped, "Ġ" + stripped})
    return sorted(words)


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Classic BPE on the word list until every word is one symbol; deterministic tie-breaking."""
    segmented = [list(w) for w in words]
    merges = []
    while True:
        pairs = collections.Counter()
        for symbols in segmented:
            pairs.update(zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for i, symbols in enumerate(segmented):
            merged, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    merged.append(symbols[j] + symbols[j + 1])
                    j += 2
                else:
                    merged.append(symbols[j])
                    j += 1
            segmented[i] = merged


def build_synthetic_tokenizer() -> tokenizers.Tokenizer:
    """The shipped tokenizer: special tokens first (ids 0..), then bytes, then merged words."""
    merges = _learn_merges(_corpus_words())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=SYNTHETIC_TOKENIZER_PATH, help="output tokenizer.json path")
    args = parser.parse_args(argv)
    tokenizer = build_synthetic_tokenizer()
    tokenizer.save(args.out)
    print(f"wrote {args.out} ({tokenizer.get_vocab_size(with_added_tokens=True)} tokens)")


if __name__ == "__main__":
    main()
