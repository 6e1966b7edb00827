"""DiLoCo where training scripts already run: Hugging Face ``Trainer`` and ``accelerate`` loops,
PyTorch Lightning. One module per library; each needs its library, installed with an extra::

    pip install "localsgd-comm[hf]"          # transformers + accelerate
    pip install "localsgd-comm[lightning]"   # lightning

``import localsgd_comm`` never imports them; importing an integration without its library raises
an ``ImportError`` that names the extra.

* :mod:`localsgd_comm.integrations.transformers`: ``DiLoCoTrainer``, a ``transformers.Trainer``.
* :mod:`localsgd_comm.integrations.accelerate`: ``prepare_diloco`` for a hand-written
  ``Accelerator`` loop (``accelerator.prepare`` first, then DiLoCo).
* :mod:`localsgd_comm.integrations.lightning`: ``DiLoCoStrategy``, a Lightning ``DDPStrategy``.
"""
