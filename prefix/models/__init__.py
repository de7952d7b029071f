"""The model a config names: prefix's GPT, the registry of ``model.name``, the Composer wrapper, FSDP, export."""

from prefix import exports

__getattr__, __dir__ = exports(
    __name__,
    registry=['build', 'check_vocabulary'],
    fsdp=['average_gradients_on_gloo', 'parallelism_config'],
    export=['whole_checkpoint'],
)
