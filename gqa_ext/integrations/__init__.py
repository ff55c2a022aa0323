"""Integrations of gqa_ext with other libraries (each imports its library only when used).

- :mod:`gqa_ext.integrations.transformers`: ``attn_implementation="gqa_ext"`` in HF transformers.
"""
