"""The floor both apps stand on: what the ServerApp and the ClientApp share.

The run config (:mod:`config`) and the adapter settings derived from it (:mod:`settings`);
the one DP mechanism, its noise, sampling and accounting (:mod:`dp`); secure aggregation and
distributed noise (:mod:`secagg`); the adapters' formats (:mod:`textual_inversion`,
:mod:`lora`, :mod:`wire`, :mod:`keys`); the base model (:mod:`models`, :mod:`tiny_sd`), the
sites' images (:mod:`data`) and the diffusion step (:mod:`diffusion`). Nothing here imports
client/, server/ or anything above them (tests/test_layers.py).
"""
