"""The evaluation report: numbers and tables (:mod:`.tables`), figures (:mod:`.figures`; heat-map
overlays come from :mod:`prn_ray.heatmap`), the self-contained HTML page (:mod:`.html`)."""

from prn_ray.report.html import write_report
from prn_ray.report.tables import (
                                   METRIC_COLUMNS,
                                   ExampleImage,
                                   ProductEvaluation,
                                   format_metric,
                                   markdown_table,
                                   mean_metrics,
                                   results_json,
                                   select_examples,
                                   write_tables,
)

__all__ = ["METRIC_COLUMNS", "ExampleImage", "ProductEvaluation", "format_metric",
           "markdown_table", "mean_metrics", "results_json", "select_examples",
           "write_report", "write_tables"]
