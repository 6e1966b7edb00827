"""One rank of a short localsgd job that ends in one of three ways (argv[1]): ``destroy``
(destroy_process_group, then exit), ``no_destroy`` (interpreter exit with the group alive), or
``in_flight`` (exit right after launching an async compressed all-reduce, never waited for).
Launched torchrun-style by tests/test_backend_exit.py, which checks that every rank exits 0."""
import sys

import torch
import torch.distributed as dist

import localsgd_comm  # noqa: F401

mode = sys.argv[1]
torch.set_num_threads(1)
dist.init_process_group("localsgd", pg_options=localsgd_comm.BackendOptions(threshold_bytes=0))
x = torch.randn(100_000)
for _ in range(3):
    dist.all_reduce(x)
dist.all_reduce(torch.ones(10, dtype=torch.int64))
dist.barrier()
if mode == "destroy":
    dist.destroy_process_group()
elif mode == "in_flight":
    dist.all_reduce(torch.randn(1 << 20), async_op=True)  # exits with this in flight
print(f"rank {dist.get_rank() if dist.is_initialized() else '-'} done ({mode})", flush=True)
