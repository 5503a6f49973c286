"""Shared by the ServerApp and the ClientApp: the DP mechanism, formats, models and data."""
