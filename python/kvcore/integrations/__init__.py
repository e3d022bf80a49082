"""Adapters that run framework models on kvcore's cache and kernels.

``kvcore.integrations.transformers``: Hugging Face transformers (optional extra
``pip install kvcore[transformers]``); imported on demand so the core needs only torch and numpy.
"""
