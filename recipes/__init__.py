"""slimlm.recipes: user workflows and the `slimlm` command (imports toolkit and serve)."""
