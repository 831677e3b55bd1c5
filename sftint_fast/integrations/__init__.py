"""Bridges to other interaction libraries; each lives in its own module and needs its optional extra.

- :mod:`sftint_fast.integrations.shapiq`: :class:`MaskedLMGame`, a ``shapiq.Game`` evaluated by our engine
  (``pip install "sftint_fast[shapiq]"``).
"""
