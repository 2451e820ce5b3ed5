"""Evaluation: clinical metrics with confidence intervals, reports, prediction, Grad-CAM, export."""
