"""The ServerApp: DP aggregation, the privacy ledger, and export of the shared adapter.

Strategies per method (:mod:`dpagg_strategy`, :mod:`lora_strategy`, :mod:`dpsgd_strategy`, on
:mod:`strategy_base`), reply checking and streaming (:mod:`replies`, :mod:`streaming`,
:mod:`blocks`, :mod:`sites`), the SecAgg server side (:mod:`secagg`), checkpoints, the privacy
statement and the export (:mod:`checkpoint`, :mod:`statement`, :mod:`export`). It imports
common/ only, never client/.
"""
