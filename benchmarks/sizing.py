"""What a checkpoint needs at a model's size: the formulas behind the table in docs/checkpoints.md, checked by ``make bench``.

    .venv/bin/python benchmarks/sizing.py      # prints the table of docs/checkpoints.md

A parameter in fp32 with AdamW's two moments is 12 bytes of checkpoint (4 + 8); everything else in a
checkpoint (the schedule, the data position, RNG states) is kilobytes. ``checkpoint_bench.py``
measures these quantities on small models and prints them next to these formulas.
"""

from __future__ import annotations

from prefix.checkpoint.checkpoint import write_timeout_s

BYTES_PER_PARAMETER = 12  # fp32 weight + AdamW's exp_avg and exp_avg_sq


def checkpoint_bytes(params: float) -> float:
    return BYTES_PER_PARAMETER * params


def written_per_rank(params: float, ranks: int, sharded: bool) -> float:
    """Sharded: every rank its 1/ranks; full: rank 0 all of it (the others their RNG states only)."""
    return checkpoint_bytes(params) / ranks if sharded else checkpoint_bytes(params)


def host_memory_at_save(params: float, ranks: int, sharded: bool, fsdp: bool = True) -> float:
    """Peak. A save copies what the rank writes into one exact-size slab of host memory (kept for the next
    save when asynchronous); a full checkpoint under FSDP is first gathered whole on rank 0's host, then copied."""
    kept = written_per_rank(params, ranks, sharded)
    return 2 * kept if fsdp and not sharded else kept


def host_memory_at_resume(params: float, ranks: int, ranks_per_node: int, sharded: bool) -> float:
    """Per rank. Full: the node's ranks map one copy from the page cache (this is its share); sharded: each
    rank loads its pieces through one copy of its shards (measured: about 1.25 copies at 57 M parameters)."""
    return checkpoint_bytes(params) / ranks if sharded else checkpoint_bytes(params) / ranks_per_node


def write_seconds(params: float, bandwidth: float) -> float:
    """The whole checkpoint through the volume's bandwidth (shared by every writer)."""
    return checkpoint_bytes(params) / bandwidth


def preemption_seconds(step_seconds: float, write: float) -> float:
    """SIGTERM to exit: finish the step and, with several ranks, the next (the ranks agree on the signal while a step
    computes), stop the write in flight (within a chunk), write the final checkpoint."""
    return 2 * step_seconds + write


def grace_seconds(params: float, bandwidth: float, step_seconds: float) -> float:
    """The least grace period: SIGTERM to exit at the volume's usual bandwidth."""
    return preemption_seconds(step_seconds, write_seconds(params, bandwidth))


def write_timeout_seconds(params: float) -> float:
    """``checkpoint.write_timeout``'s default, prefix's own formula."""
    return write_timeout_s(None, checkpoint_bytes(params))


def table(models: tuple[tuple[str, float, int, int], ...] = (('1B', 1e9, 8, 8), ('7B', 7e9, 8, 8),
                                                                ('70B', 70e9, 64, 8)),
          step_seconds: float = 10.0) -> str:
    gb = 1e9
    rows = ['| model | ranks | format | checkpoint | written per rank | host memory per rank: save (peak) | resume '
            '| write at 300 MB/s | at 2 GB/s | grace period at 300 MB/s | write_timeout (default) |',
            '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for name, params, ranks, per_node in models:
        for sharded in (True, False):
            resume = f'{host_memory_at_resume(params, ranks, per_node, sharded) / gb:.1f} GB{"" if sharded else " (shared)"}'
            rows.append(
                f'| {name} | {ranks} | {"sharded" if sharded else "full"} | {checkpoint_bytes(params) / gb:.0f} GB '
                f'| {written_per_rank(params, ranks, sharded) / gb:.1f} GB{"" if sharded else " (rank 0)"} '
                f'| {host_memory_at_save(params, ranks, sharded) / gb:.1f} GB{"" if sharded else " (rank 0)"} '
                f'| {resume} '
                f'| {write_seconds(params, 300e6) / 60:.1f} min | {write_seconds(params, 2e9) / 60:.1f} min '
                f'| {grace_seconds(params, 300e6, step_seconds) / 60:.0f} min '
                f'| {write_timeout_seconds(params) / 60:.0f} min |')
    return '\n'.join(rows)


if __name__ == '__main__':
    print(table())
