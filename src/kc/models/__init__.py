"""Backbones (timm), heads, and the classifier that joins them."""
