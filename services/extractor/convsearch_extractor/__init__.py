"""The extractor service: ImageNet-pretrained CNNs turn images into vectors at any layer."""

import os

# OpenMP threads that spin after each parallel region (GNU OpenMP's default) take the cores the
# decoding threads need on CPU: the `pixels` model ran through the engine at half the decoder's
# rate. Sleeping at once costs a CNN's forward pass nothing measurable (and helps when cores are
# shared). Read when torch loads OpenMP, so set here, before any torch import; the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
