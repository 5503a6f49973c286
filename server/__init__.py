"""The ServerApp: DP aggregation, the privacy ledger, and export of the shared adapter."""
