"""Shipping the single model: export, prediction, the HTTP server."""
