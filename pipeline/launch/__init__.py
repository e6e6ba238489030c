"""Launching the pipeline beyond ``./launch.sh train``: TorchX components (see :mod:`pipeline.launch.components`).

Kept import-light on purpose: TorchX imports these modules through the ``torchx.components`` entry
point on every ``torchx`` call, so nothing here may pull in torch or torchrec.
"""
