"""Files a kill cannot tear: atomic replacement (``atomic``) and JSON lines (``jsonl``)."""

from prefix import exports

__getattr__, __dir__ = exports(
    __name__,
    atomic=['CheckedWriter', 'TMP_SUFFIX', 'WRITER', 'atomic_write', 'atomic_write_text', 'commit', 'fsync_dir',
            'link_temp', 'tag_of', 'temp_path', 'write_temp'],
)
