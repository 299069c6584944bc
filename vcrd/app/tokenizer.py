"""A character-level tokenizer built locally (no hub download), for the built-in task and tests.

Every printable ASCII character and newline is one token; ``<pad>``, ``<bos>``, ``<eos>`` and
``<unk>`` are special. It is a real ``PreTrainedTokenizerFast``: it saves with
``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained`` from a local folder.
"""

from __future__ import annotations

import string

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = "\n" + "".join(c for c in string.printable if c not in "\r\x0b\x0c\t\n")


def build_char_tokenizer(alphabet: str = ALPHABET):
    """A ``PreTrainedTokenizerFast`` with one id per character of ``alphabet`` (after the specials)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(alphabet)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")
