"""Task evaluation: metrics (tasks.py) and bits per byte on real text (perplexity.py). The task data sets
themselves are slmforge.data.tasks."""

from slmforge.evaluate.tasks import (
    binary_metrics,
    classification_metrics,
    evaluate_predictions,
    keyphrase_metrics,
    log_parsing_metrics,
    qa_metrics,
    summarization_metrics,
    translation_metrics,
)

__all__ = ["binary_metrics", "classification_metrics", "evaluate_predictions", "keyphrase_metrics",
           "log_parsing_metrics", "qa_metrics", "summarization_metrics", "translation_metrics"]
