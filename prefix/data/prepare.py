"""Turn text into MDS shards with train/val splits: ``python -m prefix.data OUT SOURCE... [options]``.

SOURCE is a file, a folder (searched recursively for --extensions), a glob, or a JSONL file
whose --text-field holds one document per line. A text file is one document, or, with
``--separator``, as many as the separator cuts it into (``'\\n\\n'``: paragraphs, ``'\\n'``: lines),
so that one big file (a tinyshakespeare) has a val split. Documents are tokenized, joined with an
end-of-document token and cut into samples of ``--seq-len + 1`` tokens (inputs and shifted
targets), written with Streaming's own ``MDSWriter``. A document goes to val when a hash of its
source and position falls under ``--val-fraction``, so the split is stable across runs.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from streaming import MDSWriter

from prefix.data.tokenizer import Tokenizer, load_tokenizer
from prefix.errors import DataError, PrefixError

META_FILE = 'prefix_dataset.json'


def expand_sources(sources: list[str], extensions: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``(key, file)`` for every file named by paths, folders and globs, sorted for reproducibility.

    The key (the name inside a folder source, else the file name) decides the split, so the
    split does not depend on where the text lies on this machine.
    """
    files: dict[Path, str] = {}
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files.update((p, str(p.relative_to(path))) for p in path.rglob('*') if p.is_file() and p.suffix in extensions)
        elif path.is_file():
            files[path] = path.name
        else:
            matches = [Path(p) for p in glob.glob(source, recursive=True)]
            if not matches:
                raise DataError(f'source {source!r} is not a file or folder and matches no file')
            files.update((p, p.name) for p in matches if p.is_file())
    if not files:
        raise DataError(f'no input files with suffix {", ".join(extensions)} found in {" ".join(sources)}')
    return sorted((key, path) for path, key in files.items())


def iter_documents(files: list[tuple[str, Path]], text_field: str, separator: str | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(document key, text)``: a JSONL file's lines, a text file whole or cut at ``separator`` (blank pieces left out)."""
    for key, path in files:
        try:
            if path.suffix == '.jsonl':
                with path.open(encoding='utf-8', errors='replace') as f:
                    for lineno, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            text = json.loads(line)[text_field]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise DataError(f'{path}:{lineno}: not a JSON object with a {text_field!r} field') from None
                        yield f'{key}:{lineno}', str(text)
            elif separator is None:
                yield key, path.read_text(encoding='utf-8', errors='replace')
            else:
                pieces = path.read_text(encoding='utf-8', errors='replace').split(separator)
                yield from ((f'{key}#{i}', piece) for i, piece in enumerate(pieces) if piece.strip())
        except OSError as e:
            raise DataError(f'cannot read {path}: {e.strerror}') from None


def is_val(key: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], 'big') / 2**64 < val_fraction


class _Packer:
    """Concatenate token streams and emit fixed-length samples to one MDS writer."""

    def __init__(self, writer: MDSWriter, sample_len: int, dtype: type) -> None:
        self.writer, self.sample_len, self.dtype = writer, sample_len, dtype
        self.buffer: list[int] = []
        self.samples = 0

    def add(self, tokens: list[int]) -> None:
        self.buffer.extend(tokens)
        while len(self.buffer) >= self.sample_len:
            sample, self.buffer = self.buffer[:self.sample_len], self.buffer[self.sample_len:]
            self.writer.write({'input_ids': np.asarray(sample, dtype=self.dtype)})
            self.samples += 1


def prepare(
    out: Path,
    sources: list[str],
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    val_fraction: float,
    text_field: str = 'text',
    extensions: tuple[str, ...] = ('.txt', '.md', '.py', '.rst', '.jsonl'),
    shard_size: str = '8mb',
    overwrite: bool = False,
    separator: str | None = None,
) -> dict:
    """Write ``out/train`` and ``out/val``; built in a temporary folder and renamed into place.

    A failure leaves ``out`` as it was and no temporary folder behind.
    """
    if out.exists() and not overwrite:
        raise DataError(f'{out} already exists; pass --overwrite to replace it')
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f'--val-fraction must be between 0 and 1, got {val_fraction}')
    if seq_len < 1:
        raise DataError(f'--seq-len must be at least 1 token, got {seq_len}')
    if separator == '':
        raise DataError('--separator must not be empty')
    files = expand_sources(sources, extensions)
    tmp = out.with_name(out.name + '.tmp')
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = _write(tmp, files, tokenizer, seq_len, val_fraction, text_field, shard_size, separator)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        raise DataError(f'cannot write the dataset to {out}: {e.strerror} ({e.filename}); choose a folder you can '
                        'write to') from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _write(tmp: Path, files: list[tuple[str, Path]], tokenizer: Tokenizer, seq_len: int, val_fraction: float,
           text_field: str, shard_size: str, separator: str | None) -> dict:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    column = f'ndarray:{np.dtype(dtype).name}:{seq_len + 1}'
    docs = {'train': 0, 'val': 0}
    with MDSWriter(out=str(tmp / 'train'), columns={'input_ids': column}, size_limit=shard_size) as train_w, \
            MDSWriter(out=str(tmp / 'val'), columns={'input_ids': column}, size_limit=shard_size) as val_w:
        packers = {'train': _Packer(train_w, seq_len + 1, dtype), 'val': _Packer(val_w, seq_len + 1, dtype)}
        for key, text in iter_documents(files, text_field, separator):
            split = 'val' if is_val(key, val_fraction) else 'train'
            packers[split].add(tokenizer.encode(text) + [tokenizer.eos_id])
            docs[split] += 1
    counts = {split: packer.samples for split, packer in packers.items()}
    for split, n in counts.items():
        if n == 0:
            hint = (" or cut each file into documents with --separator '\\n\\n' (paragraphs) or '\\n' (lines)"
                    if separator is None and not any(path.suffix == '.jsonl' for _, path in files) else '')
            raise DataError(f'the {split} split would be empty ({docs[split]} of {sum(docs.values())} documents): add text, '
                            f'change --val-fraction{hint}')
    meta = {
        'tokenizer': tokenizer.name, 'vocab_size': tokenizer.vocab_size, 'seq_len': seq_len,
        'files': len(files), 'documents': docs, 'samples': counts,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + '\n')
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m prefix.data', description=__doc__.split('\n')[0])
    parser.add_argument('out', type=Path, help='output folder (gets train/ and val/)')
    parser.add_argument('sources', nargs='+', help='files, folders, globs or JSONL files')
    parser.add_argument('--tokenizer', default='byte', help="'byte' (default), or a Hugging Face tokenizer: a local "
                        "folder (an hf_causal_lm model's) or a name in the local cache")
    parser.add_argument('--seq-len', type=int, default=128, help='tokens per sample fed to the model (default 128)')
    parser.add_argument('--val-fraction', type=float, default=0.05, help='share of documents for val (default 0.05)')
    parser.add_argument('--text-field', default='text', help="JSONL field with the text (default 'text')")
    parser.add_argument('--extensions', default='.txt,.md,.py,.rst,.jsonl', help='file suffixes taken from folders')
    parser.add_argument('--separator', help="cut text files into documents where this occurs: '\\n\\n' for "
                        "paragraphs, '\\n' for lines (\\n and \\t are newline and tab); default: a file is a document")
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    args = parser.parse_args(argv)
    separator = args.separator.replace('\\n', '\n').replace('\\t', '\t') if args.separator is not None else None
    try:
        meta = prepare(
            args.out, args.sources, tokenizer=load_tokenizer(args.tokenizer), seq_len=args.seq_len,
            val_fraction=args.val_fraction, text_field=args.text_field,
            extensions=tuple(args.extensions.split(',')), overwrite=args.overwrite, separator=separator,
        )
    except PrefixError as e:
        return e.report()
    print(f"wrote {args.out}: {meta['samples']['train']} train and {meta['samples']['val']} val samples "
          f"of {args.seq_len + 1} tokens from {meta['files']} files ({meta['tokenizer']} tokenizer)")
    return 0

