"""A bounded chaos run: random kills by SIGKILL and SIGTERM, 1 and 2 ranks (the soak variant: docs/failures.md)."""

from pathlib import Path

import pytest
from conftest import REPO, two_epochs

from prefix.chaos import main as chaos

pytestmark = pytest.mark.slow


def test_chaos_one_rank(tmp_path: Path, dataset: Path, reference, capsys: pytest.CaptureFixture) -> None:
    config = str(REPO / 'yamls' / 'smoke.yaml')
    code = chaos([config, two_epochs(dataset), '--data', str(dataset), '--kills', '3', '--startup', '8', '--max-steps', '12',
                  '--work', str(tmp_path), '--reference', str(reference(0, two_epochs(dataset)))])
    out = capsys.readouterr()
    print(out.out, out.err)
    assert code == 0, out.err


def test_chaos_two_ranks_with_dataloader_workers(tmp_path: Path, dataset: Path, reference, capsys: pytest.CaptureFixture) -> None:
    config = str(REPO / 'yamls' / 'smoke.yaml')
    code = chaos([config, 'max_duration=24ba', 'data.num_workers=1', 'checkpoint.interval=1s', '--data', str(dataset),
                  '--nproc', '2', '--kills', '2', '--startup', '15',
                  '--max-steps', '8', '--work', str(tmp_path), '--reference', str(reference(2, 'max_duration=24ba'))])
    out = capsys.readouterr()
    print(out.out, out.err)
    assert code == 0, out.err
