"""Graph passes, one per file; installed as ``qzo_fx.passes``.

Each pass is ``(gm, *, ctx) -> PassResult`` (see :mod:`qzo_fx.pass_infra`).
"""
