"""Placeholder: DiLoCo (issue 4) replaces this file."""


class DiLoCo:  # pragma: no cover - placeholder
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("DiLoCo is not built yet")
