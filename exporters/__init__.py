"""ONNX lowering, emitters and verification; installed as ``qzo_fx.exporters``."""
