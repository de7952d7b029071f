import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from streaming import StreamingDataset

from prefix.data.loader import streaming_registration
from prefix.data.prepare import DataError, is_val, prepare
from prefix.data.prepare import main as data_main
from prefix.data.tokenizer import ByteTokenizer

TEXT = 'def f(x):\n    return x + 1\n' * 40


def read_split(out: Path, split: str) -> list[np.ndarray]:
    # Registered as prefix registers every StreamingDataset: under the machine-wide lock. Streaming picks the
    # first free shared-memory prefix (/dev/shm/<n>_locals, ...) and then creates it; a process that does
    # both unlocked races any other one doing the same (the other xdist worker, a trainer): both pick n,
    # and the second to create it fails with FileExistsError.
    with streaming_registration():
        ds = StreamingDataset(local=str(out), split=split, shuffle=False, batch_size=1)
    return [ds[i]['input_ids'] for i in range(len(ds))]


def make_docs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f'doc{i:03d}.txt'
        path.write_text(f'# document {i}\n' + TEXT)
        paths.append(path)
    return paths


def test_folder_source_packs_fixed_length_samples_with_eos(tmp_path: Path) -> None:
    make_docs(tmp_path / 'src', 40)
    meta = prepare(tmp_path / 'out', [str(tmp_path / 'src')], tokenizer=ByteTokenizer(), seq_len=32, val_fraction=0.2)
    train, val = read_split(tmp_path / 'out', 'train'), read_split(tmp_path / 'out', 'val')
    assert len(train) == meta['samples']['train'] > 0 and len(val) == meta['samples']['val'] > 0
    assert all(s.shape == (33,) and s.dtype == np.uint16 for s in train + val)
    tokens = np.concatenate(train)
    assert (tokens == ByteTokenizer.eos_id).sum() > 0
    assert bytes(tokens[tokens < 256].astype(np.uint8)[:11]) == b'# document '
    assert json.loads((tmp_path / 'out' / 'prefix_dataset.json').read_text())['documents']['train'] + \
        meta['documents']['val'] == 40


def test_split_is_stable_and_independent_of_location(tmp_path: Path) -> None:
    for where in ('a', 'b'):
        make_docs(tmp_path / where, 30)
        prepare(tmp_path / f'out-{where}', [str(tmp_path / where)], tokenizer=ByteTokenizer(), seq_len=16, val_fraction=0.3)
    for split in ('train', 'val'):
        a, b = read_split(tmp_path / 'out-a', split), read_split(tmp_path / 'out-b', split)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert is_val('doc001.txt', 0.3) == is_val('doc001.txt', 0.3)


def test_globs_files_and_jsonl(tmp_path: Path) -> None:
    paths = make_docs(tmp_path / 'src', 10)
    jsonl = tmp_path / 'corpus.jsonl'
    jsonl.write_text('\n'.join(json.dumps({'text': f'record {i} ' + TEXT, 'id': i}) for i in range(30)) + '\n')
    meta = prepare(tmp_path / 'out', [str(tmp_path / 'src' / 'doc00*.txt'), str(paths[-1]), str(jsonl)],
                   tokenizer=ByteTokenizer(), seq_len=32, val_fraction=0.2)
    assert meta['files'] == 10 + 1 and meta['documents']['train'] + meta['documents']['val'] == 10 + 30


@pytest.mark.parametrize(('setup', 'message'), [
    (lambda p: [str(p / 'missing.txt')], 'matches no file'),
    (lambda p: [str(p / 'empty')], 'no input files'),
    (lambda p: [str(p / 'bad.jsonl')], "not a JSON object with a 'text' field"),
])
def test_bad_sources(tmp_path: Path, setup, message: str) -> None:
    (tmp_path / 'bad.jsonl').write_text('{"body": "x"}\n')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match=message):
        prepare(tmp_path / 'out', setup(tmp_path), tokenizer=ByteTokenizer(), seq_len=16, val_fraction=0.2)
    assert not (tmp_path / 'out').exists()


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    make_docs(tmp_path / 'src', 30)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    with pytest.raises(DataError, match='already exists'):
        prepare(out, [str(tmp_path / 'src')], tokenizer=ByteTokenizer(), seq_len=16, val_fraction=0.2)
    assert (out / 'keep.txt').read_text() == 'mine'
    prepare(out, [str(tmp_path / 'src')], tokenizer=ByteTokenizer(), seq_len=16, val_fraction=0.2, overwrite=True)
    assert not (out / 'keep.txt').exists() and (out / 'train' / 'index.json').exists()


def test_empty_val_split_is_refused(tmp_path: Path) -> None:
    make_docs(tmp_path / 'src', 1)
    with pytest.raises(DataError, match='split would be empty'):
        prepare(tmp_path / 'out', [str(tmp_path / 'src')], tokenizer=ByteTokenizer(), seq_len=16, val_fraction=0.01)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_docs(tmp_path / 'src', 30)
    assert data_main([str(tmp_path / 'new'), str(tmp_path / 'src'), '--seq-len', '16']) == 0
    assert 'train and' in capsys.readouterr().out
    (tmp_path / 'out').mkdir()
    again = subprocess.run([sys.executable, '-m', 'prefix', 'prepare', str(tmp_path / 'out'), str(tmp_path / 'src')],
                           capture_output=True, text=True)
    assert again.returncode == 1 and again.stderr.strip().endswith('pass --overwrite to replace it')


def test_a_hugging_face_tokenizer_from_a_local_folder(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from prefix.data.tokenizer import load_tokenizer

    vocab = {'[UNK]': 0, '<eos>': 1, 'def': 2, 'f': 3, 'return': 4, 'x': 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token='[UNK]', eos_token='<eos>').save_pretrained(tmp_path / 'tok')
    tokenizer = load_tokenizer(str(tmp_path / 'tok'))
    assert tokenizer.vocab_size == 6 and tokenizer.eos_id == 1 and tokenizer.encode('def f x') == [2, 3, 5]
    make_docs(tmp_path / 'src', 30)
    meta = prepare(tmp_path / 'out', [str(tmp_path / 'src')], tokenizer=tokenizer, seq_len=8, val_fraction=0.2)
    assert meta['tokenizer'] == str(tmp_path / 'tok') and meta['vocab_size'] == 6
    assert max(int(s.max()) for s in read_split(tmp_path / 'out', 'train')) < 6


def test_a_tokenizer_that_is_not_on_disk_is_a_clear_error() -> None:
    from prefix.data.tokenizer import load_tokenizer

    with pytest.raises(DataError, match='is not available locally'):
        load_tokenizer('no-such-org/no-such-tokenizer')


def test_one_big_file_is_cut_into_documents_so_that_a_val_split_exists(tmp_path: Path) -> None:
    """A tinyshakespeare: one file, paragraphs apart. Whole, it is one document and val would be empty."""
    corpus = tmp_path / 'input.txt'
    corpus.write_text('\n\n'.join(f'SPEAKER {i}:\n' + 'To be, or not to be.\n' * 3 for i in range(200)) + '\n\n\n')
    with pytest.raises(DataError, match=r"split would be empty \(\d of 1 documents\).*--separator '\\n\\n' \(paragraphs\)"):
        prepare(tmp_path / 'whole', [str(corpus)], tokenizer=ByteTokenizer(), seq_len=16, val_fraction=0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['input.txt'], 'no output, no temporary folder'
    meta = prepare(tmp_path / 'paragraphs', [str(corpus)], tokenizer=ByteTokenizer(), seq_len=16, val_fraction=0.1,
                   separator='\n\n')
    assert sum(meta['documents'].values()) == 200 and meta['documents']['val'] > 0 and meta['samples']['val'] > 0
    again = prepare(tmp_path / 'again', [str(corpus)], tokenizer=ByteTokenizer(), seq_len=16, val_fraction=0.1,
                    separator='\n\n')
    assert again['documents'] == meta['documents'], 'the split is stable'
    assert data_main([str(tmp_path / 'lines'), str(corpus), '--seq-len', '16', '--separator', '\\n']) == 0
    lines = json.loads((tmp_path / 'lines' / 'prefix_dataset.json').read_text())['documents']
    assert sum(lines.values()) == 200 * 4


def prefix_data(*args: str, cwd: Path | None = None, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(wrap or []), sys.executable, '-m', 'prefix.data', *args], capture_output=True, text=True,
                          cwd=cwd)


READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'


@pytest.mark.parametrize('case, message', [
    ('seq-len 0', '--seq-len must be at least 1 token, got 0'),
    ('missing tokenizer', "tokenizer '/nonexistent/tokenizer' is not available locally"),
    ('read-only folder', 'cannot write the dataset to'),
])
def test_bad_preparations_are_one_line_and_leave_nothing(tmp_path: Path, case: str, message: str) -> None:
    import os
    import shutil

    make_docs(tmp_path / 'src', 30)
    (tmp_path / 'ro').mkdir()
    args = [str(tmp_path / 'ro' / 'out'), str(tmp_path / 'src'), '--seq-len', '16']
    wrap = None
    if case == 'seq-len 0':
        args[-1] = '0'
    elif case == 'missing tokenizer':
        args += ['--tokenizer', '/nonexistent/tokenizer']
    else:
        if os.geteuid() != 0 or shutil.which('unshare') is None:
            pytest.skip('a read-only mount needs root and unshare')
        wrap = ['unshare', '--mount', 'sh', '-c', READ_ONLY, 'sh', str(tmp_path / 'ro')]
    result = prefix_data(*args, wrap=wrap)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert list((tmp_path / 'ro').iterdir()) == []
