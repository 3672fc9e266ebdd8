"""Quantization itself: the qzo custom ops, quantizer state, scale initialisation, the op table."""
