"""The run directory and everything in it: its paths, lock, journal, meta, logs, and the read-only views of runs."""

from prefix import exports

__getattr__, __dir__ = exports(
    __name__,
    rundir=['RunDir'],
    runlock=['LockIOError', 'LockLostError', 'RunLock'],
    journal=['Journal', 'record_checkpoint', 'record_failed_setup'],
    meta=['gpu_names', 'write_snapshots'],
    logs=['MetricsLogger'],
    tee=['tee_output'],
    console=['ConsoleLine'],
    runinfo=['LOSS', 'previous_start', 'start_count', 'start_steps'],
)
