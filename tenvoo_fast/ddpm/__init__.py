"""The 3D DDPM fine-tuning program (the ``tenvoo-fast`` command; install extra ``ddpm``).

- :mod:`.cli` and :mod:`.options`: the command line;
- :mod:`.finetune`: a run (model, what trains, data, the training loop and its report), with
  :mod:`.training` (the loop's pieces), :mod:`.run_state` and :mod:`.run_checkpoint` (resumable
  checkpoints), :mod:`.profiler` and :mod:`.system` (what the numbers depend on);
- :mod:`.unets`, :mod:`.data`, :mod:`.phantoms`, :mod:`.weights`: the model, the data (NIfTI
  folders or synthetic brain phantoms) and users' weight files;
- :mod:`.compare` (``tenvoo-fast profile``), :mod:`.sample`, :mod:`.evaluate`: methods side by
  side, sampling from base + adapter, and MS-SSIM / FID / MMD of generated volumes.

It needs MONAI, nibabel, tqdm and matplotlib (``pip install 'tenvoo_fast[ddpm]'``); the adapter
library (``import tenvoo_fast``) does not.
"""
