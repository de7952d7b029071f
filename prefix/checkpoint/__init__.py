"""The checkpoint: when it is written (``checkpointer``), its files and resume (``checkpoint``), host snapshots,
the writer thread, and sharded models' shards."""

from prefix import exports

__getattr__, __dir__ = exports(
    __name__,
    checkpoint=['CheckpointError', 'LATEST', 'MIN_WRITE_TIMEOUT_S', 'ResumePoint', 'adopt_rescue', 'find_resume_point',
                'global_file', 'is_complete', 'referenced_shards', 'remove_leftovers', 'safe_load'],
    checkpointer=['Checkpointer', 'never'],
    shards=['checkpoint_group', 'read_whole'],
)
