"""Data: calibration and evaluation text, as published or offline, cut into token windows."""
