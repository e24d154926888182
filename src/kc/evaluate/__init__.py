"""Metrics (AP, mAP, per-vertical AP, top-k) and reports."""
