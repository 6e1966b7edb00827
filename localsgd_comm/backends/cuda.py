"""CUDA implementations of the ops: CUDA C++ (native) or Triton, picked by
LOCALSGD_COMM_CUDA_IMPL=native|triton. (Placeholder until the CUDA/Triton work lands.)"""


def active_implementation() -> str:
    return "none"
