"""Names shared by the ServerApp and the ClientApp: message record keys and config keys."""

# RecordDict entries
ARRAYS = "arrays"  # ArrayRecord: what a site sends, or the global adapter the server sends
CONFIG = "config"  # ConfigRecord: per-round instructions from the server
METRICS = "metrics"  # MetricRecord: DP-SGD's public spend (SITE_SPEND); diagnostics only if the operator opts in

# ArrayRecord entries
EMBEDDING_SUM = "embedding-sum"  # DPAgg-TI: a site's sum of bounded per-image embeddings
EMBEDDING = "embedding"  # DP-SGD TI: the shared embedding (global, or a site's update)

# ConfigRecord entries
ROUND = "round"
METHOD = "method"
DEFENSE = "defense"  # LoRA: the local training the site must run
LORA_FROZEN_A = "lora-frozen-a"  # FFA-LoRA: digest of the public frozen A (common.lora.tree_digest), checked by sites
ADAPTER = "adapter"
AGGREGATION = "aggregation"  # "central" (server adds the noise), "secure", "distributed"
# the run's privacy plan, sent with every round so that sites can check it against their policy
PLAN_UNIT = "plan-unit"  # "record", "site", or "" when the server adds no noise (DP-SGD TI)
PLAN_NOISE_MULTIPLIER = "plan-noise-multiplier"
PLAN_SAMPLE_RATE = "plan-sample-rate"
PLAN_STEPS = "plan-steps"  # compositions of (z, q) in the whole run
PLAN_ROUNDS = "plan-rounds"
PLAN_DELTA = "plan-delta"
# the record-level DP-SGD each site runs (TI baseline, LoRA defense dp-sgd), from public settings
# only: the server charges it, and a site refuses a round whose plan differs from its own
PLAN_DPSGD_NOISE_MULTIPLIER = "plan-dpsgd-noise-multiplier"
PLAN_DPSGD_SAMPLE_RATE = "plan-dpsgd-sample-rate"  # dpsgd-batch-size / declared site-dataset-size
PLAN_DPSGD_STEPS = "plan-dpsgd-steps"  # DP-SGD steps of one site over the whole run

# MetricRecord entries (DP-SGD baseline only: every value here depends on public settings)
SITE_EPSILON = "site-record-epsilon"
SITE_NOISE_MULTIPLIER = "site-noise-multiplier"
SITE_SAMPLE_RATE = "site-sample-rate"
SITE_STEPS = "site-steps"
SITE_INDEX = "site-index"
# the public parameters of what a DP-SGD site spent this round (and the epsilon they give):
# with the privatised contribution, the only figures a site sends unless diagnostics are on
SITE_SPEND = (SITE_EPSILON, SITE_NOISE_MULTIPLIER, SITE_SAMPLE_RATE, SITE_STEPS, SITE_INDEX)

# MetricRecord entries a site adds as diagnostics only when the operator opts in (run config
# site-diagnostics = true, central aggregation); they are derived from private data and are
# NOT covered by the DP guarantee: the server must be trusted with them (see privacy.json)
DIAG_LOSS = "adaptation-loss"
DIAG_ATTACKER_ACCURACY = "attacker-accuracy"
DIAG_DELTA_NORM = "delta-norm"  # before clipping
DIAG_CLIPPED = "clipped"  # 1.0 if the delta was scaled down to the clip bound
DIAGNOSTICS = (DIAG_LOSS, DIAG_ATTACKER_ACCURACY, DIAG_DELTA_NORM, DIAG_CLIPPED)
