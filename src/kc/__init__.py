"""kc: knowledge concentration — many specialists distilled into one classifier over a huge label vocabulary."""

__version__ = "0.1.0"
