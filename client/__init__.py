"""The ClientApp: what a site runs on its own machine, over its own images."""
