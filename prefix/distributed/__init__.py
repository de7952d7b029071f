"""What the ranks decide together (``agreement``), signals (``preemption``), lost ranks (``peers``),
every wait's end (``waits``), facts about processes, Composer's corrections."""

from prefix import exports

__getattr__, __dir__ = exports(
    __name__,
    agreement=['Activity', 'POLL_S', 'PeerFailed', 'RankFailures', 'any_rank', 'any_rank_later', 'collective', 'describe',
               'from_rank_zero', 'gather', 'own_io', 'rank', 'together', 'track'],
    peers=['PeerLostError', 'PeerWatch', 'is_collective_failure', 'nccl_error_handling'],
    preemption=['PREEMPTED_EXIT_CODE', 'Preempted', 'PreemptionSignal', 'die_with_launcher'],
    process=['boot_id', 'pid_namespace', 'start_ticks', 'started_at'],
    waits=['BOUNDED_S', 'Deadline', 'Exit', 'bounded', 'minutes'],
)
