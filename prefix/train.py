"""Train a run: ``composer [-n N] -m prefix.train CONFIG.yaml [key=value ...]`` or ``python -m prefix.train ...``.

Reads top to bottom: the command line (checked before the slow imports), data, run lock, resume point,
then ``fit``: model, Composer trainer. A run resumes by default from its run directory; a finished run
reports so and exits 0.
"""

from __future__ import annotations

import signal
import sys

from prefix import config as config_lib
from prefix.distributed import die_with_launcher
from prefix.errors import PrefixError, reader_gone_quietly

USAGE = 'usage: composer [-n N] -m prefix.train CONFIG.yaml [key=value ...]'

if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the caller ignores it (nohup, &)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C during the imports ends the process as a shell expects: quietly
die_with_launcher()  # before the slow imports below, so a launcher killed meanwhile ends this rank too


def check_arguments(argv: list[str]) -> None:
    """Exit now on ``--help`` (the usage and every key), no config, or a config error: in a fraction of a
    second, where Composer's import alone takes seconds."""
    if not argv or argv[0] in ('-h', '--help'):
        if not argv:
            print(USAGE, file=sys.stderr)
            sys.exit(2)
        with reader_gone_quietly():
            print(USAGE, '', 'keys (yamls/base.yaml explains each; a fixed key may not change when a run resumes):',
                  *config_lib.listing(config_lib.TrainConfig), sep='\n')
        sys.exit(0)
    try:
        config_lib.load_config(argv[0], argv[1:])
    except PrefixError as e:
        sys.exit(e.report())


if __name__ == '__main__':
    check_arguments(sys.argv[1:])

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.core import DataSpec, Evaluator
from composer.devices import Device, DeviceCPU, DeviceGPU
from composer.optim import DecoupledAdamW
from composer.utils import dist, reproducibility
from streaming import StreamingDataLoader

import prefix.distributed.composer_fixes  # noqa: F401  (applied on import)
from prefix import models, schedule, trackers
from prefix.checkpoint import (
    MIN_WRITE_TIMEOUT_S,
    Checkpointer,
    ResumePoint,
    adopt_rescue,
    checkpoint_group,
    find_resume_point,
    global_file,
    is_complete,
    never,
    remove_leftovers,
)
from prefix.config import Duration, TrainConfig, check_and_record
from prefix.data import build_dataloader, count_tokens, dataset_info
from prefix.distributed import (
    Exit,
    PeerLostError,
    PeerWatch,
    Preempted,
    PreemptionSignal,
    RankFailures,
    agreement,
    describe,
    from_rank_zero,
    is_collective_failure,
    nccl_error_handling,
)
from prefix.errors import ConfigError
from prefix.models import average_gradients_on_gloo, parallelism_config
from prefix.run import (
    ConsoleLine,
    Journal,
    MetricsLogger,
    RunDir,
    RunLock,
    gpu_names,
    previous_start,
    record_checkpoint,
    record_failed_setup,
    start_count,
    tee_output,
    write_snapshots,
)


def train(cfg: TrainConfig) -> int:
    on_terminal = sys.stdout.isatty()  # before tee_output makes it a pipe
    preemption = PreemptionSignal().install()  # after Composer's import, so it replaces Composer's handler
    if cfg.deterministic:
        reproducibility.configure_deterministic_mode()  # before any CUDA work: cuBLAS reads its workspace setting once
    device = DeviceGPU() if torch.cuda.is_available() else DeviceCPU()
    if cfg.precision == 'amp_fp16' and isinstance(device, DeviceCPU):
        raise ConfigError('config key precision: amp_fp16 needs a GPU and this machine has none: use fp32 or amp_bf16')
    timeout_s = Duration.parse(cfg.dist_timeout).seconds
    nccl_error_handling()  # a failed NCCL collective raises, so that a rank can still save and say why
    dist.initialize_dist(device, timeout=timeout_s)
    agreement.connect(timeout_s)  # before any collective of prefix's own
    rank, world_size = dist.get_global_rank(), dist.get_world_size()
    peers = PeerWatch(rank, world_size).start() if world_size > 1 else None  # a lost rank: noticed in seconds
    logging.basicConfig(level=logging.INFO, format=f'%(asctime)s [rank{rank}] %(name)s: %(message)s')
    for chatty in ('streaming', 'composer'):  # their INFO lines ("Setting seed to 17" four times) are noise to a reader
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger('composer.distributed').setLevel(logging.INFO)  # but how long FSDP's start-up broadcast took
    if cfg.global_batch_size % world_size:
        raise ConfigError(f'global_batch_size={cfg.global_batch_size} is not divisible by the world size {world_size}')
    device_batch_size = cfg.global_batch_size // world_size

    # Data first: a missing or unreadable dataset is refused before the run directory is touched.
    train_loader = build_dataloader(
        cfg.data, cfg.data.train_split, batch_size=device_batch_size, seed=cfg.seed, train=True,
        max_seq_len=cfg.model.max_seq_len,
    )
    val_loader = build_dataloader(
        cfg.data, cfg.data.val_split, batch_size=device_batch_size, seed=cfg.seed, train=False,
        max_seq_len=cfg.model.max_seq_len,
    )
    models.check_vocabulary(cfg, dataset_info(cfg.data))

    # One live process per run directory; then what a killed predecessor left, and where to resume.
    # Rank 0's file work runs while the other ranks poll it (from_rank_zero): no collective waits on a disk.
    run = RunDir.for_run(cfg.runs_root, cfg.run_name).create()
    lock, generation = acquire_on_rank_zero(run.lock, Duration.parse(cfg.lock_wait).seconds, preemption)
    if lock is not None:
        preemption.farewell = lambda name: stopped_before_first_step(cfg.run_name, name, lock)
        preemption.on_request = lock.beat_now  # "stopping" at once: a restart here waits for the save
    try:
        tee_output(run.console(rank))
        small = MIN_WRITE_TIMEOUT_S  # the deadline of rank 0's work on small files
        from_rank_zero(lambda: tidy(run, generation), small, f'removing leftovers in {run.checkpoints}')
        resume = find_resume_point(run.checkpoints, cfg.checkpoint.write_timeout)
        config_dict = config_lib.to_dict(cfg)
        if resume is not None:
            from_rank_zero(lambda: check_and_record(resume.config, config_dict, resume.global_step, run.config_changes),
                           small, f'recording config changes in {run.config_changes}')
        if resume is not None and is_complete(resume.timestamp, cfg.max_duration):
            if rank == 0:
                print(f'run {cfg.run_name} is already complete: step {resume.global_step} reached '
                      f'max_duration={cfg.max_duration} ({run.root}); nothing to do', flush=True)
                trackers.complete_all(cfg.loggers, run)  # a tracker down when it completed
            return 0
        if resume is not None and rank == 0:
            schedule.warn_of_jump(resume, config_dict, len(train_loader))  # raising max_duration stretches the cosine
        return fit(cfg, config_dict, run, resume, train_loader, val_loader, device, preemption, lock, generation,
                   on_terminal, peers)
    except BaseException as e:  # a start that failed before training has no journal record yet: one says why
        Exit.arm(ending_line(cfg.run_name, e), getattr(e, 'exit_code', 1))
        if lock is not None:
            with Exit.doing(f'recording the failed start in {run.starts}'):
                record_failed_setup(run.starts, e)
        raise
    finally:
        if peers is not None:
            peers.done()  # this rank's silence from now on is no loss
        if lock is not None:
            with Exit.doing(f'releasing the run lock {run.lock}'):
                lock.release()
        preemption.ignore()  # what is left is exiting: a launcher's SIGTERM to a rank still exiting must not kill it


def acquire_on_rank_zero(path: Path, wait: float, preemption: PreemptionSignal) -> tuple[Optional[RunLock], int]:
    """Rank 0 takes the run lock (which can mean waiting minutes for a predecessor); every rank learns whether it
    may go on, and the lock's generation, which names every file this start writes.

    A start in a pod (``PREFIX_POD``, set by runai/pod_train.sh) waits for a live holder too: it is the
    replacement of a pod that may still be in its grace period.
    """
    lock = RunLock(path, wait=wait, wait_for_live='PREFIX_POD' in os.environ,
                   stopping=lambda: preemption.requested)
    generation = from_rank_zero(lambda: lock.acquire().generation)
    return (lock if dist.get_global_rank() == 0 else None), generation


def tidy(run: RunDir, generation: int) -> None:
    """Rank 0, holding the lock: what earlier starts left in checkpoints/ goes, and a checkpoint saved by rank 1
    after their rank 0 was lost is adopted as latest.pt when it continues it."""
    remove_leftovers(run.checkpoints, generation)
    adopted = adopt_rescue(run.checkpoints)
    if adopted is not None:
        record_checkpoint(run.checkpoint_summary, adopted['global_step'], adopted['timestamp'].get('token', 0),
                          global_file(run.checkpoints).stat().st_size)


def stopped_before_first_step(run_name: str, signal_name: str, lock: RunLock) -> None:
    """Rank 0, on a stop signal before the start trained a step: nothing to save; say so, and free the lock
    for the replacement (on the stop watcher's thread: files only)."""
    os.write(1, f'run {run_name} stopped by {signal_name} before its first step: nothing new to save; '
                'run the same command to resume\n'.encode())
    lock.release()


def fit(
    cfg: TrainConfig,
    config_dict: dict[str, Any],
    run: RunDir,
    resume: Optional[ResumePoint],
    train_loader: StreamingDataLoader,
    val_loader: StreamingDataLoader,
    device: Device,
    preemption: PreemptionSignal,
    lock: Optional[RunLock],
    generation: int,
    on_terminal: bool,
    peers: Optional[PeerWatch] = None,
) -> int:
    rank = dist.get_global_rank()
    gpus = gpu_names()
    git, previous, starts = from_rank_zero(lambda: (
        write_snapshots(run, config_lib.to_yaml(cfg), gpus), previous_start(run), start_count(run)),
        MIN_WRITE_TIMEOUT_S, f'writing {run.meta}')
    failures = RankFailures()  # what a callback of this rank hit, until the ranks agree to stop on it
    journal = Journal(run.starts, resume.filename if resume else None, git.get('commit'), previous, failures)
    checkpointer = Checkpointer(run.checkpoints, cfg.checkpoint, config_dict, resume, preemption, failures,
                                run.checkpoint_summary, checkpoint_group(), lock, generation)
    sharded_resume = resume is not None and resume.shards is not None

    trainer = Trainer(
        **training_args(cfg, train_loader, val_loader, device, initialize=resume is None),
        run_name=cfg.run_name,
        # Resume goes through Composer's autoresume; our Checkpointer writes the files it reads, and
        # loads a sharded checkpoint itself (Composer's autoresume reads whole ones only).
        autoresume=not sharded_resume,
        save_folder=str(run.checkpoints),
        save_overwrite=sharded_resume,  # Composer's saver, idle, would otherwise refuse a folder with files
        save_latest_filename=resume.filename if resume else 'latest.pt',
        save_interval=never,
        callbacks=[checkpointer, journal, schedule.ConfiguredLR(cfg.optimizer.lr),  # after the checkpoint is loaded
                   # The config as the trackers' hyperparameters; learning rate, throughput, MFU, gradient norm and
                   # peak memory, each at its batch's loss step (prefix.trackers.signals).
                   trackers.Hyperparameters(config_dict), trackers.Signals()],
        # Rank 0 logs; each tracker continues the tracker run of earlier starts (prefix.trackers.loggers).
        # The trackers report how the start ended as the journal records it, once, when they close.
        # The console: Composer's progress bar on a terminal, else one line per log_interval (prefix.run.console).
        progress_bar=on_terminal,
        log_to_console=False,
        console_stream='stdout',
        loggers=[MetricsLogger(run.metrics, failures),
                 *([ConsoleLine(Duration.parse(cfg.log_interval).number)] if rank == 0 and not on_terminal else []),
                 *(trackers.build(cfg.loggers, run, cfg.run_name, starts + 1, lambda: journal.outcome)
                   if rank == 0 else [])],
    )
    average_gradients_on_gloo(trainer.state.model)
    # From the end of fit, however it ends, this rank has Exit.EXIT_S seconds to record it, close its loggers and
    # release the run lock: on a volume that stopped answering it then prints its line and exits without them.
    try:
        trainer.fit()
    except BaseException as e:
        if peers is not None and is_collective_failure(e):
            savable = checkpointer.savable_step(trainer.state)
            if lost := peers.lost(savable):
                e = lost_rank(e, lost, savable, peers, checkpointer, trainer.state)
        Exit.arm(ending_line(cfg.run_name, e), getattr(e, 'exit_code', 1))
        with Exit.doing(f'recording the end of this start in {run.starts}'):
            journal.end('preempted' if isinstance(e, Preempted) else 'failed', int(trainer.state.timestamp.batch),
                        None if isinstance(e, Preempted) else e)
        with Exit.doing('closing the loggers (logs/metrics.jsonl and the trackers)'):
            # Not Trainer.close(): its barrier would wait for ranks that may be in another collective, or gone.
            trainer.engine.close()
        if not isinstance(e, Preempted):
            raise e  # the original, or the lost peer's line
        if rank == 0:
            print(ending_line(cfg.run_name, e), flush=True)
        return e.exit_code
    step = int(trainer.state.timestamp.batch)
    complete = f'run {cfg.run_name} complete at step {step} ({run.root})'
    Exit.arm(complete, 0)
    with Exit.doing(f'recording the end of this start in {run.starts}'):
        journal.end('completed', step)
    with Exit.doing('closing the loggers (logs/metrics.jsonl and the trackers)'):
        trainer.close()
    if rank == 0:
        print(complete, flush=True)
    return 0


def lost_rank(error: BaseException, lost: list[int], savable: Optional[int], peers: PeerWatch,
              checkpointer: Checkpointer, state: Any) -> PeerLostError:
    """A collective failed because ``lost`` ranks are gone: the survivors agree on one writer, the lowest rank at the
    highest step any of them can save (``PeerWatch.writer``), which saves it (``Checkpointer.rescue``) and tells the
    others. Rank 0 writes latest.pt; another writer writes rescue files for the next start to adopt. Every
    survivor's one line names the lost ranks and the checkpoint a restart resumes from."""
    step, rank = int(state.timestamp.batch), dist.get_global_rank()
    writer, best = peers.writer(lost)
    if rank == writer and savable is not None:
        where = checkpointer.rescue(state, lost, peers.tell, deputy=rank != 0)
    elif rank in (0, writer):  # rank 0 behind another survivor, or no survivor can save: the last commit stays
        where = checkpointer.stand_by(lost)
        if rank == 0 and writer is None:
            peers.tell(where)
        elif rank == 0:
            where = peers.heard() or f'rank {writer} saves step {best} for the next start to adopt if it can, else {where}'
    elif writer is None or checkpointer.sharded:
        where = peers.heard() or checkpointer.intact(lost)
    elif best is None:  # the store went with rank 0: rank 1 saves the step it holds, if it can
        where = f'rank 1 saves step {step} for the next start to adopt if it can, else {checkpointer.intact(lost)}'
    else:
        where = peers.heard() or f'rank {writer} saves step {best} if it can'
    names = ', '.join(f'rank {r} ({peers.where(r)})' for r in lost)
    return PeerLostError(f'lost {names} at step {step}: {describe(error)}; {where}; run the same command to resume')


def ending_line(run_name: str, error: BaseException) -> str:
    """The line a rank ends with: a stop's, or the error's (what ``main`` prints, and ``Exit`` when the clean-up hangs)."""
    if isinstance(error, Preempted):
        return f'run {run_name} {error}; run the same command to resume'
    return error.line() if isinstance(error, PrefixError) else f'prefix: error: {describe(error)}'


def training_args(
    cfg: TrainConfig, train_loader: StreamingDataLoader, val_loader: StreamingDataLoader, device: Device,
    initialize: bool = True,
) -> dict[str, Any]:
    """The Trainer arguments that make the training math: model, optimizer, schedule, data, precision."""
    # Model: the initial weights depend on the seed alone; under FSDP prefix's GPT is built on the meta
    # device and every rank initializes only its shards; a resume (initialize=False) draws none.
    reproducibility.seed_all(cfg.seed)
    model = models.build(cfg, initialize)
    opt = cfg.optimizer
    return {
        'model': model,
        'train_dataloader': DataSpec(train_loader, get_num_tokens_in_batch=count_tokens),
        'eval_dataloader': Evaluator(label='val', dataloader=val_loader, metric_names=list(model.get_metrics(is_train=False)))
        if cfg.eval_batches != 0 else None,  # eval_batches: 0 turns evaluation off
        'eval_interval': cfg.eval_interval,
        'eval_subset_num_batches': cfg.eval_batches if cfg.eval_batches is not None else -1,
        'max_duration': cfg.max_duration,
        'optimizers': DecoupledAdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay),
        'schedulers': schedule.build(opt),
        'step_schedulers_every_batch': True,
        'algorithms': [GradientClipping('norm', opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else [],
        'device': device,
        'precision': cfg.precision or ('amp_bf16' if isinstance(device, DeviceGPU) else 'fp32'),
        'device_train_microbatch_size': cfg.device_microbatch_size or cfg.global_batch_size // dist.get_world_size(),
        'parallelism_config': parallelism_config(cfg),
        'seed': cfg.seed,
    }


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check_arguments(argv)
    # Every torch.load in this process, Composer's included, is restricted to plain data.
    os.environ['TORCH_FORCE_WEIGHTS_ONLY_LOAD'] = '1'
    try:
        cfg = config_lib.load_config(argv[0], argv[1:])
        return train(cfg)
    except PrefixError as e:
        code = e.report()
        agreement.leave()  # after the line is out: another rank's exit may end this one at once
        return code


if __name__ == '__main__':
    sys.exit(main())
