"""Fault injection for the tests, loaded by every Python process whose ``PYTHONPATH`` holds this folder.

The tests simulate the cluster's world here (slow or failing disks, a process held at a chosen
moment), and the benchmarks observe the trainer from outside (``record``), so that prefix's own
code has no test or timing hooks. ``PREFIX_TEST_FAULTS`` holds a JSON list of
rules; with it unset this module does nothing. A rule:

- ``op``: ``fsync`` | ``open`` | ``link`` | ``replace`` (the path is the file's), ``list`` (``os.listdir`` and
  ``os.scandir`` of a folder: its path, matched as the folder's own files are), ``write`` (each ``os.write``
  to a file of that name: a volume that stops answering mid-file; only ``os.write`` is watched, and only in a
  process with such a rule), ``step`` (before
  Composer runs ``event`` at the batch count ``step``, or every time without ``step``), ``call`` (``target`` is
  ``module:qualname``, patched right after the module is imported; ``when`` is ``before`` or ``after``),
  ``set`` (``target`` is ``module:NAME``, set to ``value`` right after the module is imported: short
  timeouts), or ``gpu_threads``: ``torch.cuda.is_available()`` and ``device_count()`` say a GPU is there on every
  thread but the main one, so a background thread that would use CUDA on a GPU host fails here;
- ``path``: an ``fnmatch`` pattern for the file's name; ``under``: only files under that folder (a whole volume);
  ``mode``: ``write`` (default), ``read`` or ``any``, for ``open``;
- ``rank``: only in the process of that global rank (``RANK``, 0 without a launcher);
- ``after``: only once that file exists (another rule's marker: a volume that freezes from a given moment);
- ``skip``: let that many matches pass first; ``times``: act that many times at most (default: always);
- what it does, in this order: ``record`` (append a JSON line to that file: the rank, the rule's
  ``event``, ``target`` or path, the batch count, and when it happened; a ``call``'s line is written
  after it returns, with ``start`` and ``end``), ``marker`` (create that file, with a line per hit: the test waits
  for it), ``sleep`` (seconds: a slow volume), ``block`` (wait
  until the file ``release`` exists, forever without one), ``error`` (raise ``OSError`` of that errno
  name, or an exception class name of ``builtins`` such as ``MemoryError``).
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import importlib.abc
import importlib.util
import io
import json
import os
import sys
import threading
import time

RULES = json.loads(os.environ.get('PREFIX_TEST_FAULTS') or '[]')
_hits = [0] * len(RULES)


def _rank() -> int:
    return int(os.environ.get('RANK', '0'))


def _record(index: int, what: str, start: float, step: int | None = None) -> None:
    line = {'rank': _rank(), 'what': what, 'step': step, 'start': start, 'end': time.time()}
    with builtins_open(RULES[index]['record'], 'a') as f:
        f.write(json.dumps(line) + '\n')


def _act(index: int, path: str = '', step: int | None = None) -> None:
    rule = RULES[index]
    if 'after' in rule and not os.path.exists(rule['after']):
        return
    _hits[index] += 1
    if _hits[index] <= rule.get('skip', 0):
        return
    if 'times' in rule and _hits[index] > rule.get('skip', 0) + rule['times']:
        return
    if 'record' in rule and rule['op'] != 'call':
        _record(index, rule.get('event', path), time.time(), step)
    if 'marker' in rule:
        with builtins_open(rule['marker'], 'a') as f:
            f.write(f'{os.getpid()} {path}\n')
    if 'sleep' in rule:
        time.sleep(rule['sleep'])
    if rule.get('block'):
        release = rule.get('release')
        while not (release and os.path.exists(release)):
            time.sleep(0.05)
    if 'error' in rule:
        name = rule['error']
        if hasattr(errno, name):
            code = getattr(errno, name)
            raise OSError(code, os.strerror(code), path or None)
        raise getattr(builtins, name)(f'injected {name}')


def _applies(index: int) -> bool:
    return RULES[index].get('rank', _rank()) == _rank()


def _matching(op: str, path: str) -> list[int]:
    return [i for i, r in enumerate(RULES) if r['op'] == op and _applies(i)
            and fnmatch.fnmatch(os.path.basename(path), r.get('path', '*'))
            and (not r.get('under') or os.path.abspath(path).startswith(r['under'].rstrip('/') + '/'))]


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f'/proc/self/fd/{fd}')
    except OSError:
        return ''


builtins_open = builtins.open
_originals = {'fsync': os.fsync, 'link': os.link, 'replace': os.replace, 'write': os.write, 'listdir': os.listdir,
              'scandir': os.scandir}


def _fsync(fd: int) -> None:
    path = _fd_path(fd if isinstance(fd, int) else fd.fileno())
    for index in _matching('fsync', path):
        _act(index, path)
    _originals['fsync'](fd)


def _link(src, dst, *args, **kwargs) -> None:
    for index in _matching('link', os.fspath(dst)):
        _act(index, os.fspath(dst))
    _originals['link'](src, dst, *args, **kwargs)


def _replace(src, dst, *args, **kwargs) -> None:
    for index in _matching('replace', os.fspath(dst)):
        _act(index, os.fspath(dst))
    _originals['replace'](src, dst, *args, **kwargs)


def _write(fd: int, data) -> int:
    path = _fd_path(fd)
    for index in _matching('write', path):
        _act(index, path)
    return _originals['write'](fd, data)


def _listdir(path='.'):
    for index in _matching('list', os.path.join(os.fspath(path), '')) if not isinstance(path, int) else []:
        _act(index, os.fspath(path))
    return _originals['listdir'](path)


def _scandir(path='.'):
    for index in _matching('list', os.path.join(os.fspath(path), '')) if not isinstance(path, int) else []:
        _act(index, os.fspath(path))
    return _originals['scandir'](path)


def _open(file, mode='r', *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)):
        writing = any(c in mode for c in 'wax+')
        for index in _matching('open', os.fsdecode(file)):
            if RULES[index].get('mode', 'write') in ('any', 'write' if writing else 'read'):
                _act(index, os.fsdecode(file))
    return builtins_open(file, mode, *args, **kwargs)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Run ``patch(module)`` for the modules named in ``patches`` as soon as they have been executed."""

    def __init__(self, patches: dict[str, list]) -> None:
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:
            exec_module(module)
            for patch in self.patches[name]:
                patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _wrap_call(index: int, qualname: str):
    """A patch that makes the function at ``qualname`` act on rule ``index`` before or after it runs."""
    def patch(module) -> None:
        *owners, attr = qualname.split('.')
        owner = module
        for part in owners:
            owner = getattr(owner, part)
        original = getattr(owner, attr)
        when = RULES[index].get('when', 'before')

        def wrapper(*args, **kwargs):
            start = time.time()
            if when == 'before' and _applies(index):
                _act(index)
            result = original(*args, **kwargs)
            if when == 'after' and _applies(index):
                _act(index)
            if 'record' in RULES[index] and _applies(index):
                _record(index, RULES[index]['target'], start)
            return result

        setattr(owner, attr, wrapper)
    return patch


def _wrap_event(index: int):
    """A patch of Composer's Engine that acts on rule ``index`` before ``event`` runs at batch count ``step`` (any
    without one)."""
    def patch(module) -> None:
        original = module.Engine.run_event
        rule = RULES[index]

        def run_event(self, event, *args, **kwargs):
            if _applies(index) and str(getattr(event, 'value', event)) == rule.get('event', 'batch_checkpoint'):
                step = int(self.state.timestamp.batch)
                if rule.get('step', step) == step:
                    _act(index, step=step)
            return original(self, event, *args, **kwargs)

        module.Engine.run_event = run_event
    return patch


def _gpu_on_threads(module) -> None:
    """Off the main thread ``torch.cuda`` says a GPU is there (``is_available``, ``device_count``): any CUDA
    call there then raises on this CPU-only torch."""
    available, count = module.is_available, module.device_count
    module.is_available = lambda: threading.current_thread() is not threading.main_thread() or available()
    module.device_count = lambda: 1 if threading.current_thread() is not threading.main_thread() else count()


if RULES:
    os.fsync, os.link, os.replace = _fsync, _link, _replace
    builtins.open = io.open = _open
    if any(rule['op'] == 'write' for rule in RULES):
        os.write = _write
    if any(rule['op'] == 'list' for rule in RULES):
        os.listdir, os.scandir = _listdir, _scandir
    patches: dict[str, list] = {}
    for i, rule in enumerate(RULES):
        if rule['op'] == 'call':
            module_name, qualname = rule['target'].split(':')
            patches.setdefault(module_name, []).append(_wrap_call(i, qualname))
        elif rule['op'] == 'step':
            patches.setdefault('composer.core.engine', []).append(_wrap_event(i))
        elif rule['op'] == 'set':
            module_name, name = rule['target'].split(':')
            patches.setdefault(module_name, []).append(
                lambda module, name=name, value=rule['value']: setattr(module, name, value))
        elif rule['op'] == 'gpu_threads':
            patches.setdefault('torch.cuda', []).append(_gpu_on_threads)
    sys.meta_path.insert(0, _PatchAfterImport(patches))
