"""slimlm.serve: the serving runtime (imports slimlm.toolkit, never slimlm.recipes)."""
