"""The model inside a DDP / DataParallel wrapper (or the model itself): the one place that knows wrappers hold it as
`.module`."""

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)
