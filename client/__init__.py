"""The ClientApp: what a site runs on its own machine, over its own images.

DPAgg-TI's per-image embeddings (:mod:`ti`, :mod:`dpagg`), DP-SGD textual inversion
(:mod:`dpsgd_ti`), LoRA with the MP/SMP-LoRA defence (:mod:`lora_train`, :mod:`smp`) or
DP-SGD (:mod:`dpsgd_lora`), the site's own policy and accountant (:mod:`policy`,
:mod:`site_accountant`), the SecAgg site side (:mod:`secagg`), and ``python -m
client.check_data``. It imports common/ only, never server/.
"""
