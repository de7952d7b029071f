"""The run's configuration: the schema and what it knows of each key, YAML + overrides, durations, drift on resume."""

from prefix import exports

__getattr__, __dir__ = exports(
    __name__,
    config=['CheckpointConfig', 'DataConfig', 'LoggersConfig', 'MLflowConfig', 'OptimizerConfig', 'TrainConfig',
            'WandBConfig', 'load_config', 'to_dict', 'to_yaml'],
    model=['ModelConfig'],
    schema=['listing'],
    location=['default_runs_root', 'validate_run_name'],
    duration=['Duration'],
    drift=['check_and_record', 'diff', 'flatten'],
)
