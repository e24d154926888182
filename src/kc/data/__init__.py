"""Labelled images: manifests, image folders, splits, decoding, and the built-in benchmark."""
