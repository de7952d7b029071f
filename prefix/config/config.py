"""The run's configuration: a typed schema, a YAML file, and dotted command-line overrides.

The schema is the single list of keys (OmegaConf structured config, as llm-foundry does with
YAML + dotlist). Loading validates everything before anything heavy starts, and every problem
is raised as one ``ConfigError`` line that names the key or file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prefix.config import schema
from prefix.config.duration import Duration
from prefix.config.location import default_runs_root, validate_run_name
from prefix.config.model import ModelConfig
from prefix.config.schema import setting
from prefix.errors import ConfigError


@dataclass
class DataConfig:
    """Where the MDS shards are: ``local`` alone, or ``remote`` with ``local`` as its cache."""

    # The data a run trains on is fixed for its life (data.local only where it is not the cache of a remote).
    local: str = setting(fixed=True)
    remote: Optional[str] = setting(None, fixed=True)
    train_split: str = setting('train', fixed=True)
    val_split: str = 'val'
    shuffle: bool = setting(True, fixed=True)
    num_workers: int = setting(0, bounds='[0, inf)')
    # Fixed so that the sample order does not depend on the world size (Streaming elastic resume).
    num_canonical_nodes: int = setting(1, fixed=True)


@dataclass
class OptimizerConfig:
    """Decoupled AdamW with linear warmup and cosine decay to ``min_lr_ratio`` (``prefix.schedule``)."""

    lr: float = setting(1.0e-3, bounds='(0, inf)')
    weight_decay: float = setting(0.0, bounds='[0, inf)')
    betas: list[float] = setting(factory=lambda: [0.9, 0.95], bounds='[0, 1)', length=2)
    warmup: str = setting('0ba', units='ba', zero_ok=True)
    min_lr_ratio: float = setting(0.1, bounds='[0, 1]')
    # Where the cosine reaches lr * min_lr_ratio (None: max_duration); after it the learning rate stays there. Set to
    # the old max_duration when raising max_duration, a run goes on without a jump in the learning rate.
    decay_end: Optional[str] = setting(None, units='ba,ep')
    grad_clip_norm: float = setting(1.0, bounds='[0, inf)')  # 0: no clipping


@dataclass
class CheckpointConfig:
    """``interval`` for latest.pt (batches ``200ba`` or wall clock ``10min``); ``periodic_interval`` for the fallback.

    ``async_write``: training waits only for a copy of the state in host memory, the write runs in
    the background; ``false`` makes training wait for the whole write. ``format``: ``sharded`` (the
    model and optimizer in a folder of shards that every rank writes; the default under FSDP) or
    ``full`` (everything in latest.pt, written by rank 0; the default otherwise). ``write_timeout``: how
    long a rank may take to write its part of one checkpoint before every rank stops, naming it (a hung
    volume); by default the whole checkpoint at 25 MB/s, at least 10 minutes (docs/checkpoints.md).
    """

    interval: str = setting('5min', units='ba,s,min,h')
    periodic_interval: Optional[str] = setting(None, units='ba,s,min,h')
    async_write: bool = True
    write_timeout: Optional[str] = setting(None, units='s,min,h')
    format: Optional[str] = setting(None, choices=('full', 'sharded'), fixed=True)  # None: set by load_config


@dataclass
class FSDPConfig:
    """FSDP2 through Composer: every rank holds a shard of each weight and its optimizer state, and a block's
    weights are gathered whole only while it computes (``fsdp: null`` is plain data parallelism)."""

    reshard_after_forward: bool = True  # free a block's gathered weights after its forward (less memory, one more gather)
    mixed_precision: str = setting('DEFAULT', choices=('DEFAULT', 'PURE', 'FULL'))  # Composer's FSDP2 mixed precision
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    activation_cpu_offload: bool = False  # keep saved activations in host memory


@dataclass
class TensorBoardConfig:
    """TensorBoard event files in ``logs/tensorboard/`` (``tensorboard: {}`` turns it on; it has no settings)."""


@dataclass
class MLflowConfig:
    """An MLflow run that this prefix run continues at every start."""

    tracking_uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else a file store in logs/mlruns
    experiment_name: str = 'prefix'


@dataclass
class WandBConfig:
    """A W&B run that this prefix run continues at every start (``WANDB_MODE=offline`` and W&B's other variables apply)."""

    project: str = 'prefix'
    entity: Optional[str] = None


@dataclass
class LoggersConfig:
    """Experiment trackers, any combination; metrics always go to ``logs/metrics.jsonl`` too."""

    tensorboard: Optional[TensorBoardConfig] = None
    mlflow: Optional[MLflowConfig] = None
    wandb: Optional[WandBConfig] = None


@dataclass
class TrainConfig:
    run_name: str = MISSING
    runs_root: Optional[str] = None
    seed: int = setting(17, fixed=True)
    # In batches or epochs: the learning-rate schedule (warmup, decay_end) is counted in batches.
    max_duration: str = setting(units='ba,ep')
    global_batch_size: int = setting(32, fixed=True)
    device_microbatch_size: Optional[int] = setting(None, bounds='(0, inf)')  # None: the whole device batch
    precision: Optional[str] = setting(None, choices=(None, 'fp32', 'amp_bf16', 'amp_fp16'))
    # Deterministic kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG): what makes a GPU
    # run repeat itself bit for bit, and so a resumed run equal to an uninterrupted one (docs/gpus-and-threads.md).
    deterministic: bool = True
    eval_interval: str = setting('100ba', units='ba,ep')
    eval_batches: Optional[int] = setting(None, bounds='[0, inf)')  # None: the whole val split; 0: no evaluation
    log_interval: str = setting('10ba', units='ba')
    model: ModelConfig = setting(factory=ModelConfig, fixed=True)  # every model.* key: the model is the run
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fsdp: Optional[FSDPConfig] = None
    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    # How long one collective may wait for a rank before the run fails: a hung or lost peer. Checkpoint
    # writes and reads never wait inside a collective, so this does not grow with the checkpoint.
    dist_timeout: str = setting('5min', units='s,min,h')
    # How long a start waits for the run's lock while its holder saves after SIGTERM (or, in a pod, is
    # still running): the old pod of a preempted run can still be in its grace period.
    lock_wait: str = setting('15min', units='s,min,h', zero_ok=True)
    allow_config_change: bool = False


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the plain loader keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f'key {key!r} is given twice', key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, 'full_key', None)
    msg = str(err).split('\n')[0].strip()
    if 'not in' in msg and key:
        return f'unknown config key {key!r}'
    if 'missing mandatory value' in msg and key:
        return f'missing required config key {key!r}'
    if "Incompatible value 'None'" in msg and key:
        return f'config key {key!r} is empty'
    section = re.match(r'Merge error: \w+ is not a subclass of (\w+)\. value: (.*)', msg)
    if section:  # a value where a section goes: loggers.tensorboard=true
        where = schema.key_of(TrainConfig, section.group(1)) or section.group(1)
        return (f'config key {where!r} is a section, not a value ({section.group(2)}): turn it on with {where}={{}}, '
                'or give its keys')
    return f'config key {key!r}: {msg}' if key else msg


def _validate(cfg: TrainConfig, check_paths: bool) -> None:
    validate_run_name(cfg.run_name)
    schema.check(cfg)  # durations and choices, as each key's field declares them
    m = cfg.model
    _validate_model_source(m, check_paths)
    for key in ('vocab_size', 'max_seq_len', 'd_model', 'n_heads', 'n_layers'):
        if getattr(m, key) <= 0:
            raise ConfigError(f'config key model.{key!r}: must be positive, got {getattr(m, key)}')
    if m.d_model % m.n_heads:
        raise ConfigError(f'config key model.d_model: {m.d_model} is not divisible by model.n_heads={m.n_heads}')
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f'config key model.dropout: {m.dropout} is not in [0, 1)')
    if cfg.global_batch_size <= 0:
        raise ConfigError(f'config key global_batch_size: must be positive, got {cfg.global_batch_size}')
    warmup, end = Duration.parse(cfg.optimizer.warmup), Duration.parse(cfg.max_duration)
    if end.unit == 'ba' and warmup.number > end.number:
        raise ConfigError(f'config key optimizer.warmup: {cfg.optimizer.warmup} is longer than max_duration={cfg.max_duration} '
                          '(the learning rate would never reach optimizer.lr)')
    if cfg.checkpoint.format == 'sharded' and cfg.fsdp is None:
        raise ConfigError('config key checkpoint.format: sharded checkpoints need fsdp (set fsdp: {} or checkpoint.format=full)')


def _validate_model_source(m: ModelConfig, check_paths: bool) -> None:
    """Each model name has the keys it needs and none of the others' (a key that would be ignored is a mistake)."""
    given = {k for k in ('pretrained_model_name_or_path', 'config', 'factory', 'kwargs') if getattr(m, k) is not None}
    if m.pretrained:
        given.add('pretrained')
    allowed = {'gpt': set(), 'hf_causal_lm': {'pretrained_model_name_or_path', 'pretrained', 'config'},
               'import': {'factory', 'kwargs'}}[m.name]
    extra = sorted(given - allowed)
    if extra:
        raise ConfigError(f'config key model.{extra[0]} does not apply to model.name={m.name}')
    if m.name == 'hf_causal_lm':
        if (m.pretrained_model_name_or_path is None) == (m.config is None):
            raise ConfigError('model.name=hf_causal_lm needs exactly one of model.pretrained_model_name_or_path '
                              '(a local folder) or model.config (an inline config with model_type)')
        if m.pretrained and m.pretrained_model_name_or_path is None:
            raise ConfigError('config key model.pretrained: weights come from model.pretrained_model_name_or_path, '
                              'which is not set')
        folder = m.pretrained_model_name_or_path
        if check_paths and folder is not None and not (Path(folder).expanduser() / 'config.json').is_file():
            raise ConfigError(f'config key model.pretrained_model_name_or_path: {folder} is not a folder with a '
                              'config.json (models are read from local folders only: save_pretrained one there)')
        if m.config is not None and not m.config.get('model_type'):
            raise ConfigError('config key model.config: give model_type (gpt2, llama, ...) and the fields of its config')
    if m.name == 'import' and not m.factory:
        raise ConfigError("model.name=import needs model.factory: 'module.path:function' returning a ComposerModel")


def load_config(path: str, overrides: list[str], check_paths: bool = True) -> TrainConfig:
    """Merge ``path`` and ``key=value`` overrides onto the schema; raise ConfigError on any problem.

    ``check_paths=False``: leave out what depends on this machine's files (checked where the run is submitted).
    """
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f'config file {path} is a folder: name a YAML file (yamls/base.yaml, ...)')
    if not file.is_file():
        raise ConfigError(f'config file {path} does not exist')
    try:
        raw = yaml.load(file.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f':{mark.line + 1}:{mark.column + 1}' if mark else ''
        raise ConfigError(f'config file {path}{where} is not valid YAML: {getattr(e, "problem", e)}') from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f'config file {path} must hold a mapping of keys, not {type(raw).__name__}')
    parsed = []
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f'override {item!r} is not of the form key=value')
        try:
            parsed.append(OmegaConf.from_dotlist([item]))  # its value is YAML
        except yaml.YAMLError as e:
            raise ConfigError(f'override {item!r} is not valid YAML: {getattr(e, "problem", e)} (quote the value, and '
                              'put a space after each ":" in a mapping: key={a: 1})') from None
    try:
        schema = OmegaConf.structured(TrainConfig)
        merged = OmegaConf.merge(schema, OmegaConf.create(raw), *parsed)
        cfg: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    if cfg.runs_root is None:
        cfg.runs_root = default_runs_root()
    if cfg.checkpoint.format is None:
        cfg.checkpoint.format = 'sharded' if cfg.fsdp is not None else 'full'
    if cfg.data.local is not None and cfg.data.local != MISSING:
        # The dataset is where the path leads from here: a relative path from another folder is other data.
        cfg.data.local = os.path.abspath(os.path.expanduser(cfg.data.local))
    _validate(cfg, check_paths)
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain data (for meta/ and the checkpoint)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

