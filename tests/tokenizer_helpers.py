"""Small real-like tokenizers trained offline for the tokenizer/template/preflight tests.

Byte-level BPE (the GPT-2 / Llama 3 / Qwen family) via the `tokenizers` trainer, and SentencePiece
(the Llama 2 / Vicuna / InternLM2 family) with byte fallback and identity normalisation, as those
models' tokenizers are configured. Each registers the real special tokens of its family.
"""
import json
import os

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, pre_tokenizers, processors, trainers

from leo_jax.data import synthetic, templates

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Llama 3's pre-tokenizer split pattern (tokenizer.json of Meta-Llama-3-8B).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = synthetic.corpus_texts()[:400] + [
    templates.VICUNA_SYSTEM_PROMPT,
    "Describe the picture in one sentence. A photo of a cat sitting on a red sofa next to a window.",
    "Compare the two images and tell me which one has more objects. The first one, it shows four shapes.",
    "system user assistant USER: ASSISTANT: Hello! How can I help you today?",
    "Ünïcödé tëxt and 数字 42 with punctuation: (a), [b]; {c}!",
] * 3


def train_byte_level_bpe(directory, special_tokens, *, llama3_split=False, bos=None, eos=None, vocab_size=700):
    """Trains a byte-level BPE on CORPUS, writes directory/tokenizer.json (+ tokenizer_config.json naming
    bos/eos when given, as Hugging Face checkpoints do); returns the directory."""
    os.makedirs(directory, exist_ok=True)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    if llama3_split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if bos is not None:  # like Llama 3: the post-processor adds BOS (encode must not use it)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def train_sentencepiece(directory, *, user_defined_symbols=(), vocab_size=420):
    """Trains a Llama-2-style SentencePiece BPE (<unk>=0, <s>=1, </s>=2, byte fallback); returns the .model path."""
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, user_defined_symbols=list(user_defined_symbols), hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2)
    return prefix + ".model"
