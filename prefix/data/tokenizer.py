"""Tokenizers: the embedded byte-level default, or a Hugging Face tokenizer already on disk."""

from __future__ import annotations

from typing import Protocol

from prefix.errors import DataError


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255 and 256 as end-of-document: nothing to download."""

    name = 'byte'
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode('utf-8'))


class HFTokenizer:
    """A Hugging Face tokenizer loaded from the local cache only (clusters and CI have no hub)."""

    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError(f'tokenizer {name!r} needs the transformers package: pip install transformers') from None
        try:
            self._tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):  # ValueError: a path that is no folder is taken for a malformed hub name
            raise DataError(f'tokenizer {name!r} is not available locally (a tokenizer folder, or a name in the local '
                            'cache); download it first or use --tokenizer byte') from None
        self.name = name
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        self.eos_id = eos if eos is not None else self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)


def load_tokenizer(name: str) -> Tokenizer:
    return ByteTokenizer() if name == 'byte' else HFTokenizer(name)
