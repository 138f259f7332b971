"""A small Mask R-CNN in Flax NNX on synthetic scenes, with jax_roialign's pooling.

Run from the repository root: ``python -m examples.detector`` (training and
held-out metrics, see :mod:`.train`), ``python -m examples.detector.pod`` (the
train step compiled for a 16-chip TPU v5e pod and run on 8 CPU devices).
The walkthrough is ``docs/detector.md``.
"""
