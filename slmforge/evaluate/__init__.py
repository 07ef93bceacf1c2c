"""Task evaluation: metrics (tasks.py) and the real-data task sets they are measured on (task_data.py)."""

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
