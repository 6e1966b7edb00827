"""Benchmark suite behind the ``localsgd-bench`` console script (see benchmarks/README.md).

Modules: ``cli`` (entry point), ``netns`` (shaped links: namespaces, veth, tc tbf),
``launch`` (one process per rank, optionally inside a namespace), ``collectives``
(all-reduce: gloo fp32 vs the localsgd backend), ``time_to_loss`` (DDP vs DiLoCo training),
``kernels`` (runs ``ops``, the CPU op microbenchmarks), ``report`` (metadata, JSON, tables, plots).
"""
