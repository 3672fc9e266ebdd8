"""Passes of the prepare pipeline (annotate, insert q/dq, calibrate, clean up)."""
