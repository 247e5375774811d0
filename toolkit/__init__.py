"""slimlm.toolkit: the library under the recipes (torch + transformers only)."""
