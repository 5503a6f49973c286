"""Names shared by the ServerApp and the ClientApp: message record keys and config keys."""

# RecordDict entries
ARRAYS = "arrays"  # ArrayRecord: what a site sends, or the global adapter the server sends
CONFIG = "config"  # ConfigRecord: per-round instructions from the server
METRICS = "metrics"  # MetricRecord: public, data-independent facts a site may report

# ArrayRecord entries
EMBEDDING_SUM = "embedding-sum"  # DPAgg-TI: a site's sum of bounded per-image embeddings
EMBEDDING = "embedding"  # DP-SGD TI: the shared embedding (global, or a site's update)

# ConfigRecord entries
ROUND = "round"
METHOD = "method"

# MetricRecord entries (DP-SGD baseline only: every value here depends on public settings)
SITE_EPSILON = "site-record-epsilon"
SITE_NOISE_MULTIPLIER = "site-noise-multiplier"
SITE_SAMPLE_RATE = "site-sample-rate"
SITE_STEPS = "site-steps"
SITE_INDEX = "site-index"
