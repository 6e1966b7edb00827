"""Placeholder: the "localsgd" torch.distributed backend (issue 3) replaces this file."""


class BackendOptions:  # pragma: no cover - placeholder
    pass


def all_reduce_compressed(*args, **kwargs):  # pragma: no cover - placeholder
    raise NotImplementedError("the localsgd backend is not built yet")


def get_backend_stats(*args, **kwargs):  # pragma: no cover - placeholder
    raise NotImplementedError("the localsgd backend is not built yet")
