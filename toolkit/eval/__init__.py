"""Evaluation: held-out perplexity, multiple-choice log-likelihood accuracy, and a results table."""
from .evaluate import evaluate, source_name, write_json
from .multiple_choice import load_tasks, loglikelihood, multiple_choice
from .perplexity import perplexity
from .report import print_results, results_table

__all__ = ["evaluate", "load_tasks", "loglikelihood", "multiple_choice", "perplexity", "print_results",
           "results_table", "source_name", "write_json"]
